"""LoRA adapter versions: storage, gating, activation, rollback.

Every finished training round becomes a **version**: its ``best/`` adapter is copied to
``settings.data_dir / "adapters" / <name>`` (``<UTC time>-<8 hex of the files' sha256>``) and an
:class:`~catreview.db.AdapterVersion` row records the base model, the export's content hash, the
hyper-parameters (``hyperparams_json`` = :class:`training.config.TrainConfig`) and the metrics
(``metrics_json``: validation balanced accuracy, accuracy, macro-F1, loss, per-breed accuracy, the
step-0 / baseline numbers and the gate decision).

Rules:

* **Folder before row.** The files are copied to a temporary folder and renamed into place before
  the row is inserted, so a row never points at a partial folder; a kill before the insert leaves
  at most an unreferenced folder.
* **At most one active version per base model**, flipped by a single ``UPDATE`` (one statement,
  one transaction): :func:`activate`, :func:`deactivate` ("no adapter"), :func:`rollback` (either).
  Predictions pick the change up at their next call: :class:`catreview.registry.ModelRegistry`
  asks :func:`active_adapter` and the VLM's ``model_version`` (the cache key) includes the
  adapter's file hash, so old and new predictions never mix and a rollback reuses the cached
  predictions of the version it returns to.
* **Gating** (:func:`gate`): a new version is activated automatically only if, on the *same*
  validation items, its balanced accuracy is ``>=`` the reference's and no breed with at least
  ``min_val_photos`` validation photos loses more than ``max_breed_drop`` accuracy. The reference
  is the active version (evaluated by the round itself, ``result["baseline"]``) or, with no active
  version, the base model (the round's step-0 evaluation: an untrained LoRA adapter is the
  identity). Otherwise the version stays inactive, the per-breed comparison is stored and returned,
  and a person may still promote it (:func:`activate`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from catreview.config import Settings
from catreview.db import AdapterVersion, TrainingRun, utcnow
from training.files import RESULT_FILE  # written last by a finished round

ADAPTERS_DIRNAME = "adapters"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterError(ValueError):
    """An adapter operation that cannot be done (unknown id, incomplete folder, wrong base model)."""


# --------------------------------------------------------------------------------------------
# Gating
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatePolicy:
    """When a new adapter may replace the reference automatically.

    Attributes:
        min_val_photos: breeds with fewer validation photos than this are not checked for drops
            (their accuracy moves in steps of ``1 / n``; default 5).
        max_breed_drop: largest allowed fall of a checked breed's accuracy, absolute (default
            0.10 = 10 points).
    """

    min_val_photos: int = 5
    max_breed_drop: float = 0.10

    def __post_init__(self) -> None:
        if self.min_val_photos < 1 or not 0 <= self.max_breed_drop <= 1:
            raise ValueError(f"invalid gate policy {self}")

    def describe(self, reference: str = "the active one's") -> str:
        """The rule in words, for people: ``"its validation balanced accuracy is at least
        <reference> and no breed with at least 5 validation photos drops by more than 10
        points"`` (numbers from this policy; a point is one percentage point of accuracy)."""
        points = f"{100 * self.max_breed_drop:.4g}"
        photos = f"{self.min_val_photos} validation photo{'s' if self.min_val_photos != 1 else ''}"
        return (
            f"its validation balanced accuracy is at least {reference} and no breed with at least {photos} "
            f"drops by more than {points} point{'' if points == '1' else 's'}"
        )


@dataclass(frozen=True)
class BreedComparison:
    """One breed's validation accuracy, reference vs candidate (``None`` = breed absent)."""

    breed: str
    n: int
    reference: float | None
    candidate: float | None
    checked: bool
    blocking: bool

    @property
    def delta(self) -> float | None:
        if self.reference is None or self.candidate is None:
            return None
        return self.candidate - self.reference


@dataclass(frozen=True)
class GateDecision:
    """Outcome of :func:`gate`.

    Attributes:
        passed: may be activated automatically.
        reasons: why not (empty when passed).
        reference: what was compared against (``"adapter #3"``, ``"no adapter (base model)"``).
        reference_balanced_accuracy, candidate_balanced_accuracy: the two scores (``None`` when
            there was nothing to compare).
        breeds: per-breed comparison, sorted by breed.
    """

    passed: bool
    reasons: list[str]
    reference: str
    reference_balanced_accuracy: float | None
    candidate_balanced_accuracy: float | None
    breeds: list[BreedComparison] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """Table rows for the UI / CLI: breed, n, reference, candidate, delta, checked, blocking."""
        return [{**asdict(b), "delta": b.delta} for b in self.breeds]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["breeds"] = self.rows()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateDecision:
        breeds = [BreedComparison(**{k: v for k, v in b.items() if k != "delta"}) for b in d.get("breeds", [])]
        return cls(**{**d, "breeds": breeds})

    def summary(self) -> str:
        """One line for people."""
        head = f"candidate {_pct(self.candidate_balanced_accuracy)} vs {self.reference} {_pct(self.reference_balanced_accuracy)}"
        return f"gate passed ({head})" if self.passed else f"gate blocked ({head}): " + "; ".join(self.reasons)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def gate(candidate: dict[str, Any], reference: dict[str, Any], policy: GatePolicy = GatePolicy(), *, reference_name: str = "reference") -> GateDecision:
    """Compare two metric dicts measured on the same validation items.

    Args:
        candidate, reference: ``{"balanced_accuracy": float, "per_breed": {breed: {"n", "accuracy",
            ...}}}`` as written by :func:`training.lora.classification_metrics`.
        policy: thresholds.
        reference_name: how the reference is named in messages.

    Returns:
        :class:`GateDecision`; ``passed`` iff ``candidate >= reference`` in balanced accuracy and
        no checked breed (``n >= min_val_photos`` in the candidate's validation) drops by more
        than ``max_breed_drop``.
    """
    reasons = []
    cand_ba, ref_ba = float(candidate["balanced_accuracy"]), float(reference["balanced_accuracy"])
    if cand_ba < ref_ba:
        reasons.append(f"balanced accuracy fell from {_pct(ref_ba)} to {_pct(cand_ba)}")
    c_breeds, r_breeds = candidate.get("per_breed", {}), reference.get("per_breed", {})
    rows = []
    for breed in sorted(set(c_breeds) | set(r_breeds)):
        c, r = c_breeds.get(breed), r_breeds.get(breed)
        n = int((c or r)["n"])
        c_acc = None if c is None else float(c["accuracy"])
        r_acc = None if r is None else float(r["accuracy"])
        checked = c is not None and r is not None and n >= policy.min_val_photos
        blocking = checked and c_acc < r_acc - policy.max_breed_drop - 1e-12
        if blocking:
            reasons.append(f"{breed} ({n} photos) fell from {_pct(r_acc)} to {_pct(c_acc)}")
        rows.append(BreedComparison(breed, n, r_acc, c_acc, checked, blocking))
    return GateDecision(not reasons, reasons, reference_name, ref_ba, cand_ba, rows)


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def adapters_root(settings: Settings) -> Path:
    """``settings.data_dir / "adapters"`` (created)."""
    root = Path(settings.data_dir) / ADAPTERS_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    return root


def is_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds a loadable peft adapter (config + safetensors weights)."""
    return all((Path(folder) / f).is_file() for f in ADAPTER_FILES)


def folder_digest(folder: str | Path) -> str:
    """sha256 over the adapter files' names and bytes (what :func:`catreview.vlm.adapter_identity`
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
    name = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{folder_digest(src)[:8]}"
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
        base_model=base_model, path=str(Path(folder).resolve()), export_hash=export_hash,
        hyperparams_json=json.dumps(hyperparams, sort_keys=True), metrics_json=json.dumps(metrics), active=False,
    )
    session.add(row)
    session.flush()
    return row


# --------------------------------------------------------------------------------------------
# Activation and queries
# --------------------------------------------------------------------------------------------


def _flip(session: Session, base_model: str, adapter_id: int | None) -> None:
    """One UPDATE: ``active = (id == adapter_id)`` for every version of ``base_model``."""
    value = (AdapterVersion.id == adapter_id) if adapter_id is not None else False
    session.exec(update(AdapterVersion).where(AdapterVersion.base_model == base_model).values(active=value))  # type: ignore[call-overload]


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
        _flip(s, row.base_model, adapter_id)
        s.commit()
        s.refresh(row)
        return row


def deactivate(engine: Engine, base_model: str) -> None:
    """"No adapter": the base model predicts alone (atomic, one UPDATE)."""
    with Session(engine) as s:
        _flip(s, base_model, None)
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


def active_version(engine_or_session: Engine | Session, base_model: str) -> AdapterVersion | None:
    """The active version of ``base_model`` or ``None``."""
    q = select(AdapterVersion).where(AdapterVersion.base_model == base_model, AdapterVersion.active == True)  # noqa: E712
    if isinstance(engine_or_session, Session):
        return engine_or_session.exec(q).first()
    with Session(engine_or_session) as s:
        return s.exec(q).first()


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
    gate outcome, export hash (12 hex), rank/lr/epochs."""
    rows = []
    for v in list_versions(engine, base_model):
        m = json.loads(v.metrics_json or "{}")
        hp = json.loads(v.hyperparams_json or "{}")
        g = m.get("gate") or {}
        rows.append({
            "id": v.id,
            "active": bool(v.active),
            "name": Path(v.path).name,
            "created": v.created_at.strftime("%Y-%m-%d %H:%M"),
            "val_balanced_accuracy": m.get("balanced_accuracy"),
            "val_accuracy": m.get("accuracy"),
            "val_loss": m.get("val_loss"),
            "gate": "passed" if g.get("passed") else ("blocked" if g else "-"),
            "export": v.export_hash[:12],
            "rank": hp.get("rank"),
            "lr": hp.get("lr"),
            "epochs": hp.get("epochs"),
        })
    return rows


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


# --------------------------------------------------------------------------------------------
# A finished round -> a version (+ gate + activation), in one transaction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundOutcome:
    """What :func:`register_round` did: the new version's id, whether it is now active, and the
    gate decision (with the per-breed comparison)."""

    adapter_id: int
    activated: bool
    decision: GateDecision
    folder: Path


def _reference(session: Session, result: dict[str, Any]) -> tuple[dict[str, Any] | None, str, str | None]:
    """``(metrics, name, reason-if-none)`` of what a round's adapter is gated against."""
    current = active_version(session, result["base_model"])
    if current is None:
        return result.get("initial_metrics"), "no adapter (base model)", None
    baseline = result.get("baseline") or {}
    if baseline.get("adapter") and Path(baseline["adapter"]).resolve() == Path(current.path).resolve():
        return baseline["metrics"], f"adapter #{current.id}", None
    return None, f"adapter #{current.id}", (
        f"the active adapter #{current.id} was not evaluated on this round's validation photos "
        "(it was activated while the round ran); compare and promote by hand"
    )


def register_round(
    engine: Engine,
    settings: Settings,
    run_dir: str | Path,
    *,
    run_id: int | None = None,
    policy: GatePolicy = GatePolicy(),
    auto_activate: bool = True,
) -> RoundOutcome:
    """Turn a finished round (``run_dir/result.json``) into a version, gate it, maybe activate it.

    The adapter files are stored first (:func:`store_adapter_files`); then one transaction inserts
    the version, marks TrainingRun ``run_id`` succeeded and pointing at it, and -- when the gate
    passes and ``auto_activate`` -- flips the active flags.

    Raises:
        AdapterError: no ``result.json`` (the round did not finish) or no best adapter.
    """
    run_dir = Path(run_dir)
    result_file = run_dir / RESULT_FILE
    if not result_file.is_file():
        raise AdapterError(f"{run_dir} holds no finished round ({RESULT_FILE} is missing)")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    folder = store_adapter_files(run_dir / result["adapter_dir"], adapters_root(settings))
    with Session(engine) as s:
        reference, ref_name, why_not = _reference(s, result)
        if reference is None or result.get("metrics") is None:
            decision = GateDecision(False, [why_not or "no validation metrics to compare"], ref_name, None,
                                    (result.get("metrics") or {}).get("balanced_accuracy"))
        else:
            decision = gate(result["metrics"], reference, policy, reference_name=ref_name)
        metrics = {
            **result["metrics"],
            "best_step": result.get("best_step"),
            "initial": result.get("initial_metrics"),
            "baseline": (result.get("baseline") or {}).get("metrics"),
            "gate": decision.to_dict(),
            "gate_policy": asdict(policy),
            "run_dir": str(run_dir.resolve()),
            "steps": result.get("steps"),
            "samples_per_second": result.get("samples_per_second"),
        }
        row = register_version(
            s, folder, base_model=result["base_model"], export_hash=result["export_hash"],
            hyperparams=result["config"], metrics=metrics,
        )
        activated = decision.passed and auto_activate
        if activated:
            _flip(s, result["base_model"], row.id)
        if run_id is not None:
            run = s.get(TrainingRun, run_id)
            if run is not None:
                run.status, run.adapter_id, run.finished_at = "succeeded", row.id, utcnow()
                s.add(run)
        s.commit()
        return RoundOutcome(int(row.id), activated, decision, folder)  # type: ignore[arg-type]
