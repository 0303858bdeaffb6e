"""Export images: check, decode, resize and save each photo as a JPEG, in a process pool.

Images are decoded with :func:`catreview.data.images.load_rgb` (EXIF orientation applied, RGB),
resized so the **shortest side** is ``image_size`` px (aspect kept, never enlarged) and saved as
JPEG quality 95. Shortest side, because CLIP-style processors (LLaVA's) resize the shortest side
to their input size and centre-crop: at ``image_size=336`` every pixel llava-1.5 would see is
kept, and no processor has to upsample.

:func:`process_images` runs :func:`export_file` in worker processes (``workers > 1``) started by
``forkserver`` (``spawn`` where that is missing): never forked from the app, which has torch and
the models loaded. This module imports only Pillow, numpy and the catreview modules below, so a
worker starts in a fraction of a second and holds no model.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

from PIL import Image

from catreview.data.images import ImageDecodeError, load_rgb
from catreview.errors import CatreviewError
from catreview.files import sha256_file

IMAGE_SIZE = 336
JPEG_QUALITY = 95
#: ``progress(done, total)`` while images are written.
Progress = Callable[[int, int], None]
#: Photos sent to a worker at a time: large enough that the inter-process round trip (~0.1 ms)
#: is noise next to the ~20-60 ms a photo takes, small enough that results stream back steadily.
CHUNK = 16

T = TypeVar("T")


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


class ImageJob(NamedTuple):
    """One photo to export: its file ``src``, the ``sha256`` it was imported with, and ``rel``,
    the JPEG's path relative to the export root (``"train/<id>.jpg"``)."""

    src: str
    sha256: str
    rel: str


class ImageResult(NamedTuple, Generic[T]):
    """What :func:`process_images` yields per job: the caller's ``item``, the job, and either
    ``size`` (the written JPEG's ``(width, height)`` px) or ``error`` (why nothing was written)."""

    item: T
    job: ImageJob
    size: tuple[int, int] | None
    error: str | None


def export_file(job: ImageJob, root: str, image_size: int, quality: int) -> tuple[tuple[int, int] | None, str | None]:
    """:func:`export_image` of one job into ``root / job.rel``: ``(size, None)`` when written,
    ``(None, reason)`` for a photo that cannot be exported. Runs in the worker processes."""
    try:
        img = export_image(job.src, job.sha256, Path(root) / job.rel, image_size=image_size, quality=quality)
    except ExportImageError as exc:
        return None, str(exc)
    return img.size, None


def _export_chunk(
    jobs: list[ImageJob], root: str, image_size: int, quality: int
) -> list[tuple[tuple[int, int] | None, str | None]]:
    return [export_file(job, root, image_size, quality) for job in jobs]


def pool_context() -> multiprocessing.context.BaseContext:
    """The start method of the image workers: ``forkserver`` (a clean interpreter forks them;
    the app's threads, torch and models are never copied), ``spawn`` where it is missing."""
    return multiprocessing.get_context(
        "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    )


def default_workers() -> int:
    """Image worker processes by default: the CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_images(
    jobs: Iterable[tuple[T, ImageJob]],
    root: Path,
    *,
    image_size: int,
    quality: int = JPEG_QUALITY,
    workers: int = 1,
    progress: Progress | None = None,
    total: int | None = None,
) -> Generator[ImageResult[T], None, None]:
    """Export the photos of ``jobs`` (``(item, job)`` pairs, consumed lazily) into ``root`` and
    yield one :class:`ImageResult` per job, **in the order of** ``jobs``.

    Args:
        jobs: the caller's ``item`` (passed through untouched, never sent to a worker) and the job.
        root: export root; the folders of every ``job.rel`` must exist.
        image_size: shortest side of the written JPEGs, px (never enlarged).
        quality: JPEG quality (1-95).
        workers: ``1`` exports in this process; more use a process pool of that size
            (:func:`pool_context`), at most ``2 * workers`` chunks of :data:`CHUNK` photos in
            flight, so memory stays flat however many jobs come.
        progress: ``progress(done, total)`` after each photo (``total`` as given, else 0).
        total: the number of jobs, for ``progress``.

    Raises:
        ValueError: ``workers < 1``.
        concurrent.futures.process.BrokenProcessPool: a worker died (killed, out of memory); what was yielded stays valid.
        OSError: a JPEG could not be written (disk full, folder missing).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    done = 0
    if workers == 1:
        for item, job in jobs:
            size, error = export_file(job, str(root), image_size, quality)
            done += 1
            if progress:
                progress(done, total or 0)
            yield ImageResult(item, job, size, error)
        return
    pending: deque[tuple[list[tuple[T, ImageJob]], Future[list[tuple[tuple[int, int] | None, str | None]]]]] = deque()
    source = iter(jobs)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=pool_context())
    try:

        def submit() -> bool:
            chunk = list(islice(source, CHUNK))
            if chunk:
                pending.append(
                    (chunk, pool.submit(_export_chunk, [j for _, j in chunk], str(root), image_size, quality))
                )
            return bool(chunk)

        while len(pending) < 2 * workers and submit():
            pass
        while pending:
            chunk, future = pending.popleft()
            results = future.result()
            submit()
            for (item, job), (size, error) in zip(chunk, results):
                done += 1
                if progress:
                    progress(done, total or 0)
                yield ImageResult(item, job, size, error)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = [
    "CHUNK",
    "IMAGE_SIZE",
    "JPEG_QUALITY",
    "ExportImageError",
    "ImageJob",
    "ImageResult",
    "Progress",
    "default_workers",
    "export_file",
    "export_image",
    "export_size",
    "pool_context",
    "process_images",
    "resize_for_export",
]
