"""Finding, reading and decoding photos. :func:`load_rgb` is the one decoding function used everywhere.

Every consumer (stage 1, the VLM, the UI, exports, training) calls :func:`load_rgb`, so every
model sees the same pixels: EXIF orientation applied, any mode converted to 8-bit RGB, alpha
flattened onto white. The importer's :func:`scan_file` (hash + decode of one file, run in
process-pool workers, which import only this module) decodes the bytes it hashed with the same
steps (:func:`decoded_size`).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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


def iter_image_files(root: str | Path, *, on_error: Callable[[OSError], None] | None = None) -> Iterator[Path]:
    """Yield photo files below ``root`` recursively, sorted, by :data:`IMAGE_EXTENSIONS`.

    Hidden files and folders (leading ``.``) are skipped; symbolic links to folders are not
    followed (``os.walk`` default). Every name with a photo ending is yielded, whatever it is
    (a broken link or a named pipe too): :func:`scan_file` says what is wrong with it.

    Args:
        on_error: called with the ``OSError`` of each folder that cannot be listed (its
            ``filename`` is the folder), e.g. no permission; the walk goes on with the other
            folders. ``None``: the error is raised.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        OSError: a folder cannot be listed and ``on_error`` is ``None``.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")

    def walk_error(exc: OSError) -> None:
        if on_error is None:
            raise exc
        on_error(exc)

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name


@dataclass(frozen=True, slots=True)
class FileScan:
    """What :func:`scan_file` found out about one file: small and picklable, the record a pool
    worker sends back to the importer.

    Exactly one of three outcomes: decoded (``error`` and ``read_error`` are ``None``; ``width``
    and ``height`` in px after the EXIF orientation), read but not decodable (``error`` is the
    reason; the bytes are hashed, so the file still gets a row), or not read at all
    (``read_error`` is the reason; no hash, no size, so no row).

    Attributes:
        path: the file's path, as given to :func:`scan_file`.
        sha256: hex sha256 (64 characters) of the bytes read, ``None`` when not read.
        size: bytes read, ``None`` when not read.
    """

    path: str
    sha256: str | None = None
    size: int | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    read_error: str | None = None
    phash: str | None = None  # 16-hex perceptual hash of the decoded photo (catreview.data.phash)


IN_MEMORY_BYTES = 64 << 20
"""Files up to this size (64 MiB) are read once into memory, hashed and decoded from the same
bytes; larger ones are hashed in 1 MiB pieces and decoded from the file."""


def scan_file(path: str) -> FileScan:
    """Hash and decode one file (:func:`load_rgb`'s decoding); never raises for a bad file.

    The file is opened once without blocking (so a named pipe with a photo's name cannot hang
    the import) and must be a regular file. Light on purpose: process-pool workers import only
    this module (Pillow, NumPy, hashlib).

    Returns:
        A :class:`FileScan`; ``read_error`` says in words why the file could not be read (no
        permission, vanished since the folder was listed, a broken link, not a regular file,
        an I/O error).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return FileScan(path, read_error=read_error_reason(path, exc))
    try:
        with os.fdopen(fd, "rb", closefd=True) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return FileScan(path, read_error=f"not a regular file ({_file_kind(st.st_mode)}); nothing was read")
            digest = hashlib.sha256()
            data: bytes | None = None
            size = 0
            if st.st_size <= IN_MEMORY_BYTES:
                data = f.read()
                digest.update(data)
                size = len(data)
            else:
                while block := f.read(1 << 20):
                    digest.update(block)
                    size += len(block)
    except OSError as exc:  # EIO, a file that became unreadable while it was read
        return FileScan(path, read_error=read_error_reason(path, exc))
    try:
        if data is not None and not data:
            raise ImageDecodeError("empty file (0 bytes)")
        width, height, phash = decoded_size_and_phash(io.BytesIO(data) if data is not None else Path(path), path)
    except ImageDecodeError as exc:
        return FileScan(path, digest.hexdigest(), size, error=str(exc))
    return FileScan(path, digest.hexdigest(), size, width, height, phash=phash)


def read_error_reason(path: str | Path, exc: OSError, *, what: str = "file") -> str:
    """A reason a person can act on for an ``OSError`` met while reading (or, ``what="folder"``,
    listing) ``path``."""
    if isinstance(exc, PermissionError):
        return f"permission denied: the importing user may not read this {what} (fix its permissions and import again)"
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return f"broken symbolic link (its target {os.readlink(path)!r} does not exist)"
        return f"the {what} disappeared after its folder was listed (moved or deleted meanwhile)"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    return f"cannot read the {what}: {exc.strerror or exc} (errno {exc.errno})"


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a plain file"


DecoderLimits = tuple[int, int | None]
"""``(MAX_PIXELS, PIL.Image.MAX_IMAGE_PIXELS)``: the decoder settings a pool worker copies from its parent."""


def decoder_limits() -> DecoderLimits:
    """This process's decoder limits (:data:`MAX_PIXELS` and Pillow's ``Image.MAX_IMAGE_PIXELS``)."""
    return MAX_PIXELS, Image.MAX_IMAGE_PIXELS


def set_decoder_limits(limits: DecoderLimits) -> None:
    """Adopt a parent's :func:`decoder_limits`, so this process refuses or accepts exactly the
    images the parent would."""
    global MAX_PIXELS
    MAX_PIXELS, Image.MAX_IMAGE_PIXELS = limits


PARENT_CHECK_SECONDS = 0.5
"""How often a pool worker checks that the process that started it is still alive (s)."""


def init_scan_worker(limits: DecoderLimits, parent_pid: int) -> None:
    """Process-pool initializer for :func:`scan_file` workers: adopt the parent's decoder limits
    and exit as soon as the parent is gone (a daemon thread compares ``os.getppid()`` with
    ``parent_pid`` every :data:`PARENT_CHECK_SECONDS`). Without it, workers of a parent that was
    killed (``SIGKILL``, out of memory) wait on their task queue forever: they hold its write end too."""
    set_decoder_limits(limits)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="catreview-parent-watch", daemon=True).start()


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
    with _decoding(path, path) as img:
        return _to_rgb8(ImageOps.exif_transpose(img))


def decoded_size(fp: Path | BinaryIO, path: str | Path) -> tuple[int, int]:
    """``(width, height)`` in px of what :func:`load_rgb` would return for ``fp`` (a path or a
    binary file object; ``path`` names it in messages), with the same checks and errors, but
    without keeping the pixels (the EXIF orientation is applied in place, no copy).

    Raises:
        ImageDecodeError: as :func:`load_rgb`.
    """
    with _decoding(fp, Path(path)) as img:
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb8(img).size


def decoded_size_and_phash(fp: Path | BinaryIO, path: str | Path) -> tuple[int, int, str]:
    """:func:`decoded_size` plus the perceptual hash (:func:`catreview.data.phash.phash_hex`)
    of the same decoded RGB pixels ``load_rgb`` returns: one decode for both.

    Raises:
        ImageDecodeError: as :func:`load_rgb`.
    """
    from catreview.data.phash import phash_hex

    with _decoding(fp, Path(path)) as img:
        ImageOps.exif_transpose(img, in_place=True)
        rgb = _to_rgb8(img)
        return rgb.size[0], rgb.size[1], phash_hex(rgb)


@contextmanager
def _decoding(fp: Path | BinaryIO, path: Path) -> Iterator[Image.Image]:
    """Open ``fp`` (a path or a binary file object), refuse more than :data:`MAX_PIXELS`,
    decode it fully and yield it; any failure, also in the caller's block (EXIF orientation,
    mode conversion), becomes an :class:`ImageDecodeError` with a reason for a person. ``path``
    gives the suffix for the HEIC hint."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageDecodeError(
                        f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP (limit "
                        f"{MAX_PIXELS / 1e6:.0f} MP; possible decompression bomb)"
                    )
                img.load()
                yield img
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
