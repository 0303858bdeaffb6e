"""Pooled pre-logit features of the photos, cached on disk per frozen backbone.

Features are ``model.forward_head(model.forward_features(x), pre_logits=True)``
(:func:`catreview.models.classifier.pre_logit_features`): (N, F) float32, computed in batches
through the stage-1 DataLoader (:func:`catreview.predict.loader.photo_loader`, the same decoding
and timm eval transform as predictions). They are stored under
``settings.data_dir / "features" / <backbone key>`` as safetensors shards holding ``image_ids``
(int64, N), ``sha256`` (uint8, N x 32: the photo's content hash, the lookup key, so a photo that
moved keeps its features) and ``features`` (float16, N x F). A shard is written through a temporary
sibling renamed into place after every :data:`SHARD_PHOTOS` photos, so a stopped or killed
extraction keeps what it finished; a later call computes only the photos not cached yet. One
``filelock.FileLock`` per backbone folder serialises extractions across processes.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

from catreview.config import Settings
from catreview.models.classifier import ClassifierError, Stage1Classifier, pre_logit_features, resolve_device
from catreview.models.stage1_builtin import Stage1Backbone
from catreview.predict.loader import PhotoItem, default_workers, photo_loader

FEATURES_DIRNAME = "features"
#: Photos per cache shard (a shard is written when this many new features are ready, and at the end).
SHARD_PHOTOS = 1024
#: Fewest photos for which DataLoader workers start when their number is not given (as in
#: :data:`catreview.predict.runner.AUTO_WORKERS_MIN_PHOTOS`: a spawned worker costs seconds).
AUTO_WORKERS_MIN_PHOTOS = 512

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FeaturePhoto:
    """A photo to featurise: ``images.id``, its content hash (64 hex) and file path."""

    image_id: int
    sha256: str
    path: str


@dataclass
class FeatureExtractor:
    """A frozen backbone ready to featurise photos.

    Attributes:
        backbone: what it is (:meth:`catreview.models.registry.ModelRegistry.stage1_backbone`).
        model: the timm module in eval mode on :attr:`device` (the built-in one has no classifier;
            a user's checkpoint keeps its own head, used as the gate's reference).
        data_config: timm data config (``timm.data.resolve_data_config``) for the DataLoader.
        device: where it runs.
        batch_size: photos per forward (``classifier.batch_size``).
        own_classifier: the user's (or demo) classifier with its own head, ``None`` for the
            built-in ImageNet backbone (its ImageNet head is never a breed prediction).
    """

    backbone: Stage1Backbone
    model: torch.nn.Module
    data_config: dict[str, Any]
    device: torch.device
    batch_size: int
    own_classifier: Stage1Classifier | None = None


def load_extractor(settings: Settings, backbone: Stage1Backbone) -> FeatureExtractor:
    """Load ``backbone`` for feature extraction.

    The built-in backbone: ``timm.create_model(arch, num_classes=0, checkpoint_path=weights)``.
    Otherwise the configured (or demo) classifier through :meth:`Stage1Classifier.load`, the code
    every user checkpoint goes through.

    Raises:
        ClassifierError: the model cannot be loaded.
    """
    import timm

    cfg = settings.classifier
    if backbone.builtin:
        try:
            model = timm.create_model(
                backbone.model_id, pretrained=False, num_classes=0, checkpoint_path=str(backbone.weights)
            )
        except (RuntimeError, OSError) as exc:
            raise ClassifierError(f"cannot load the built-in backbone {backbone.weights}: {exc}") from exc
        dev = resolve_device(cfg.device)
        model.eval().to(dev)
        data_cfg = dict(timm.data.resolve_data_config({}, model=model))
        return FeatureExtractor(backbone, model, data_cfg, dev, cfg.batch_size)
    clf = Stage1Classifier.load(
        backbone.model_id,
        checkpoint=backbone.weights,
        labels_file=backbone.labels_file,
        device=cfg.device,
        batch_size=cfg.batch_size,
    )
    return FeatureExtractor(backbone, clf.model, clf.data_config, clf.device, clf.batch_size, clf)


def features_dir(settings: Settings, backbone_key: str) -> Path:
    """``settings.data_dir / "features" / <backbone key>`` (created)."""
    d = Path(settings.data_dir) / FEATURES_DIRNAME / backbone_key
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha_bytes(shas: Sequence[str]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(bytes.fromhex(s) for s in shas)), dtype=torch.uint8).reshape(-1, 32)


def read_cache(folder: Path) -> dict[str, np.ndarray]:
    """Every cached feature in ``folder``: ``{sha256 hex: (F,) float16 array}`` (later shards win).

    Raises:
        safetensors.SafetensorError: a shard is unreadable (shards are written atomically, so this
            means outside damage; delete the folder to rebuild it).
    """
    out: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            shas = f.get_tensor("sha256").numpy()
            feats = f.get_tensor("features").numpy()
        for row, sha in enumerate(shas):
            out[bytes(sha).hex()] = feats[row]
    return out


def _write_shard(folder: Path, ids: list[int], shas: list[str], feats: list[torch.Tensor]) -> Path:
    name = f"shard-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.safetensors"
    tensors = {
        "image_ids": torch.tensor(ids, dtype=torch.int64),
        "sha256": _sha_bytes(shas),
        "features": torch.cat(feats).to(torch.float16).contiguous(),
    }
    tmp = folder / f".{name}.tmp"
    save_file(tensors, str(tmp))
    final = folder / name
    tmp.replace(final)
    return final


@dataclass
class FeatureRun:
    """Outcome of :func:`ensure_features`.

    Attributes:
        features: ``{sha256: (F,) float32 array}`` of every requested photo that decoded.
        computed: photos featurised by this call; ``cached``: found in the cache.
        failed: ``(path, reason)`` of photos that could not be decoded.
        seconds: wall time.
        cancelled: ``stop`` was set before the end (what was computed is cached).
    """

    features: dict[str, np.ndarray] = field(default_factory=dict)
    computed: int = 0
    cached: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    cancelled: bool = False


def ensure_features(
    settings: Settings,
    extractor: FeatureExtractor,
    photos: Sequence[FeaturePhoto],
    *,
    num_workers: int | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> FeatureRun:
    """Features of ``photos``: cached ones read, missing ones computed in batches and cached.

    Args:
        num_workers: DataLoader workers (``None``: CPUs - 1 for at least
            :data:`AUTO_WORKERS_MIN_PHOTOS` missing photos, else 0).
        progress: ``progress("features", done, n_missing)`` after every batch.
        stop: when set, extraction ends before its next batch (``cancelled``).
    """
    t0 = time.perf_counter()
    folder = features_dir(settings, extractor.backbone.key)
    run = FeatureRun()
    with FileLock(folder / ".lock"):
        cache = read_cache(folder)
        todo = [p for p in photos if p.sha256 not in cache]
        run.cached = len(photos) - len(todo)
        by_id = {p.image_id: p for p in todo}
        workers = num_workers
        if workers is None:
            workers = default_workers() if len(todo) >= AUTO_WORKERS_MIN_PHOTOS else 0
        ids: list[int] = []
        shas: list[str] = []
        feats: list[torch.Tensor] = []
        done = 0
        if todo:
            loader = photo_loader(
                [PhotoItem(p.image_id, p.path) for p in todo],
                batch_size=extractor.batch_size,
                num_workers=workers,
                data_config=extractor.data_config,
            )
            for batch in loader:
                if stop is not None and stop.is_set():
                    run.cancelled = True
                    break
                done += len(batch.items) + len(batch.failed)
                run.failed += [(item.path, reason) for item, reason in batch.failed]
                if batch.pixels is not None:
                    f = pre_logit_features(extractor.model, batch.pixels.to(extractor.device, non_blocking=True))
                    ids += [item.image_id for item in batch.items]
                    shas += [by_id[item.image_id].sha256 for item in batch.items]
                    feats.append(f)
                    run.computed += len(batch.items)
                if len(ids) >= SHARD_PHOTOS:
                    cache.update(_as_cache(ids, shas, feats))
                    _write_shard(folder, ids, shas, feats)
                    ids, shas, feats = [], [], []
                if progress:
                    progress("features", done, len(todo))
            if ids:
                cache.update(_as_cache(ids, shas, feats))
                _write_shard(folder, ids, shas, feats)
    run.features = {p.sha256: cache[p.sha256].astype(np.float32) for p in photos if p.sha256 in cache}
    run.seconds = time.perf_counter() - t0
    return run


def _as_cache(ids: list[int], shas: list[str], feats: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """The float16 rows exactly as :func:`_write_shard` stores them (a fit never sees float32
    features that a later read would round)."""
    arr = torch.cat(feats).to(torch.float16).numpy()
    return {sha: arr[i] for i, sha in enumerate(shas)}


__all__ = [
    "FEATURES_DIRNAME",
    "SHARD_PHOTOS",
    "FeatureExtractor",
    "FeaturePhoto",
    "FeatureRun",
    "ensure_features",
    "features_dir",
    "load_extractor",
    "read_cache",
]
