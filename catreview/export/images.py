"""Export images: check, decode, resize and save each photo as a JPEG (in a thread pool).

Images are decoded with :func:`catreview.data.images.load_rgb` (EXIF orientation applied, RGB),
resized so the **shortest side** is ``image_size`` px (aspect kept, never enlarged) and saved as
JPEG quality 95. Shortest side, because CLIP-style processors (LLaVA's) resize the shortest side
to their input size and centre-crop: at ``image_size=336`` every pixel llava-1.5 would see is
kept, and no processor has to upsample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from catreview.data.images import ImageDecodeError, load_rgb
from catreview.errors import CatreviewError
from catreview.export.rows import ReviewedRow
from catreview.files import sha256_file

IMAGE_SIZE = 336
JPEG_QUALITY = 95
#: ``progress(done, total)`` while images are written.
Progress = Callable[[int, int], None]


def export_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """``(width, height)`` after scaling the shortest side down to ``image_size`` (aspect
    kept, rounded; images already small enough keep their size)."""
    short = min(width, height)
    if short <= image_size:
        return width, height
    scale = image_size / short
    w = image_size if width == short else max(1, round(width * scale))
    h = image_size if height == short else max(1, round(height * scale))
    return w, h


def resize_for_export(img: Image.Image, image_size: int) -> Image.Image:
    """Downscale ``img`` (RGB) so its shortest side is ``image_size`` px (Lanczos)."""
    size = export_size(img.width, img.height, image_size)
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


class ExportImageError(CatreviewError, ValueError):
    """A photo that cannot go into an export; the message is the reason."""


def export_image(
    src: str | Path, sha256: str, dst: Path, *, image_size: int, quality: int = JPEG_QUALITY
) -> Image.Image:
    """Check, decode, resize and save one photo as JPEG; returns the resized image.

    The source bytes must still hash to ``sha256`` (a file replaced since import would carry a
    label that belongs to other content).

    Raises:
        ExportImageError: missing, unreadable, changed since import, or undecodable.
    """
    try:
        actual = sha256_file(src)
    except OSError as exc:
        raise ExportImageError(f"cannot read {src}: {exc.strerror or exc}") from None
    if actual != sha256:
        raise ExportImageError(f"{src} changed since import (sha256 {actual[:12]} != {sha256[:12]})")
    try:
        img = load_rgb(src)
    except ImageDecodeError as exc:
        raise ExportImageError(f"{src}: {exc}") from None
    out = resize_for_export(img, image_size)
    icc = img.info.get("icc_profile")
    out.save(dst, "JPEG", quality=quality, **({"icc_profile": icc} if icc else {}))
    return out


def process_images(
    jobs: list[tuple[ReviewedRow, str]],
    root: Path,
    *,
    image_size: int,
    quality: int,
    workers: int,
    progress: Progress | None,
) -> Iterator[tuple[ReviewedRow, str, Image.Image | None, str | None]]:
    """Export images in a thread pool (Pillow releases the GIL while decoding/encoding), in
    chunks so memory stays bounded; yields ``(row, relative path, image or None, error)``."""

    def one(job: tuple[ReviewedRow, str]) -> tuple[ReviewedRow, str, Image.Image | None, str | None]:
        row, rel = job
        try:
            return (
                row,
                rel,
                export_image(row.path, row.sha256, root / rel, image_size=image_size, quality=quality),
                None,
            )
        except ExportImageError as exc:
            return row, rel, None, str(exc)

    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(jobs), 128):
            for result in pool.map(one, jobs[start : start + 128]):
                done += 1
                if progress:
                    progress(done, len(jobs))
                yield result


__all__ = [
    "IMAGE_SIZE",
    "JPEG_QUALITY",
    "ExportImageError",
    "Progress",
    "export_image",
    "export_size",
    "process_images",
    "resize_for_export",
]
