"""Built-in demo models: used when no classifier or VLM is configured.

They are built once, offline, into ``Settings.demo_dir`` and then loaded through exactly the same
code as real checkpoints (:meth:`Stage1Classifier.load` with a safetensors file;
``from_pretrained`` on a folder for the VLM). Their weights are random: predictions are
meaningless, and the UI says so.

- stage 1: timm ``convnext_atto`` (3.4M params), 67 classes of ``assets/breeds67.txt``, saved as
  ``classifier/model.safetensors`` with the class names in the safetensors metadata.
- stage 2: a tiny LLaVA-1.5 (:func:`catreview.tiny_vlms.build_tiny_llava`, size ``"demo"``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from catreview.labels import read_label_file, BREEDS67_FILE

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
    :func:`catreview.classifier.labels_from_checkpoint` reads.
    """
    torch.manual_seed(seed)
    model = timm.create_model(DEMO_CLASSIFIER_ARCH, pretrained=False, num_classes=len(labels))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_file), metadata={"label_names": json.dumps(labels), "arch": DEMO_CLASSIFIER_ARCH})
    return out_file


def ensure_demo_models(demo_dir: str | Path) -> DemoModels:
    """Build the demo models into ``demo_dir`` unless a complete build of this recipe is there.

    The build goes to a temporary folder beside ``demo_dir`` and is renamed into place, so an
    interrupted build never leaves a half-written cache.
    """
    from catreview.tiny_vlms import build_tiny_llava

    demo_dir = Path(demo_dir)
    marker = demo_dir / "READY.json"
    models = DemoModels(DEMO_CLASSIFIER_ARCH, demo_dir / "classifier" / "model.safetensors", demo_dir / "llava-tiny")
    if marker.is_file() and json.loads(marker.read_text()).get("recipe") == DEMO_RECIPE_VERSION:
        return models
    demo_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=demo_dir.parent))
    try:
        build_demo_classifier(tmp / "classifier" / "model.safetensors", read_label_file(BREEDS67_FILE))
        build_tiny_llava(tmp / "llava-tiny", size="demo")
        (tmp / "READY.json").write_text(json.dumps({"recipe": DEMO_RECIPE_VERSION}))
        if demo_dir.exists():
            shutil.rmtree(demo_dir)
        tmp.rename(demo_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return models
