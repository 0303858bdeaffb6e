"""LoRA adapter versions: storage, activation, rollback, listing.

Every finished training round becomes a **version**: its ``best/`` adapter is copied to
``settings.data_dir / "adapters" / <name>`` (``<UTC time>-<8 hex of the files' sha256>``) and an
:class:`~catreview.data.db.AdapterVersion` row records the base model, the export's content hash, the
hyper-parameters (``hyperparams_json`` = :class:`catreview.adapters.train_config.TrainConfig`) and the metrics
(``metrics_json``: validation balanced accuracy, accuracy, macro-F1, loss, per-breed accuracy of
the selected checkpoint; the step-0 / baseline validation numbers; ``test`` and
``reference_test``, the held-out test metrics the gate used; the gate decision).

Rules:

* **Folder before row.** The files are copied to a temporary folder and renamed into place before
  the row is inserted, so a row never points at a partial folder; a kill before the insert leaves
  at most an unreferenced folder.
* **At most one active version per base model**, flipped by a single ``UPDATE`` (one statement,
  one transaction): :func:`activate`, :func:`deactivate` ("no adapter"), :func:`rollback` (either).
  Predictions pick the change up at their next call: :class:`catreview.models.registry.ModelRegistry`
  asks :func:`active_adapter` and the VLM's ``model_version`` (the cache key) includes the
  adapter's file hash, so old and new predictions never mix and a rollback reuses the cached
  predictions of the version it returns to.
* **Gating** (:func:`catreview.adapters.gate.gate`) and turning a finished round into a version
  (:func:`catreview.adapters.rounds.register_round`) live in their own modules; a version the gate
  did not pass stays inactive and a person may still promote it (:func:`activate`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.config import Settings
from catreview.data.db import AdapterVersion, SplitAssignment, active_adapter_version
from catreview.errors import CatreviewError

ADAPTERS_DIRNAME = "adapters"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterError(CatreviewError, ValueError):
    """An adapter operation that cannot be done (unknown id, incomplete folder, wrong base model)."""


def adapters_root(settings: Settings) -> Path:
    """``settings.data_dir / "adapters"`` (created)."""
    root = Path(settings.data_dir) / ADAPTERS_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    return root


def is_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds a loadable peft adapter (config + safetensors weights)."""
    return all((Path(folder) / f).is_file() for f in ADAPTER_FILES)


def folder_digest(folder: str | Path) -> str:
    """sha256 over the adapter files' names and bytes (what :func:`catreview.models.vlm.loading.adapter_identity`
    hashes too, up to encoding)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.startswith("adapter_")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def store_adapter_files(src: str | Path, root: str | Path) -> Path:
    """Copy the adapter in ``src`` to ``root/<UTC time>-<digest8>`` atomically; returns the folder.

    Only ``adapter_*`` files are copied. The copy goes to a hidden temporary folder that is renamed
    into place when complete.

    Raises:
        AdapterError: ``src`` is not a complete adapter folder.
    """
    src, root = Path(src), Path(root)
    if not is_complete(src):
        raise AdapterError(f"{src} is not a complete adapter folder (needs {', '.join(ADAPTER_FILES)})")
    name = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{folder_digest(src)[:8]}"
    final = root / name
    if final.exists():
        return final  # same files stored within the same second
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name.startswith("adapter_"):
            shutil.copyfile(f, tmp / f.name)
    tmp.rename(final)
    return final


def register_version(
    session: Session,
    folder: str | Path,
    *,
    base_model: str,
    export_hash: str,
    hyperparams: dict[str, Any],
    metrics: dict[str, Any],
) -> AdapterVersion:
    """Add an inactive :class:`AdapterVersion` row for an already stored, complete ``folder``
    (flushed, not committed: the caller's transaction decides).

    Raises:
        AdapterError: the folder is incomplete.
    """
    if not is_complete(folder):
        raise AdapterError(f"refusing to register {folder}: the adapter folder is incomplete")
    row = AdapterVersion(
        base_model=base_model,
        path=str(Path(folder).resolve()),
        export_hash=export_hash,
        hyperparams_json=json.dumps(hyperparams, sort_keys=True),
        metrics_json=json.dumps(metrics),
        active=False,
    )
    session.add(row)
    session.flush()
    return row


def flip_active(session: Session, base_model: str, adapter_id: int | None) -> None:
    """One UPDATE: ``active = (id == adapter_id)`` for every version of ``base_model``."""
    value = (AdapterVersion.id == adapter_id) if adapter_id is not None else False
    stmt = update(AdapterVersion).where(col(AdapterVersion.base_model) == base_model).values(active=value)
    session.exec(stmt)


def activate(engine: Engine, adapter_id: int) -> AdapterVersion:
    """Make version ``adapter_id`` the active one for its base model (manual promote or rollback;
    no gate). Atomic: one transaction, one UPDATE.

    Raises:
        AdapterError: no such version, or its folder is missing/incomplete.
    """
    with Session(engine) as s:
        row = s.get(AdapterVersion, adapter_id)
        if row is None:
            raise AdapterError(f"no adapter version #{adapter_id}")
        if not is_complete(row.path):
            raise AdapterError(f"adapter version #{adapter_id}'s folder {row.path} is missing or incomplete")
        flip_active(s, row.base_model, adapter_id)
        s.commit()
        s.refresh(row)
        return row


def deactivate(engine: Engine, base_model: str) -> None:
    """ "No adapter": the base model predicts alone (atomic, one UPDATE)."""
    with Session(engine) as s:
        flip_active(s, base_model, None)
        s.commit()


def rollback(engine: Engine, base_model: str, to: int | None) -> AdapterVersion | None:
    """Return to version ``to`` of ``base_model``, or to no adapter with ``to=None``; one call.

    Raises:
        AdapterError: ``to`` is unknown or belongs to another base model.
    """
    if to is None:
        deactivate(engine, base_model)
        return None
    with Session(engine) as s:
        row = s.get(AdapterVersion, to)
        if row is None or row.base_model != base_model:
            raise AdapterError(f"adapter version #{to} does not exist for base model {base_model!r}")
    return activate(engine, to)


def training_photo_hashes(session: Session, adapter: str | Path | None) -> set[str] | None:
    """sha256 of the photos an adapter may have been trained on, or ``None`` when unknown.

    A photo counts when its sticky split (``split_assignments``) is ``train`` and was assigned
    no later than the adapter version was created: every export before then put it in train.
    ``None`` (unknown) for an adapter folder that no version of this database points to; an empty
    set for no adapter. Evaluations of an adapter (calibration, comparisons) leave these photos
    out: its outputs on them were fitted to the very labels they would be measured against.
    """
    if adapter is None:
        return set()
    row = session.exec(select(AdapterVersion).where(AdapterVersion.path == str(adapter))).first()
    if row is None:
        return None
    q = select(SplitAssignment.sha256).where(
        SplitAssignment.split == "train", SplitAssignment.assigned_at <= row.created_at
    )
    return set(session.exec(q))


def active_version(engine_or_session: Engine | Session, base_model: str) -> AdapterVersion | None:
    """The active version of ``base_model`` or ``None``."""
    if isinstance(engine_or_session, Session):
        return active_adapter_version(engine_or_session, base_model)
    with Session(engine_or_session) as s:
        return active_adapter_version(s, base_model)


def active_adapter(engine: Engine, base_model: str) -> Path | None:
    """Folder of the active adapter of ``base_model`` (for :class:`VLMProfile.adapter`), or ``None``."""
    row = active_version(engine, base_model)
    return Path(row.path) if row is not None else None


def list_versions(engine: Engine, base_model: str | None = None) -> list[AdapterVersion]:
    """Versions, newest first (all base models unless one is given)."""
    q = select(AdapterVersion).order_by(AdapterVersion.id.desc())  # type: ignore[union-attr]
    if base_model is not None:
        q = q.where(AdapterVersion.base_model == base_model)
    with Session(engine) as s:
        return list(s.exec(q))


def version_rows(engine: Engine, base_model: str | None = None) -> list[dict[str, Any]]:
    """Flat rows for tables: id, active, name, created, val balanced accuracy / accuracy / loss,
    test balanced accuracy of the version and of the reference it was gated against, gate outcome
    (``passed`` / ``blocked`` / ``not gated`` / ``-``), export hash (12 hex), rank/lr/epochs."""
    rows = []
    for v in list_versions(engine, base_model):
        m = json.loads(v.metrics_json or "{}")
        hp = json.loads(v.hyperparams_json or "{}")
        g = m.get("gate") or {}
        rows.append(
            {
                "id": v.id,
                "active": bool(v.active),
                "name": Path(v.path).name,
                "created": v.created_at.strftime("%Y-%m-%d %H:%M"),
                "val_balanced_accuracy": m.get("balanced_accuracy"),
                "val_accuracy": m.get("accuracy"),
                "val_loss": m.get("val_loss"),
                "test_balanced_accuracy": (m.get("test") or {}).get("balanced_accuracy"),
                "reference_test_balanced_accuracy": (m.get("reference_test") or {}).get("balanced_accuracy"),
                "gate": _gate_outcome(g),
                "export": v.export_hash[:12],
                "rank": hp.get("rank"),
                "lr": hp.get("lr"),
                "epochs": hp.get("epochs"),
            }
        )
    return rows


def _gate_outcome(g: dict[str, Any]) -> str:
    if not g:
        return "-"
    if g.get("passed"):
        return "passed"
    return "blocked" if g.get("gated", True) else "not gated"


def version_metrics(engine: Engine, adapter_id: int) -> dict[str, Any]:
    """The stored metrics of one version (``{}`` when none).

    Raises:
        AdapterError: no such version.
    """
    with Session(engine) as s:
        row = s.get(AdapterVersion, adapter_id)
        if row is None:
            raise AdapterError(f"no adapter version #{adapter_id}")
        return json.loads(row.metrics_json or "{}")


__all__ = [
    "ADAPTERS_DIRNAME",
    "ADAPTER_FILES",
    "AdapterError",
    "activate",
    "active_adapter",
    "active_version",
    "adapters_root",
    "deactivate",
    "flip_active",
    "folder_digest",
    "is_complete",
    "list_versions",
    "register_version",
    "rollback",
    "store_adapter_files",
    "training_photo_hashes",
    "version_metrics",
    "version_rows",
]
