"""Grid thumbnails: small JPEGs cached by the photo's content hash, made once, served by path.

Like the display copies of :mod:`catreview.query.display`, a thumbnail is a file in one folder
the app serves as static files (``data_dir/thumbs``): ``<thumbs>/<sha[:2]>/<sha256>-<size>.jpg``.
It is written once, atomically (temporary name, then rename), so concurrent requests share one
complete file, and a re-imported or moved photo (same bytes, same sha256) reuses it.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from catreview.data.images import load_rgb
from catreview.files import atomic_write_bytes

__all__ = ["THUMB_QUALITY", "THUMB_SIZE", "thumbnail_file", "thumbnail_path"]

#: Longest side of a thumbnail in pixels (a 48-photo grid page of 160 px JPEGs is ~0.3 MB).
THUMB_SIZE = 160
#: JPEG quality of thumbnails (Pillow's scale 1..95; 80 is Pillow's guide value for small images).
THUMB_QUALITY = 80


def thumbnail_path(sha256: str, cache_dir: Path, size: int = THUMB_SIZE) -> Path:
    """Where the thumbnail of the photo with content hash ``sha256`` lives (made or not).

    Raises:
        ValueError: ``sha256`` is not 64 hex characters, or ``size`` < 16.
    """
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    if size < 16:
        raise ValueError(f"thumbnail size must be at least 16 px, got {size}")
    return cache_dir / sha256[:2] / f"{sha256}-{size}.jpg"


def thumbnail_file(path: str | Path, sha256: str, cache_dir: Path, size: int = THUMB_SIZE) -> Path:
    """The cached thumbnail of the photo stored at ``path`` (content hash ``sha256``), made on
    first use: decoded by :func:`catreview.data.images.load_rgb` (EXIF orientation applied, RGB),
    shrunk so its longest side is at most ``size`` px (aspect kept; never enlarged; Lanczos),
    saved as JPEG (:data:`THUMB_QUALITY`).

    Raises:
        catreview.data.images.ImageDecodeError: the file is gone or is not a decodable photo.
        ValueError: see :func:`thumbnail_path`.
    """
    target = thumbnail_path(sha256, cache_dir, size)
    if target.is_file():
        return target
    img = load_rgb(path)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=THUMB_QUALITY)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, buf.getvalue())
    return target
