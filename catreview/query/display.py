"""The file a browser shows for a photo: the stored file when browsers display it as is, else a
cached, content-addressed JPEG.

The app hands Gradio a *path* in one folder it serves as static files, never a PIL image: a PIL
image is re-encoded into a Gradio cache file named by its content hash and rewritten in place on
every request, which a concurrent download of the same photo can read half-written (the issue
saw 1-2% of saves reported as failed). Display files are named by the photo's sha256, made once
and atomically (temporary name, then rename), so concurrent requests share one complete file,
and the browser can read nothing outside that folder.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from catreview.data.images import ImageDecodeError, load_rgb
from catreview.files import atomic_write_bytes

#: Formats and modes every current browser shows natively (``<img>``; MDN "Image file type and
#: format guide").
BROWSER_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF"})
BROWSER_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P"})
#: Largest stored file served as is (bytes) and longest side (pixels); larger ones are resized.
MAX_DIRECT_BYTES = 8 * 1024 * 1024
MAX_SIDE = 2048
#: JPEG quality of display copies (Pillow's scale 1..95).
DISPLAY_QUALITY = 90
#: Endings of display files, the re-encoded ``.jpg`` first.
DISPLAY_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")


def _direct(path: Path) -> bool:
    """True when browsers show ``path`` as is: a browser format and mode, no EXIF rotation, not
    oversized (reads the header only)."""
    if path.stat().st_size > MAX_DIRECT_BYTES:
        return False
    with Image.open(path) as img:
        orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation tag
        return (
            img.format in BROWSER_FORMATS
            and img.mode in BROWSER_MODES
            and orientation == 1
            and max(img.size) <= MAX_SIDE
        )


def display_file(path: str | Path, sha256: str, cache_dir: Path) -> Path:
    """The file to show for the photo stored at ``path`` with content hash ``sha256``: always in
    ``cache_dir/<sha[:2]>/``, the only folder the app lets the browser read.

    A photo browsers show as is becomes ``<sha256><suffix>``, a hard link to the stored file (a
    copy across file systems); any other becomes ``<sha256>.jpg``, decoded by
    :func:`catreview.data.images.load_rgb` (EXIF orientation applied, RGB) with its longest side
    at most :data:`MAX_SIDE`. Either is made once, atomically, and found again by name.

    Raises:
        ImageDecodeError: the file is gone or is not a decodable photo.
    """
    path = Path(path)
    folder = cache_dir / sha256[:2]
    for suffix in DISPLAY_SUFFIXES:
        hit = folder / f"{sha256}{suffix}"
        if hit.is_file():
            return hit
    folder.mkdir(parents=True, exist_ok=True)
    try:
        direct = _direct(path)
    except FileNotFoundError:
        raise ImageDecodeError(f"the photo file is gone: {path.name}") from None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        direct = False  # not shown as is: load_rgb below decodes it or says why it cannot
    if direct and path.suffix.lower() in DISPLAY_SUFFIXES:
        target = folder / f"{sha256}{path.suffix.lower()}"
        _link_or_copy(path, target)
        return target
    img = load_rgb(path)
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=DISPLAY_QUALITY)
    target = folder / f"{sha256}.jpg"
    atomic_write_bytes(target, buf.getvalue())
    return target


def _link_or_copy(src: Path, target: Path) -> None:
    """Put ``src`` at ``target`` atomically: a hard link, or a copy when linking is impossible."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not supported: copy instead
            shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
