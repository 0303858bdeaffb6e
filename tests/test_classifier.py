"""Stage 1: every checkpoint shape loads through timm, preprocessing from the model's config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from catreview.data.images import load_rgb
from catreview.models.classifier import ClassifierError, Stage1Classifier

LABELS = ["Bengal", "Persian", "Siamese", "Sphynx - Hairless Cat", "Maine Coon"]


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(3)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=len(LABELS)).eval()


@pytest.fixture(scope="module")
def photos(cats_dir: Path) -> list:
    return [load_rgb(p) for p in sorted((cats_dir / "Siamese").glob("*.jpg"))[:3]]


def _expected_logits(model: torch.nn.Module, images: list) -> torch.Tensor:
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg)
    with torch.inference_mode():
        return model(torch.stack([tf(im) for im in images]))


def _write_labels(path: Path) -> Path:
    path.write_text("\n".join(LABELS) + "\n")
    return path


def test_safetensors_with_label_metadata(tmp_path: Path, reference, photos) -> None:
    f = tmp_path / "m.safetensors"
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()},
        str(f),
        metadata={"label_names": json.dumps(LABELS)},
    )
    clf = Stage1Classifier.load("convnext_atto", checkpoint=f)
    assert clf.labels == LABELS
    torch.testing.assert_close(clf.logits(photos), _expected_logits(reference, photos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", ["plain", "wrapped_prefixed", "timm_train_ema"])
def test_pth_checkpoint_shapes(tmp_path: Path, reference, photos, shape: str) -> None:
    sd = reference.state_dict()
    if shape == "plain":
        obj, name = sd, "m.pth"
    elif shape == "wrapped_prefixed":  # DDP + torch.compile prefixes inside {"state_dict": ...}
        obj, name = {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, "m.pth"
    else:  # timm train script: state_dict + state_dict_ema (preferred by timm)
        noise = {k: v + 1.0 if v.is_floating_point() else v for k, v in sd.items()}
        obj, name = {"epoch": 3, "arch": "convnext_atto", "state_dict": noise, "state_dict_ema": sd}, "m.pth.tar"
    torch.save(obj, tmp_path / name)
    clf = Stage1Classifier.load(
        "convnext_atto", checkpoint=tmp_path / name, labels_file=_write_labels(tmp_path / "labels.txt")
    )
    torch.testing.assert_close(clf.logits(photos), _expected_logits(reference, photos), atol=1e-5, rtol=1e-5)
    weights, names = clf.model_version.split("-labels")
    assert len(weights) == 12 and len(names) == 8  # checkpoint digest + class-name digest


def test_topk_probabilities_and_batching(tmp_path: Path, reference, photos) -> None:
    torch.save(reference.state_dict(), tmp_path / "m.pth")
    clf = Stage1Classifier.load(
        "convnext_atto", checkpoint=tmp_path / "m.pth", labels_file=_write_labels(tmp_path / "l.txt"), batch_size=2
    )
    top = clf.topk(photos, k=3)
    probs = torch.softmax(_expected_logits(reference, photos), -1)
    for row, p in zip(top, probs):
        assert [lab for lab, _ in row] == [LABELS[i] for i in p.topk(3).indices]
        assert [v for _, v in row] == pytest.approx(p.topk(3).values.tolist(), abs=1e-5)
        assert row[0][1] >= row[1][1] >= row[2][1]
    one_by_one = [clf.topk([im], k=3)[0] for im in photos]
    for a, b in zip(top, one_by_one):
        assert [x for x, _ in a] == [x for x, _ in b]
        assert [x for _, x in a] == pytest.approx([x for _, x in b], abs=1e-5)


def test_loading_errors_are_clear(tmp_path: Path, reference) -> None:
    torch.save(reference.state_dict(), tmp_path / "m.pth")
    with pytest.raises(ClassifierError, match="no class names"):
        Stage1Classifier.load("convnext_atto", checkpoint=tmp_path / "m.pth")
    (tmp_path / "seven.txt").write_text("\n".join(f"c{i}" for i in range(7)))
    with pytest.raises(ClassifierError, match="does not fit"):
        Stage1Classifier.load("convnext_atto", checkpoint=tmp_path / "m.pth", labels_file=tmp_path / "seven.txt")
    with pytest.raises(ClassifierError, match="not found"):
        Stage1Classifier.load("convnext_atto", checkpoint=tmp_path / "nope.pth", labels_file=tmp_path / "seven.txt")
    with pytest.raises(ClassifierError, match="no architecture"):
        Stage1Classifier.load("convnext_nonexistent", labels_file=tmp_path / "seven.txt")


def test_preprocessing_comes_from_the_model_config(tmp_path: Path, reference) -> None:
    torch.save(reference.state_dict(), tmp_path / "m.pth")
    clf = Stage1Classifier.load(
        "convnext_atto", checkpoint=tmp_path / "m.pth", labels_file=_write_labels(tmp_path / "l.txt")
    )
    cfg = timm.data.resolve_data_config({}, model=clf.model)
    norm = next(t for t in clf.transform.transforms if type(t).__name__ == "Normalize")
    assert tuple(norm.mean.tolist() if hasattr(norm.mean, "tolist") else norm.mean) == pytest.approx(cfg["mean"])


def _train_checkpoint(reference: torch.nn.Module, **extra) -> dict:
    """What timm's train script (CheckpointSaver) writes: EMA weights preferred on load, and the
    run's ``argparse.Namespace`` under ``"args"``."""
    sd = reference.state_dict()
    noise = {k: v + 1.0 if v.is_floating_point() else v for k, v in sd.items()}
    args = argparse.Namespace(model="convnext_atto", lr=4e-3, epochs=30, model_ema=True, num_classes=len(LABELS))
    return {"arch": "convnext_atto", "epoch": 29, "state_dict": noise, "state_dict_ema": sd, "args": args, **extra}


def test_timm_train_checkpoint_with_namespace_args(tmp_path: Path, reference, photos) -> None:
    ckpt = tmp_path / "model_best.pth.tar"
    torch.save(_train_checkpoint(reference), ckpt)
    expected = _expected_logits(reference, photos)
    clf = Stage1Classifier.load("convnext_atto", checkpoint=ckpt, labels_file=_write_labels(tmp_path / "labels.txt"))
    torch.testing.assert_close(clf.logits(photos), expected, atol=1e-5, rtol=1e-5)
    # Without a labels file the checkpoint is read for class names: a clear error, not pickle's.
    with pytest.raises(ClassifierError, match="no class names"):
        Stage1Classifier.load("convnext_atto", checkpoint=ckpt)
    # ... and with them stored beside the weights it loads on its own.
    torch.save(_train_checkpoint(reference, label_names=LABELS), tmp_path / "named.pth.tar")
    clf = Stage1Classifier.load("convnext_atto", checkpoint=tmp_path / "named.pth.tar")
    assert clf.labels == LABELS
    torch.testing.assert_close(clf.logits(photos), expected, atol=1e-5, rtol=1e-5)


class _Unsafe:
    """A class weights_only=True must refuse to unpickle."""


@pytest.mark.parametrize("with_labels_file", [True, False])
def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path, reference, with_labels_file: bool) -> None:
    ckpt = tmp_path / "evil.pth"
    torch.save(_train_checkpoint(reference, extra=_Unsafe()), ckpt)
    labels = _write_labels(tmp_path / "labels.txt") if with_labels_file else None
    with pytest.raises(ClassifierError, match=r"_Unsafe.*safetensors") as info:
        Stage1Classifier.load("convnext_atto", checkpoint=ckpt, labels_file=labels)
    assert "weights_only=False" not in str(info.value)


def test_unreadable_checkpoints_give_classifier_errors(tmp_path: Path, reference) -> None:
    labels = _write_labels(tmp_path / "labels.txt")
    (tmp_path / "text.pth").write_text("this is not a checkpoint\n" * 20)
    with pytest.raises(ClassifierError, match="not a PyTorch checkpoint"):
        Stage1Classifier.load("convnext_atto", checkpoint=tmp_path / "text.pth", labels_file=labels)
    torch.save(reference.state_dict(), tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:5000])
    with pytest.raises(ClassifierError, match="cannot read checkpoint"):
        Stage1Classifier.load("convnext_atto", checkpoint=tmp_path / "cut.pth", labels_file=labels)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ClassifierError, match="not a readable safetensors file"):
        Stage1Classifier.load("convnext_atto", checkpoint=tmp_path / "bad.safetensors", labels_file=labels)


def test_cli_reports_an_unsafe_checkpoint_in_one_line(tmp_path: Path, reference, capsys) -> None:
    from catreview.cli import main as cli

    ckpt = tmp_path / "evil.pth"
    torch.save(_train_checkpoint(reference, extra=_Unsafe()), ckpt)
    labels = _write_labels(tmp_path / "labels.txt")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'demo_dir = "{tmp_path / "demo"}"\n[classifier]\nmodel = "convnext_atto"\ncheckpoint = "{ckpt}"\nlabels_file = "{labels}"\n'
    )
    assert cli.main(["predict", "--config", str(cfg), "--db", f"sqlite:///{tmp_path / 'c.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {ckpt} contains Python objects") and err.count("\n") == 1, err
    assert "safetensors" in err and "weights_only=False" not in err
