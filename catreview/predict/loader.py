"""Photos from disk to model inputs in ``torch.utils.data.DataLoader`` workers.

:class:`PhotoDataset` holds only ``(image id, path)`` pairs and, for stage 1, the classifier's
timm data config (``timm.data.resolve_data_config``); each worker builds the eval transform from
that config (``timm.data.create_transform``) on first use, so nothing heavy is pickled and the
workers start with the ``spawn`` method, which is safe from threaded processes such as the app
(a ``fork`` of a process holding other threads' locks can deadlock; Python docs,
``multiprocessing`` "Contexts and start methods"). Decoding is :func:`catreview.data.images.load_rgb`
everywhere. A spawned worker imports the main script of the process again (not a package's
``__main__``): a script that runs predictions with workers must keep its work under
``if __name__ == "__main__":`` (``app.py`` and ``benchmarks/stage1_bench.py`` do).

A photo that cannot be decoded (changed or removed since import) does not fail its batch:
:func:`collate_photos` leaves it out of the tensors and lists it in :attr:`PhotoBatch.failed`
with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from catreview.data.images import ImageDecodeError, load_rgb

#: Start method of the DataLoader workers (see the module docstring).
WORKER_START_METHOD = "spawn"


@dataclass(frozen=True)
class PhotoItem:
    """One photo to load: its ``images.id`` and file path."""

    image_id: int
    path: str


@dataclass
class LoadedPhoto:
    """A decoded photo: ``pixels`` (3, H, W) float32 from the timm transform, or ``image`` (a PIL
    RGB image) when the dataset has no transform (VLM inputs); ``error`` is the reason when it
    could not be decoded (then both are ``None``)."""

    item: PhotoItem
    pixels: torch.Tensor | None = None
    image: Image.Image | None = None
    error: str | None = None


@dataclass
class PhotoBatch:
    """The decodable photos of one batch, in order, and the ones that failed.

    Attributes:
        items: the photos that decoded, in dataset order.
        pixels: (len(items), 3, H, W) float32 (stage 1), or ``None`` for a PIL batch or a batch
            in which nothing decoded.
        images: PIL RGB images, one per item (VLM batches); empty for stage-1 batches.
        failed: ``(item, reason)`` of each photo that could not be decoded.
    """

    items: list[PhotoItem]
    pixels: torch.Tensor | None = None
    images: list[Image.Image] = field(default_factory=list)
    failed: list[tuple[PhotoItem, str]] = field(default_factory=list)

    def pin_memory(self) -> PhotoBatch:
        """The batch with :attr:`pixels` in page-locked memory (called by the DataLoader's
        pin-memory thread when ``pin_memory=True``), so the copy to the GPU can overlap."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class PhotoDataset(Dataset[LoadedPhoto]):
    """Photos by position: ``dataset[i]`` decodes ``items[i]`` with :func:`load_rgb`.

    Args:
        items: the photos, in the order batches should come.
        data_config: a timm data config (``Stage1Classifier.data_config``); each item is then
            transformed to a (3, H, W) float32 tensor. ``None``: items stay PIL RGB images.

    Only ``items`` and ``data_config`` are pickled to the workers; the transform is rebuilt in each.
    """

    def __init__(self, items: Sequence[PhotoItem], data_config: Mapping[str, Any] | None = None) -> None:
        self.items = list(items)
        self.data_config = dict(data_config) if data_config is not None else None
        self._transform: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_transform"] = None  # rebuilt in the worker from data_config
        return state

    def transform(self) -> Any:
        """The timm eval transform of :attr:`data_config` (built once per process), or ``None``."""
        if self._transform is None and self.data_config is not None:
            import timm.data

            self._transform = timm.data.create_transform(**self.data_config)
        return self._transform

    def __getitem__(self, index: int) -> LoadedPhoto:
        item = self.items[index]
        try:
            image = load_rgb(item.path)
        except ImageDecodeError as exc:  # changed, removed or unreadable since import: reported
            return LoadedPhoto(item, error=str(exc))
        transform = self.transform()
        if transform is None:
            return LoadedPhoto(item, image=image)
        return LoadedPhoto(item, pixels=transform(image))


def collate_photos(samples: Sequence[LoadedPhoto]) -> PhotoBatch:
    """Stack the decoded photos of a batch (tensors stacked, PIL images listed) and list the
    failed ones with their reasons; the collate function of :func:`photo_loader`."""
    ok = [s for s in samples if s.error is None]
    failed = [(s.item, s.error) for s in samples if s.error is not None]
    tensors = [s.pixels for s in ok if s.pixels is not None]
    pixels = torch.stack(tensors) if tensors else None
    images = [s.image for s in ok if s.image is not None]
    return PhotoBatch([s.item for s in ok], pixels, images, failed)


def default_workers(processes: int = 1) -> int:
    """DataLoader workers of each of ``processes`` model processes on this machine when none are
    asked for: ``min(16, cpus // processes - 1)`` (one core per model process stays free for it;
    0 on a single core). ``cpus`` is the number of CPUs this process may run on
    (``os.sched_getaffinity``, else ``os.cpu_count()``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform (macOS)
        cpus = os.cpu_count() or 1
    return max(0, min(16, cpus // max(1, processes) - 1))


def photo_loader(
    items: Sequence[PhotoItem],
    *,
    batch_size: int,
    num_workers: int,
    data_config: Mapping[str, Any] | None = None,
) -> DataLoader[LoadedPhoto]:
    """A DataLoader of :class:`PhotoBatch` over ``items``, in order.

    Args:
        items: photos to load.
        batch_size: photos per batch (>= 1).
        num_workers: decoding processes (0: decode in this process). Workers start with
            :data:`WORKER_START_METHOD` and end with the iteration (``persistent_workers=False``).
        data_config: timm data config for stage-1 tensors; ``None`` for PIL images.

    Batches are in page-locked memory when CUDA is available (``pin_memory``).

    Raises:
        ValueError: ``batch_size`` < 1 or ``num_workers`` < 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"the number of DataLoader workers must be >= 0, got {num_workers}")
    return DataLoader(
        PhotoDataset(items, data_config),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_photos,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        multiprocessing_context=WORKER_START_METHOD if num_workers > 0 else None,
    )


__all__ = [
    "WORKER_START_METHOD",
    "LoadedPhoto",
    "PhotoBatch",
    "PhotoDataset",
    "PhotoItem",
    "collate_photos",
    "default_workers",
    "photo_loader",
]
