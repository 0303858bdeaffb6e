"""Stage-1 head versions: a folder per version and a row of the ``adapters`` table.

A version folder, ``settings.data_dir / "heads" / <backbone key> / <UTC time>-<8 hex>``, holds

* ``model.safetensors``: a FULL timm checkpoint (the frozen backbone + the fitted classifier,
  ``label_names`` metadata), loaded by exactly
  ``Stage1Classifier.load(model_id, checkpoint=folder / "model.safetensors")``, the code a user's
  checkpoint goes through;
* ``oof.safetensors``: out-of-fold probabilities of every labelled photo (:func:`load_oof`);
* ``head.json``: what was fitted on (counts, fold count, hyper-parameters).

It is written to a hidden temporary folder renamed into place before its row is inserted (folder
before row, as for adapters). Rows are :class:`catreview.data.db.AdapterVersion` with
``base_model = "stage1:<backbone key>"`` (:func:`catreview.models.stage1_builtin.head_base_model`),
so at most one version per backbone is active, flipped by one UPDATE
(:func:`catreview.adapters.versions.flip_active`); the registry loads the active one
(:meth:`catreview.models.registry.ModelRegistry.classifier`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.adapters.versions import flip_active
from catreview.config import Settings
from catreview.data.db import AdapterVersion
from catreview.errors import CatreviewError
from catreview.heads.fit import LinearHead, OutOfFold
from catreview.models.stage1_builtin import HEAD_CHECKPOINT, HEAD_PREFIX

HEADS_DIRNAME = "heads"
OOF_FILE = "oof.safetensors"
INFO_FILE = "head.json"
HEAD_FILES = (HEAD_CHECKPOINT, OOF_FILE, INFO_FILE)


class HeadVersionError(CatreviewError, ValueError):
    """A head-version operation that cannot be done (unknown id, incomplete folder, not a head)."""


def heads_root(settings: Settings, backbone_key: str) -> Path:
    """``settings.data_dir / "heads" / <backbone key>`` (created)."""
    root = Path(settings.data_dir) / HEADS_DIRNAME / backbone_key
    root.mkdir(parents=True, exist_ok=True)
    return root


def is_complete(folder: str | Path) -> bool:
    """Whether ``folder`` holds every file of a head version."""
    return all((Path(folder) / f).is_file() for f in HEAD_FILES)


def classifier_name(model: torch.nn.Module) -> str:
    """Module path of a timm model's classifier (its pretrained config's ``classifier``:
    ``"classifier"`` for EfficientNet, ``"head.fc"`` for ConvNeXt).

    Raises:
        HeadVersionError: the model's config names no classifier.
    """
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not isinstance(name, str) or not name:
        raise HeadVersionError(f"{type(model).__name__} has no classifier in its timm pretrained config")
    return name


def full_checkpoint(model: torch.nn.Module, head: LinearHead) -> dict[str, torch.Tensor]:
    """State dict of timm ``model`` with its classifier replaced by ``head``: the backbone's
    tensors (any old classifier's dropped) plus ``<classifier>.weight`` (C, F) and ``.bias`` (C,),
    float32, contiguous, on CPU; what ``reset_classifier(C)`` + setting ``weight``/``bias`` would
    save. ``model`` itself is not changed.

    Raises:
        HeadVersionError: the model's config names no classifier.
    """
    name = classifier_name(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(f"{name}.")}
    state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(head.weight, dtype=np.float32))
    state[f"{name}.bias"] = torch.from_numpy(np.ascontiguousarray(head.bias, dtype=np.float32))
    return state


def load_head(folder: str | Path, model: torch.nn.Module) -> LinearHead:
    """The head stored in a version's ``model.safetensors`` (only its classifier tensors are read),
    for a backbone like ``model``.

    Raises:
        HeadVersionError: the file lacks the classifier or its ``label_names``.
    """
    name = classifier_name(model)
    path = Path(folder) / HEAD_CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        if "label_names" not in meta or f"{name}.weight" not in keys:
            raise HeadVersionError(f"{path} is not a stage-1 head version (no {name}.weight or label_names)")
        weight = f.get_tensor(f"{name}.weight").float().numpy()
        bias = f.get_tensor(f"{name}.bias").float().numpy()
    return LinearHead(list(json.loads(meta["label_names"])), weight, bias)


def save_version(
    root: Path,
    model: torch.nn.Module,
    head: LinearHead,
    oof: OutOfFold,
    oof_image_ids: list[int],
    oof_sha256: list[str],
    info: dict[str, Any],
) -> Path:
    """Write a version folder under ``root`` atomically; returns it.

    Args:
        model: the frozen backbone's timm module (its own classifier, if any, is replaced in a copy).
        head: the fitted head (C labels).
        oof: out-of-fold probabilities, rows in the order of ``oof_image_ids`` / ``oof_sha256``.
        info: JSON-ready description stored as ``head.json``.
    """
    state = full_checkpoint(model, head)
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + state[k].numpy().tobytes())
    name = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{h.hexdigest()[:8]}"
    final = root / name
    if is_complete(final):
        return final
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / HEAD_CHECKPOINT), metadata={"label_names": json.dumps(head.labels)})
    save_file(
        {
            "image_ids": torch.tensor(oof_image_ids, dtype=torch.int64),
            "sha256": torch.frombuffer(bytearray(b"".join(bytes.fromhex(s) for s in oof_sha256)), dtype=torch.uint8)
            .reshape(-1, 32)
            .clone(),
            "probabilities": torch.from_numpy(np.ascontiguousarray(oof.probabilities, dtype=np.float32)),
            "folds": torch.from_numpy(np.ascontiguousarray(oof.folds, dtype=np.int64)),
        },
        str(tmp / OOF_FILE),
        metadata={"label_names": json.dumps(oof.labels)},
    )
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.rename(final)
    return final


@dataclass
class StoredOutOfFold:
    """Out-of-fold stage-1 probabilities stored with a head version (:func:`load_oof`).

    Attributes:
        image_ids: (N,) int64 ``images.id``.
        sha256: N content hashes (64 hex).
        probabilities: (N, C) float32, rows summing to 1.
        label_names: C class names, column order.
        folds: (N,) int64 fold of each photo (its row comes from a head fitted without that fold).
    """

    image_ids: np.ndarray
    sha256: list[str]
    probabilities: np.ndarray
    label_names: list[str]
    folds: np.ndarray


def load_oof(folder: str | Path) -> StoredOutOfFold:
    """Read a version's ``oof.safetensors`` (the input cleanlab's label-issue search takes:
    ``probabilities`` with the labels' column indices in ``label_names``).

    Raises:
        HeadVersionError: the file is missing or has no ``label_names`` metadata.
    """
    path = Path(folder) / OOF_FILE
    if not path.is_file():
        raise HeadVersionError(f"no out-of-fold probabilities at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "label_names" not in meta:
            raise HeadVersionError(f"{path} has no label_names metadata")
        shas = f.get_tensor("sha256").numpy()
        return StoredOutOfFold(
            image_ids=f.get_tensor("image_ids").numpy(),
            sha256=[bytes(s).hex() for s in shas],
            probabilities=f.get_tensor("probabilities").numpy(),
            label_names=list(json.loads(meta["label_names"])),
            folds=f.get_tensor("folds").numpy(),
        )


def register_head(
    session: Session,
    folder: Path,
    *,
    base_model: str,
    labels_hash: str,
    hyperparams: dict[str, Any],
    metrics: dict[str, Any],
) -> AdapterVersion:
    """Insert an inactive version row for a complete ``folder`` (flushed, not committed).

    Raises:
        HeadVersionError: the folder is incomplete or ``base_model`` is not a stage-1 key.
    """
    if not is_complete(folder):
        raise HeadVersionError(f"refusing to register {folder}: the head version folder is incomplete")
    if not base_model.startswith(HEAD_PREFIX):
        raise HeadVersionError(f"{base_model!r} is not a stage-1 backbone key ({HEAD_PREFIX}...)")
    row = AdapterVersion(
        base_model=base_model,
        path=str(folder.resolve()),
        export_hash=labels_hash,
        hyperparams_json=json.dumps(hyperparams, sort_keys=True),
        metrics_json=json.dumps(metrics),
        active=False,
    )
    session.add(row)
    session.flush()
    return row


def _head_row(session: Session, version_id: int) -> AdapterVersion:
    row = session.get(AdapterVersion, version_id)
    if row is None or not row.base_model.startswith(HEAD_PREFIX):
        raise HeadVersionError(f"no stage-1 head version #{version_id}")
    return row


def promote(engine: Engine, version_id: int) -> AdapterVersion:
    """Make head version ``version_id`` the active one of its backbone (by hand, no gate; one UPDATE).

    Raises:
        HeadVersionError: no such head version, or its folder is missing/incomplete.
    """
    with Session(engine) as s:
        row = _head_row(s, version_id)
        if not is_complete(row.path):
            raise HeadVersionError(f"head version #{version_id}'s folder {row.path} is missing or incomplete")
        flip_active(s, row.base_model, version_id)
        s.commit()
        s.refresh(row)
        return row


def no_version(engine: Engine, base_model: str) -> None:
    """ "No version": no head of this backbone is active (the built-in backbone then has no
    stage-1 model; a user's checkpoint predicts with its own head). One UPDATE."""
    with Session(engine) as s:
        flip_active(s, base_model, None)
        s.commit()


def rollback(engine: Engine, base_model: str, to: int | None) -> AdapterVersion | None:
    """Return to head version ``to`` of ``base_model``, or to no version with ``to=None``.

    Raises:
        HeadVersionError: ``to`` is unknown or belongs to another backbone.
    """
    if to is None:
        no_version(engine, base_model)
        return None
    with Session(engine) as s:
        row = _head_row(s, to)
        if row.base_model != base_model:
            raise HeadVersionError(f"head version #{to} belongs to {row.base_model!r}, not {base_model!r}")
    return promote(engine, to)


def list_heads(engine: Engine, base_model: str) -> list[AdapterVersion]:
    """Head versions of ``base_model``, newest first."""
    q = select(AdapterVersion).where(AdapterVersion.base_model == base_model).order_by(col(AdapterVersion.id).desc())
    with Session(engine) as s:
        return list(s.exec(q))


def head_rows(engine: Engine, base_model: str) -> list[dict[str, Any]]:
    """Flat rows for tables: id, active, name, created, photos fitted on, test balanced accuracy
    of the version and of the reference it was gated against, gate outcome."""
    out = []
    for v in list_heads(engine, base_model):
        m = json.loads(v.metrics_json or "{}")
        g = m.get("gate") or {}
        outcome = (
            "-" if not g else ("passed" if g.get("passed") else ("blocked" if g.get("gated", True) else "not gated"))
        )
        out.append(
            {
                "id": v.id,
                "active": bool(v.active),
                "name": Path(v.path).name,
                "created": v.created_at.strftime("%Y-%m-%d %H:%M"),
                "train_photos": m.get("n_train"),
                "test_balanced_accuracy": (m.get("test") or {}).get("balanced_accuracy"),
                "reference_test_balanced_accuracy": (m.get("reference_test") or {}).get("balanced_accuracy"),
                "gate": outcome,
            }
        )
    return out


__all__ = [
    "HEADS_DIRNAME",
    "HEAD_FILES",
    "INFO_FILE",
    "OOF_FILE",
    "HeadVersionError",
    "StoredOutOfFold",
    "classifier_name",
    "full_checkpoint",
    "head_rows",
    "heads_root",
    "is_complete",
    "list_heads",
    "load_head",
    "load_oof",
    "no_version",
    "promote",
    "register_head",
    "rollback",
    "save_version",
]


def stage1_training_hashes(session: Session, model_id: str, model_version: str) -> set[str] | None:
    """sha256 of the photos the stage-1 version ``model_version`` was fitted on: the ``train`` split
    of the head version whose checkpoint it is (:func:`catreview.adapters.versions.training_photo_hashes`),
    else an empty set (a checkpoint not fitted on this database's reviews: the user's own, the
    demo one). The :data:`catreview.evaluate.report.Stage1Trained` callback of the evaluation report.

    ``model_version`` is ``"<12 hex of the checkpoint's sha256>-labels<8 hex>"``
    (:class:`catreview.models.classifier.Stage1Classifier`); each head checkpoint is hashed once
    per process (tens of MB each).
    """
    from catreview.adapters.versions import training_photo_hashes

    digest = model_version.split("-labels", 1)[0]
    rows = session.exec(select(AdapterVersion).where(col(AdapterVersion.base_model).startswith(HEAD_PREFIX)))
    for row in rows:
        ckpt = Path(row.path) / HEAD_CHECKPOINT
        if ckpt.is_file():
            st = ckpt.stat()
            if _checkpoint_digest(str(ckpt), st.st_mtime_ns, st.st_size) == digest:
                return training_photo_hashes(session, row.path)
    return set()


@functools.lru_cache(maxsize=256)
def _checkpoint_digest(path: str, mtime_ns: int, size: int) -> str:
    """12 hex of a head checkpoint's sha256, as in its ``model_version``; hashed once per file
    version (``mtime_ns``/``size`` are the cache key's guard against a rewritten file)."""
    from catreview.files import sha256_file

    return sha256_file(Path(path))[:12]
