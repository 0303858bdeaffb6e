"""Built-in demo models: used when no classifier or VLM is configured.

They are built once, offline, into ``Settings.demo_dir`` and then loaded through exactly the same
code as real checkpoints (:meth:`Stage1Classifier.load` with a safetensors file;
``from_pretrained`` on a folder for the VLM). Their weights are random: predictions are
meaningless, and the UI says so.

- stage 1: timm ``convnext_atto`` (3.4M params), 67 classes of ``assets/breeds67.txt``, saved as
  ``classifier/model.safetensors`` with the class names in the safetensors metadata.
- stage 2: a tiny LLaVA-1.5 (:func:`catreview.models.tiny_llava.build_tiny_llava`, size ``"demo"``).
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from filelock import FileLock
from safetensors.torch import save_file

from catreview.config import ConfigError
from catreview.data.labels import BREEDS67_FILE, read_label_file

#: Bump when the demo models' recipe changes, so caches built by older code are rebuilt.
DEMO_RECIPE_VERSION = "2"
DEMO_CLASSIFIER_ARCH = "convnext_atto"


@dataclass(frozen=True)
class DemoModels:
    """Paths of the built demo models."""

    classifier_arch: str
    classifier_checkpoint: Path
    vlm_dir: Path


def build_demo_classifier(out_file: Path, labels: list[str], seed: int = 0) -> Path:
    """Save a randomly initialised ``convnext_atto`` with ``len(labels)`` classes as safetensors.

    The class names go into the metadata key ``label_names`` (JSON list), which
    :func:`catreview.models.classifier.labels_from_checkpoint` reads.
    """
    torch.manual_seed(seed)
    model = timm.create_model(DEMO_CLASSIFIER_ARCH, pretrained=False, num_classes=len(labels))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_file), metadata={"label_names": json.dumps(labels), "arch": DEMO_CLASSIFIER_ARCH})
    return out_file


#: Written first into every demo build, so a folder holding it is ours to replace.
OWNER_MARKER = ".catreview-demo-models"
READY_MARKER = "READY.json"


def _recipe(demo_dir: Path) -> str | None:
    """Recipe version of the complete build in ``demo_dir``, or ``None`` (absent or unreadable marker)."""
    try:
        data = json.loads((demo_dir / READY_MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("recipe") if isinstance(data, dict) else None


def _check_replaceable(demo_dir: Path) -> None:
    """Refuse to touch a ``demo_dir`` that is not ours: absent, an empty folder, or a folder
    holding our ownership or ready marker (a build of an older recipe) may be replaced.

    Raises:
        ConfigError: ``demo_dir`` is a file, or a non-empty folder without our markers.
    """
    if not demo_dir.exists():
        return
    if not demo_dir.is_dir():
        raise ConfigError(f"demo_dir {demo_dir} is a file, not a folder; set demo_dir to a new or empty folder")
    if (demo_dir / OWNER_MARKER).is_file() or (demo_dir / READY_MARKER).is_file():
        return
    if any(demo_dir.iterdir()):
        raise ConfigError(
            f"demo_dir {demo_dir} holds files that are not catreview demo models (no {READY_MARKER}); "
            "refusing to replace it: set demo_dir to a new or empty folder"
        )


def _build_lock(demo_dir: Path) -> FileLock:
    """An exclusive lock (``filelock.FileLock`` on a hidden sibling file) serialising builds of
    ``demo_dir`` across processes and threads (a new lock object per call, so threads of one
    process wait for each other too); the atomic rename in :func:`_move_into_place` keeps builds
    whole in any case."""
    return FileLock(demo_dir.parent / f".{demo_dir.name}.lock")


def _move_into_place(build: Path, demo_dir: Path) -> None:
    """Rename the finished ``build`` to ``demo_dir`` (atomic). A complete build of this recipe
    that appeared there meanwhile wins and ``build`` is left for the caller to delete; an older
    build of ours is moved aside and deleted; anything else is refused."""
    try:
        build.rename(demo_dir)  # replaces nothing but an empty folder
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if _recipe(demo_dir) == DEMO_RECIPE_VERSION:
        return  # lost the race: use the winner's build
    _check_replaceable(demo_dir)
    old = Path(tempfile.mkdtemp(prefix=f".{demo_dir.name}.old-", dir=demo_dir.parent))
    demo_dir.rename(old / "build")
    build.rename(demo_dir)
    shutil.rmtree(old)


def ensure_demo_models(demo_dir: str | Path) -> DemoModels:
    """Build the demo models into ``demo_dir`` unless a complete build of this recipe is there.

    The build goes to a temporary folder beside ``demo_dir`` and is renamed into place, so an
    interrupted build never leaves a half-written cache, and two processes building at once
    both end up using one complete build. Only a folder that is ours (an older build, marked)
    or an empty one is ever replaced.

    Raises:
        ConfigError: ``demo_dir`` exists and is not a demo-model folder (it is left untouched).
    """
    from catreview.models.tiny_llava import build_tiny_llava

    demo_dir = Path(demo_dir)
    models = DemoModels(DEMO_CLASSIFIER_ARCH, demo_dir / "classifier" / "model.safetensors", demo_dir / "llava-tiny")
    if _recipe(demo_dir) == DEMO_RECIPE_VERSION:
        return models
    _check_replaceable(demo_dir)
    demo_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(demo_dir):
        if _recipe(demo_dir) == DEMO_RECIPE_VERSION:  # built by another process while we waited
            return models
        _check_replaceable(demo_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{demo_dir.name}.build-", dir=demo_dir.parent))
        try:
            (tmp / OWNER_MARKER).write_text("catreview demo models; safe to delete\n")
            build_demo_classifier(tmp / "classifier" / "model.safetensors", read_label_file(BREEDS67_FILE))
            build_tiny_llava(tmp / "llava-tiny", size="demo")
            (tmp / READY_MARKER).write_text(json.dumps({"recipe": DEMO_RECIPE_VERSION}))
            _move_into_place(tmp, demo_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return models
