"""Finding and decoding photos. :func:`load_rgb` is the one decoding function used everywhere.

Every consumer (stage 1, the VLM, the UI, exports, training) calls :func:`load_rgb`, so every
model sees the same pixels: EXIF orientation applied, any mode converted to 8-bit RGB, alpha
flattened onto white.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from catreview.errors import CatreviewError

#: File name endings treated as photos when walking a folder (case-insensitive). Files with
#: other endings are ignored; files with these endings that fail to decode are recorded as failed.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
#: Largest accepted image, in pixels (Pillow's own default limit is ~89.5 MP and only warns
#: below 2x that). 64 MP covers any camera photo a breeder takes.
MAX_PIXELS = 64_000_000


class ImageDecodeError(CatreviewError, ValueError):
    """A file that is not a usable photo. ``str(err)`` is a reason a person understands."""


def iter_image_files(root: str | Path) -> Iterator[Path]:
    """Yield photo files below ``root`` recursively, sorted, by :data:`IMAGE_EXTENSIONS`.

    Hidden files and folders (leading ``.``) are skipped.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited onto white."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale the full range of the type to 0..255 (not a clip).
        arr = np.asarray(img, dtype=np.float64)
        maxval = 65535.0 if img.mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
        img = Image.fromarray(np.clip(arr / maxval * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK (Pillow inverts Adobe CMYK JPEGs), YCbCr, LAB, HSV
    return img


def load_rgb(source: str | Path) -> Image.Image:
    """Decode a photo into an 8-bit RGB ``PIL.Image`` (mode ``"RGB"``, size ``(W, H)`` in px).

    Steps: open with Pillow, refuse more than :data:`MAX_PIXELS` (decompression-bomb guard),
    decode fully (so truncated files fail here, not later), apply the EXIF orientation
    (``ImageOps.exif_transpose``), then convert palette, grayscale, 16-bit, CMYK, RGBA/LA
    (flattened onto white) to RGB.

    Raises:
        ImageDecodeError: missing, empty, truncated, too large, or not a decodable image
            (e.g. HEIC without a plugin); the message is meant for a person.
    """
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {path}") from None
    if size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageDecodeError(
                        f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP (limit "
                        f"{MAX_PIXELS / 1e6:.0f} MP; possible decompression bomb)"
                    )
                img.load()
                return _to_rgb8(ImageOps.exif_transpose(img))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        kind = path.suffix.lower().lstrip(".") or "unknown"
        hint = " (HEIC/HEIF/AVIF need a Pillow plugin such as pillow-heif)" if kind in {"heic", "heif", "avif"} else ""
        raise ImageDecodeError(f"not a readable image ({kind} file){hint}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image too large, possible decompression bomb: {exc}") from None
    except OSError as exc:  # truncated data, broken headers, unsupported codecs
        msg = str(exc)
        if "truncated" in msg.lower() or "premature end" in msg.lower():
            raise ImageDecodeError("truncated image file (incomplete download or copy?)") from None
        raise ImageDecodeError(f"cannot decode image: {msg}") from None
    except (ValueError, SyntaxError) as exc:  # Pillow raises these for some corrupt headers
        raise ImageDecodeError(f"corrupt image: {exc}") from None
