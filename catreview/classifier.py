"""Stage 1: a timm image classifier (the users' ConvNeXt) giving top-k breeds with probabilities.

Loading goes through timm only (``timm.create_model`` with ``checkpoint_path``, which reads
safetensors and ``.pth``/``.pth.tar`` state dicts, timm train checkpoints with EMA weights,
``module.``/``_orig_mod.`` prefixes, always with ``weights_only=True``). Preprocessing comes from
the model's own pretrained config (``timm.data.resolve_data_config`` +
``timm.data.create_transform``), never from hand-written mean/std.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors import safe_open

from catreview.config import ClassifierConfig
from catreview.labels import read_label_file


class ClassifierError(RuntimeError):
    """A stage-1 model that cannot be loaded; the message says what to fix."""


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


def labels_from_checkpoint(path: Path) -> list[str] | None:
    """Class names stored in a checkpoint, or ``None``.

    safetensors: a metadata entry (``label_names``...) holding a JSON list. ``.pth``: a top-level
    dict key holding a list of str (loaded with ``weights_only=True``).
    """
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        for key in LABEL_KEYS:
            if key in meta:
                return list(json.loads(meta[key]))
        return None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in LABEL_KEYS:
            names = obj.get(key)
            if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
                return list(names)
    return None


def file_digest(path: Path, n: int = 12) -> str:
    """First ``n`` hex digits of a file's sha256 (the model version of a checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:n]


@dataclass
class Stage1Classifier:
    """A loaded timm classifier.

    Attributes:
        model: the timm ``nn.Module`` in eval mode, mapping (N, 3, H, W) float32 -> (N, C) logits.
        labels: C class names in logit order.
        transform: timm eval transform, PIL RGB image -> (3, H, W) float32 tensor.
        device: where the model runs.
        model_id: architecture name (or ``hf-hub:`` id).
        model_version: checkpoint digest (or ``"pretrained"``); a new file is a new version.
    """

    model: torch.nn.Module
    labels: list[str]
    transform: object
    device: torch.device
    model_id: str
    model_version: str
    batch_size: int = 32

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
        ``hf-hub:`` id and no checkpoint, the hub weights and their label names are used.

        Raises:
            ClassifierError: unknown architecture, missing/unreadable checkpoint, no class
                names, or a checkpoint whose head does not match the number of class names.
        """
        ckpt = Path(checkpoint) if checkpoint else None
        if ckpt is not None and not ckpt.is_file():
            raise ClassifierError(f"classifier checkpoint not found: {ckpt}")
        labels: list[str] | None = None
        if labels_file:
            labels = read_label_file(labels_file)
        elif ckpt is not None:
            labels = labels_from_checkpoint(ckpt)
        is_hub = model_name.startswith("hf-hub:")
        if labels is None and not is_hub:
            raise ClassifierError(
                "no class names: give classifier.labels_file (one name per line, logit order) "
                "or a checkpoint with 'label_names' metadata"
            )
        if not is_hub and not timm.is_model(model_name):
            raise ClassifierError(f"timm has no architecture named {model_name!r}")
        kwargs: dict[str, object] = {}
        if labels is not None:
            kwargs["num_classes"] = len(labels)
        try:
            if ckpt is not None:
                model = timm.create_model(model_name, pretrained=False, checkpoint_path=str(ckpt), **kwargs)
            else:
                model = timm.create_model(model_name, pretrained=is_hub, **kwargs)
        except RuntimeError as exc:  # size mismatch of the head, missing keys
            raise ClassifierError(f"checkpoint {ckpt} does not fit {model_name} with {kwargs.get('num_classes')} classes: {exc}") from exc
        except OSError as exc:  # hub unreachable offline, unreadable file
            raise ClassifierError(f"cannot load classifier {model_name!r}: {exc}") from exc
        if labels is None:
            labels = list(getattr(model, "pretrained_cfg", {}).get("label_names") or [])
            if len(labels) != model.num_classes:
                raise ClassifierError(f"{model_name}: give classifier.labels_file; the hub config has no class names")
        dev = resolve_device(device)
        model.eval().to(dev)
        data_cfg = timm.data.resolve_data_config({}, model=model)
        transform = timm.data.create_transform(**data_cfg)
        version = file_digest(ckpt) if ckpt is not None else "pretrained"
        return cls(model, labels, transform, dev, model_name, version, batch_size)

    @classmethod
    def from_config(cls, cfg: ClassifierConfig, *, model_name: str | None = None) -> Stage1Classifier:
        """Load from a :class:`ClassifierConfig` (``model_name`` overrides ``cfg.model``)."""
        name = model_name or cfg.model
        if name is None:
            raise ClassifierError("classifier.model is not set")
        return cls.load(name, checkpoint=cfg.checkpoint, labels_file=cfg.labels_file, device=cfg.device, batch_size=cfg.batch_size)

    @torch.inference_mode()
    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Logits for RGB images, batched by ``batch_size``: (N, C) float32 on CPU."""
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self.transform(im) for im in images[i : i + self.batch_size]]).to(self.device)
            out.append(self.model(batch).float().cpu())
        if not out:
            return torch.empty(0, len(self.labels))
        return torch.cat(out)

    def topk(self, images: Sequence[Image.Image], k: int = 3) -> list[list[tuple[str, float]]]:
        """Top-``k`` (label, softmax probability) pairs per image, most probable first.

        Probabilities are over all C classes (so the k values sum to <= 1).
        """
        if not images:
            return []
        probs = torch.softmax(self.logits(images), dim=-1)
        values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return [
            [(self.labels[j], float(p)) for p, j in zip(vals.tolist(), idx.tolist())]
            for vals, idx in zip(values, indices)
        ]
