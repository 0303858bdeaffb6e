"""Stage 1: a timm image classifier (the users' ConvNeXt) giving top-k breeds with probabilities.

Loading goes through timm only (``timm.create_model`` with ``checkpoint_path``, which reads
safetensors and ``.pth``/``.pth.tar`` state dicts, timm train checkpoints with EMA weights,
``module.``/``_orig_mod.`` prefixes, always with ``weights_only=True``). The only Python object
allowed in a pickled checkpoint besides tensors and plain containers is ``argparse.Namespace``
(the ``args`` that timm's train script stores); anything else is refused with a
:class:`ClassifierError` suggesting safetensors. Preprocessing comes from
the model's own pretrained config (``timm.data.resolve_data_config`` +
``timm.data.create_transform``), never from hand-written mean/std.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

from catreview.config import ClassifierConfig
from catreview.data.labels import read_label_file
from catreview.errors import CatreviewError
from catreview.files import sha256_file


class ClassifierError(CatreviewError, RuntimeError):
    """A stage-1 model that cannot be loaded; the message says what to fix."""


class ClassifierNotTrainedError(ClassifierError):
    """The built-in stage-1 backbone has no trained breed head yet (no active head version).

    Its ImageNet head is never used for breeds, so there is no stage-1 model until one is trained
    (``python -m catreview train --stage classifier`` or "Retrain classifier"); the predict runner
    then skips stage 1 (and the VLM, which needs its candidates) and says so.
    """


#: Keys under which a checkpoint may carry its class names (safetensors metadata or dict key).
LABEL_KEYS = ("label_names", "class_names", "classes")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when available else ``cpu``; otherwise ``torch.device(device)``.

    Raises:
        ClassifierError: CUDA asked for but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClassifierError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


#: Python classes allowed when unpickling a ``.pth`` checkpoint (``weights_only=True``):
#: timm's train script stores its ``argparse.Namespace`` under ``"args"``.
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]


def _unsafe_globals(path: Path) -> list[str] | None:
    """Names of the classes a zip-format ``torch.save`` file needs beyond the allowed ones, or
    ``None`` when the file is not in that format (legacy pickle, or not a checkpoint)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, OSError, RuntimeError):
        return None
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_CHECKPOINT_GLOBALS}
    return [n for n in names if n not in allowed]


def unsafe_checkpoint_error(path: Path) -> ClassifierError:
    """The :class:`ClassifierError` for a ``.pth`` file that ``weights_only=True`` refused."""
    names = _unsafe_globals(path)
    fix = (
        "re-save its weights as safetensors (safetensors.torch.save_file(model.state_dict(), "
        "'model.safetensors')) or as a plain dict of tensors"
    )
    if names:
        return ClassifierError(
            f"checkpoint {path} contains Python objects that are not loaded, for safety "
            f"(weights_only=True): {', '.join(names)}; {fix}"
        )
    return ClassifierError(
        f"checkpoint {path} is not a PyTorch checkpoint that can be read safely (weights_only=True): "
        f"not a torch.save file, or an old-format one holding Python objects; {fix}"
    )


#: ``torch.serialization.MAGIC_NUMBER`` as pickled at the start of a legacy (non-zip) file.
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def is_torch_save_file(path: Path) -> bool:
    """Whether ``path`` looks like a ``torch.save`` file: the zip format (torch >= 1.6) or the
    legacy pickle format (its magic number within the first bytes)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return _LEGACY_MAGIC in f.read(64)


def load_pth(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on CPU, also accepting timm train checkpoints
    (``argparse.Namespace`` under ``"args"``).

    Raises:
        ClassifierError: the file holds other Python objects, is not a checkpoint, or cannot be
            read (truncated, unreadable).
    """
    try:
        if not is_torch_save_file(path):
            raise ClassifierError(
                f"checkpoint {path} is not a PyTorch checkpoint (neither a torch.save file nor "
                "safetensors); give a .safetensors, .pth or .pth.tar file"
            )
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise unsafe_checkpoint_error(path) from exc
    except (OSError, RuntimeError, EOFError) as exc:  # truncated zip, unreadable file
        raise ClassifierError(f"cannot read checkpoint {path}: {exc}") from exc


def labels_from_checkpoint(path: Path) -> list[str] | None:
    """Class names stored in a checkpoint, or ``None``.

    safetensors: a metadata entry (``label_names``...) holding a JSON list of str. ``.pth``: a
    top-level dict key holding a list of str (loaded with :func:`load_pth`).

    Raises:
        ClassifierError: unreadable or unsafe checkpoint, or label metadata that is not a JSON
            list of str.
    """
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except SafetensorError as exc:
            raise ClassifierError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
        for key in LABEL_KEYS:
            if key in meta:
                try:
                    names = json.loads(meta[key])
                except json.JSONDecodeError as exc:
                    raise ClassifierError(f"checkpoint {path}: metadata {key!r} is not JSON: {exc}") from exc
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ClassifierError(f"checkpoint {path}: metadata {key!r} is not a JSON list of class names")
                return names
        return None
    obj = load_pth(path)
    if isinstance(obj, dict):
        for key in LABEL_KEYS:
            names = obj.get(key)
            if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
                return list(names)
    return None


@torch.inference_mode()
def pre_logit_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``model.forward_head(model.forward_features(pixels), pre_logits=True)`` as (N, F) float32
    on CPU: a timm model's pooled features just before its classifier (timm's ``forward_head``
    contract, e.g. global pool (+ norm for ConvNeXt), no dropout in eval mode), so that
    ``model.get_classifier()(features)`` is the model's logits."""
    feats = model.forward_head(model.forward_features(pixels), pre_logits=True)
    return feats.float().flatten(1).cpu()


@dataclass
class Stage1Classifier:
    """A loaded timm classifier.

    Attributes:
        model: the timm ``nn.Module`` in eval mode, mapping (N, 3, H, W) float32 -> (N, C) logits.
        labels: C class names in logit order.
        transform: timm eval transform, PIL RGB image -> (3, H, W) float32 tensor.
        device: where the model runs.
        model_id: architecture name (or ``hf-hub:`` id).
        model_version: ``"<checkpoint digest or 'pretrained'>-labels<8 hex>"``: a new file, or
            new class names (order included), is a new version.
        batch_size: photos per forward.
        data_config: the model's preprocessing as ``timm.data.resolve_data_config`` gives it
            (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``);
            ``timm.data.create_transform(**data_config)`` rebuilds :attr:`transform`, which is how
            DataLoader workers get it without pickling the model
            (:mod:`catreview.predict.loader`).
    """

    model: torch.nn.Module
    labels: list[str]
    transform: Callable[[Image.Image], torch.Tensor]
    device: torch.device
    model_id: str
    model_version: str
    batch_size: int = 32
    data_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        model_name: str,
        *,
        checkpoint: str | Path | None = None,
        labels_file: str | Path | None = None,
        device: str = "auto",
        batch_size: int = 32,
    ) -> Stage1Classifier:
        """Create ``model_name`` through timm and load ``checkpoint`` (if given).

        Class names come from ``labels_file`` (one per line) or else the checkpoint. With an
        ``hf-hub:`` id and no checkpoint, the hub weights and their label names are used; a
        plain timm name needs a checkpoint (it would have random weights).

        Raises:
            ClassifierError: unknown architecture, no checkpoint for a plain timm name,
                missing/unreadable checkpoint, a pickled
                checkpoint holding Python objects other than tensors, plain containers and
                ``argparse.Namespace`` (convert it to safetensors), no class names, or a
                checkpoint whose head does not match the number of class names.
        """
        ckpt = Path(checkpoint) if checkpoint else None
        if ckpt is not None and not ckpt.is_file():
            raise ClassifierError(f"classifier checkpoint not found: {ckpt}")
        # Reads the checkpoint once ourselves, so an unsafe or unreadable file gets a clear
        # error before timm (whose message would suggest weights_only=False).
        ckpt_labels = labels_from_checkpoint(ckpt) if ckpt is not None else None
        labels: list[str] | None = read_label_file(labels_file) if labels_file else ckpt_labels
        is_hub = model_name.startswith("hf-hub:")
        if labels is None and not is_hub:
            raise ClassifierError(
                "no class names: give classifier.labels_file (one name per line, logit order) "
                "or a checkpoint with 'label_names' metadata"
            )
        if not is_hub and not timm.is_model(model_name):
            raise ClassifierError(f"timm has no architecture named {model_name!r}")
        if ckpt is None and not is_hub:
            raise ClassifierError(
                f"classifier {model_name!r} has no checkpoint: a timm architecture name alone gives random "
                "weights; set classifier.checkpoint (your trained .safetensors/.pth) or use an hf-hub: id"
            )
        kwargs: dict[str, object] = {}
        if labels is not None:
            kwargs["num_classes"] = len(labels)
        try:
            with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
                if ckpt is not None:
                    model = timm.create_model(model_name, pretrained=False, checkpoint_path=str(ckpt), **kwargs)
                else:
                    model = timm.create_model(model_name, pretrained=is_hub, **kwargs)
        except pickle.UnpicklingError as exc:  # timm versions that do not translate it
            if ckpt is not None:
                raise unsafe_checkpoint_error(ckpt) from exc
            raise ClassifierError(
                f"the hub weights of {model_name!r} hold Python objects that are not loaded, for safety"
            ) from exc
        except RuntimeError as exc:  # size mismatch of the head, missing keys
            raise ClassifierError(
                f"checkpoint {ckpt} does not fit {model_name} with {kwargs.get('num_classes')} classes: {exc}"
            ) from exc
        except (OSError, SafetensorError) as exc:  # hub unreachable offline, unreadable file
            raise ClassifierError(f"cannot load classifier {model_name!r}: {exc}") from exc
        if labels is None:
            labels = list(getattr(model, "pretrained_cfg", {}).get("label_names") or [])
            if len(labels) != model.num_classes:
                raise ClassifierError(f"{model_name}: give classifier.labels_file; the hub config has no class names")
        dev = resolve_device(device)
        model.eval().to(dev)
        data_cfg = timm.data.resolve_data_config({}, model=model)
        transform = timm.data.create_transform(**data_cfg)
        weights = sha256_file(ckpt)[:12] if ckpt is not None else "pretrained"  # 12 hex of the file's sha256
        # The class names are part of the output: a corrected labels file is a new version.
        names = hashlib.sha256("\n".join(labels).encode("utf-8")).hexdigest()[:8]
        return cls(model, labels, transform, dev, model_name, f"{weights}-labels{names}", batch_size, dict(data_cfg))

    @classmethod
    def from_config(cls, cfg: ClassifierConfig, *, model_name: str | None = None) -> Stage1Classifier:
        """Load from a :class:`ClassifierConfig` (``model_name`` overrides ``cfg.model``)."""
        name = model_name or cfg.model
        if name is None:
            raise ClassifierError("classifier.model is not set")
        return cls.load(
            name, checkpoint=cfg.checkpoint, labels_file=cfg.labels_file, device=cfg.device, batch_size=cfg.batch_size
        )

    @torch.inference_mode()
    def forward_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of one preprocessed batch: ``pixels`` (N, 3, H, W) float32 as :attr:`transform`
        makes them (on CPU, pinned or not, or already on :attr:`device`) -> (N, C) float32 on CPU.

        The copy to the device is ``non_blocking`` (it overlaps when ``pixels`` is in pinned
        memory, as the stage-1 DataLoader gives it on CUDA).
        """
        return self.model(pixels.to(self.device, non_blocking=True)).float().cpu()

    @torch.inference_mode()
    def features_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features of one preprocessed batch: (N, 3, H, W) float32 -> (N, F)
        float32 on CPU (:func:`pre_logit_features`); the head maps them to :meth:`forward_batch`'s logits."""
        return pre_logit_features(self.model, pixels.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Logits for RGB images, batched by ``batch_size``: (N, C) float32 on CPU."""
        out = []
        for i in range(0, len(images), self.batch_size):
            out.append(self.forward_batch(torch.stack([self.transform(im) for im in images[i : i + self.batch_size]])))
        if not out:
            return torch.empty(0, len(self.labels))
        return torch.cat(out)

    def topk_from_logits(self, logits: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
        """Top-``k`` (label, softmax probability) pairs per row of ``logits`` (N, C), most
        probable first; ``k`` is capped at C. Probabilities are over all C classes (so the k
        values sum to <= 1)."""
        if logits.shape[0] == 0:
            return []
        probs = torch.softmax(logits.float(), dim=-1)
        values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return [
            [(self.labels[j], float(p)) for p, j in zip(vals.tolist(), idx.tolist())]
            for vals, idx in zip(values, indices)
        ]

    def topk(self, images: Sequence[Image.Image], k: int = 3) -> list[list[tuple[str, float]]]:
        """Top-``k`` (label, softmax probability) pairs per image, most probable first
        (:meth:`topk_from_logits` of :meth:`logits`)."""
        if not images:
            return []
        return self.topk_from_logits(self.logits(images), k)
