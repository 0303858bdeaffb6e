"""LoRA adapter versions: storage, gating, activation, rollback.

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
* **Gating** (:func:`gate`) uses the export's **test** split, never the validation split: the
  round picks its best checkpoint (and stops early) on validation, and the best of several
  validation evaluations is optimistically biased against a reference evaluated once. So the
  round scores the selected adapter and the reference once each on the test photos, with the
  app's scorer, and a new version is activated automatically only if its test balanced accuracy
  is strictly higher than the reference's, also in at least ``min_p_better`` of the paired
  bootstrap resamples of the test photos (ties never pass), and no breed with at least
  ``min_breed_photos`` test photos loses more than ``max_breed_drop`` accuracy. The reference is
  the active version (scored by the round itself, ``result["baseline"]["test_metrics"]``) or, with
  no active version, the base model (``result["initial_test_metrics"]``, scored at step 0: an
  untrained LoRA adapter is the identity). With fewer than ``min_test_photos`` test photos there
  is no decision: "not enough test photos to gate; promote by hand". Whenever the gate does not
  pass, the version stays inactive, the per-breed comparison is stored and returned, and a person
  may still promote it (:func:`activate`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from catreview.adapters.runfolder import RESULT_FILE  # written last by a finished round
from catreview.config import Settings
from catreview.data.db import AdapterVersion, SplitAssignment, TrainingRun, utcnow
from catreview.errors import CatreviewError

ADAPTERS_DIRNAME = "adapters"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterError(CatreviewError, ValueError):
    """An adapter operation that cannot be done (unknown id, incomplete folder, wrong base model)."""


# --------------------------------------------------------------------------------------------
# Gating
# --------------------------------------------------------------------------------------------

#: Keys of a metrics dict that hold one entry per scored photo (in the same order): what the
#: paired bootstrap resamples. Stripped from the metrics stored with a version (only the round's
#: ``result.json`` keeps them).
PER_PHOTO_KEYS = ("photos", "truth", "predicted")


@dataclass(frozen=True)
class GatePolicy:
    """When a new adapter may replace the reference automatically.

    The gate decides on the round's **test** split, which model selection (best checkpoint, early
    stopping: validation) never saw; candidate and reference are each scored once on the same test
    photos (see :func:`gate`).

    Attributes:
        min_breed_photos: breeds with fewer test photos than this are not checked for drops
            (their accuracy moves in steps of ``1 / n``; default 5).
        max_breed_drop: largest allowed fall of a checked breed's test accuracy, absolute
            (default 0.10 = 10 points).
        min_test_photos: fewest test photos the gate decides on (default 20); with fewer the
            version is not gated, not activated, and left for promotion by hand.
        min_p_better: share of paired bootstrap resamples of the test photos in which the
            candidate's balanced accuracy must be strictly higher than the reference's
            (default 0.9).
        n_bootstrap: bootstrap resamples (default 1000).
        seed: seed of the resampling (default 0: the same photos give the same decision).

    Why 0.9: simulated on 10 breeds x 20 test photos with per-photo outcomes drawn independently
    (or half shared), an equally good candidate passes 12-13% of the time (0.8: 21-25%, the old
    rule ">=" on best-of-N validation: 87%), a worse one (57% vs 60%) 1-3%, a better one (+5
    points) 39-57% and (+10 points) 83-93%. A blocked version can still be promoted by hand.
    """

    min_breed_photos: int = 5
    max_breed_drop: float = 0.10
    min_test_photos: int = 20
    min_p_better: float = 0.9
    n_bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            self.min_breed_photos < 1
            or not 0 <= self.max_breed_drop <= 1
            or self.min_test_photos < 1
            or not 0 < self.min_p_better <= 1
            or self.n_bootstrap < 1
        ):
            raise ValueError(f"invalid gate policy {self}")

    def describe(self, reference: str = "the active one's") -> str:
        """The rule in words, for people: ``"on at least 20 held-out test photos its balanced
        accuracy is higher than <reference> in at least 90% of 1000 paired bootstrap resamples
        (a tie is not higher) and no breed with at least 5 test photos drops by more than 10
        points"`` (numbers from this policy; a point is one percentage point of accuracy)."""
        points = f"{100 * self.max_breed_drop:.4g}"
        photos = f"{self.min_breed_photos} test photo{'s' if self.min_breed_photos != 1 else ''}"
        return (
            f"on at least {self.min_test_photos} held-out test photos its balanced accuracy is higher than {reference} "
            f"in at least {100 * self.min_p_better:.4g}% of {self.n_bootstrap} paired bootstrap resamples (a tie is not "
            f"higher) and no breed with at least {photos} drops by more than {points} point{'' if points == '1' else 's'}"
        )


@dataclass(frozen=True)
class BreedComparison:
    """One breed's test accuracy, reference vs candidate (``None`` = breed absent)."""

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
        reference_balanced_accuracy, candidate_balanced_accuracy: the two scores on ``split``
            (``None`` when there was nothing to compare).
        breeds: per-breed comparison, sorted by breed.
        split: the photos the scores come from (``"test"``; decisions stored before the gate
            moved to the test split read ``"validation"``).
        n: photos both were scored on.
        p_better: share of paired bootstrap resamples in which the candidate's balanced
            accuracy is strictly higher (``None``: not computed).
        gated: ``False`` when no decision could be made (too few test photos, no common test
            photos, no evaluated reference): the version is kept inactive for promotion by hand.
    """

    passed: bool
    reasons: list[str]
    reference: str
    reference_balanced_accuracy: float | None
    candidate_balanced_accuracy: float | None
    breeds: list[BreedComparison] = field(default_factory=list)
    split: str = "validation"
    n: int | None = None
    p_better: float | None = None
    gated: bool = True

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

    @property
    def outcome(self) -> str:
        """``"passed"``, ``"blocked"`` or ``"not gated"``."""
        return "passed" if self.passed else ("blocked" if self.gated else "not gated")

    def summary(self) -> str:
        """One line for people."""
        head = (f"{self.split} balanced accuracy: candidate {_pct(self.candidate_balanced_accuracy)} vs {self.reference} "
                f"{_pct(self.reference_balanced_accuracy)}")
        if self.n is not None:
            head += f", {self.n} photos"
        if self.p_better is not None:
            head += f", higher in {_pct(self.p_better)} of bootstrap resamples"
        if self.passed:
            return f"gate passed ({head})"
        return f"gate {'blocked' if self.gated else 'not applied'} ({head}): " + "; ".join(self.reasons)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def strip_per_photo(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """``metrics`` without the per-photo lists (:data:`PER_PHOTO_KEYS`), for storing and showing."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if k not in PER_PHOTO_KEYS}


def paired_bootstrap_p_better(
    truth: Sequence[str], candidate: Sequence[str], reference: Sequence[str], *, n_resamples: int = 1000, seed: int = 0
) -> float:
    """Share of paired bootstrap resamples in which the candidate's balanced accuracy is strictly
    higher than the reference's.

    Each resample draws ``len(truth)`` photos with replacement; the **same** photos are used for
    both models (paired), so what the two share (easy and hard photos) cancels. Balanced accuracy
    is the mean per-class recall over the classes present in the resample, as in
    :func:`catreview.evaluate.calibration.balanced_accuracy`. Ties count as not higher, so two models with
    identical predictions give 0.

    This is the paired bootstrap comparison of two systems on one test set (Efron & Tibshirani
    1993, *An Introduction to the Bootstrap*, ch. 16: a bootstrap estimate of
    ``P(theta_candidate > theta_reference)``; Koehn 2004, "Statistical Significance Tests for
    Machine Translation Evaluation", uses the same resample-and-count procedure).

    Args:
        truth: each photo's correct answer.
        candidate, reference: each model's prediction for the same photos, same order.
        n_resamples: bootstrap resamples.
        seed: resampling seed (``numpy.random.default_rng``).

    Raises:
        ValueError: empty or unequal-length inputs.
    """
    import numpy as np

    n = len(truth)
    if n == 0 or len(candidate) != n or len(reference) != n:
        raise ValueError(f"need equal, non-empty lists (truth {n}, candidate {len(candidate)}, reference {len(reference)})")
    classes = {c: i for i, c in enumerate(sorted(set(truth)))}
    cls = np.array([classes[t] for t in truth], dtype=np.int64)
    k = len(classes)
    right_c = np.array([c == t for c, t in zip(candidate, truth)], dtype=np.float64)
    right_r = np.array([r == t for r, t in zip(reference, truth)], dtype=np.float64)
    rng = np.random.default_rng(seed)
    wins = 0
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        c = cls[idx]
        count = np.bincount(c, minlength=k)
        present = count > 0
        ba_c = (np.bincount(c, weights=right_c[idx], minlength=k)[present] / count[present]).mean()
        ba_r = (np.bincount(c, weights=right_r[idx], minlength=k)[present] / count[present]).mean()
        wins += bool(ba_c > ba_r)
    return wins / n_resamples


def _not_enough(n: int, policy: GatePolicy) -> str:
    return f"not enough test photos to gate; promote by hand ({n} test photos, at least {policy.min_test_photos} needed)"


def gate(
    candidate: dict[str, Any] | None,
    reference: dict[str, Any] | None,
    policy: GatePolicy = GatePolicy(),
    *,
    reference_name: str = "reference",
) -> GateDecision:
    """Compare two metric dicts measured **once each on the same held-out test photos**.

    Model selection (best checkpoint, early stopping) uses the validation split; the best of
    several validation evaluations is optimistically biased, so it is never compared with a
    reference evaluated once. The round therefore scores its selected adapter and the reference
    once each on the test split (:func:`training.lora.train_round`), and only those numbers are
    gated here.

    Args:
        candidate, reference: test metrics as written by :func:`training.lora.evaluate` with
            ``per_photo=True``: ``{"n", "balanced_accuracy", "per_breed": {breed: {"n",
            "accuracy", ...}}, "photos", "truth", "predicted"}``; ``None`` or ``{}`` when there
            were no test photos.
        policy: thresholds.
        reference_name: how the reference is named in messages.

    Returns:
        :class:`GateDecision` with ``split="test"``. ``passed`` iff all of:

        * at least ``min_test_photos`` test photos, both scored on the same photos (else
          ``gated=False``: "not enough test photos to gate; promote by hand");
        * the candidate's test balanced accuracy is **strictly** higher than the reference's (a
          tie does not pass);
        * in at least ``min_p_better`` of ``n_bootstrap`` paired bootstrap resamples of the test
          photos it is strictly higher (:func:`paired_bootstrap_p_better`);
        * no breed with at least ``min_breed_photos`` test photos loses more than
          ``max_breed_drop`` accuracy.
    """
    candidate, reference = candidate or {}, reference or {}
    cand_ba = None if candidate.get("balanced_accuracy") is None else float(candidate["balanced_accuracy"])
    ref_ba = None if reference.get("balanced_accuracy") is None else float(reference["balanced_accuracy"])
    n = int(candidate.get("n") or 0)
    c_breeds, r_breeds = candidate.get("per_breed", {}), reference.get("per_breed", {})

    def breed_rows(check: bool) -> tuple[list[BreedComparison], list[str]]:
        rows, why = [], []
        for breed in sorted(set(c_breeds) | set(r_breeds)):
            c, r = c_breeds.get(breed), r_breeds.get(breed)
            n_breed = int((c or r)["n"])
            c_acc = None if c is None else float(c["accuracy"])
            r_acc = None if r is None else float(r["accuracy"])
            checked = check and c is not None and r is not None and n_breed >= policy.min_breed_photos
            blocking = checked and c_acc < r_acc - policy.max_breed_drop - 1e-12
            if blocking:
                why.append(f"{breed} ({n_breed} test photos) fell from {_pct(r_acc)} to {_pct(c_acc)}")
            rows.append(BreedComparison(breed, n_breed, r_acc, c_acc, checked, blocking))
        return rows, why

    def not_gated(reason: str) -> GateDecision:
        rows, _ = breed_rows(check=False)
        return GateDecision(False, [reason], reference_name, ref_ba, cand_ba, rows, split="test", n=n, gated=False)

    if cand_ba is None or n < policy.min_test_photos:
        return not_gated(_not_enough(n if cand_ba is not None else 0, policy))
    if ref_ba is None:
        return not_gated(f"{reference_name} was not scored on the test photos; promote by hand")
    photos = [candidate.get(k) for k in PER_PHOTO_KEYS]
    if any(p is None for p in photos) or reference.get("photos") != candidate["photos"] or reference.get("truth") != candidate["truth"]:
        return not_gated(f"{reference_name} and the candidate were not scored on the same test photos; promote by hand")
    if reference.get("predicted") is None or not len(candidate["photos"]) == len(candidate["predicted"]) == len(reference["predicted"]) == n:
        return not_gated(f"the test metrics lack per-photo predictions for {n} photos; promote by hand")

    reasons = []
    p_better = paired_bootstrap_p_better(
        candidate["truth"], candidate["predicted"], reference["predicted"], n_resamples=policy.n_bootstrap, seed=policy.seed
    )
    if cand_ba < ref_ba:
        reasons.append(f"test balanced accuracy fell from {_pct(ref_ba)} to {_pct(cand_ba)}")
    elif cand_ba == ref_ba:
        reasons.append(f"test balanced accuracy did not improve ({_pct(ref_ba)} both; a tie does not pass)")
    elif p_better < policy.min_p_better:
        reasons.append(
            f"test balanced accuracy rose from {_pct(ref_ba)} to {_pct(cand_ba)} but was higher in only {_pct(p_better)} "
            f"of {policy.n_bootstrap} bootstrap resamples of the {n} test photos ({_pct(policy.min_p_better)} needed)"
        )
    rows, drops = breed_rows(check=True)
    reasons += drops
    return GateDecision(not reasons, reasons, reference_name, ref_ba, cand_ba, rows, split="test", n=n, p_better=p_better)


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
    """sha256 over the adapter files' names and bytes (what :func:`catreview.models.vlm.postclassifier.adapter_identity`
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
    test balanced accuracy of the version and of the reference it was gated against, gate outcome
    (``passed`` / ``blocked`` / ``not gated`` / ``-``), export hash (12 hex), rank/lr/epochs."""
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
            "test_balanced_accuracy": (m.get("test") or {}).get("balanced_accuracy"),
            "reference_test_balanced_accuracy": (m.get("reference_test") or {}).get("balanced_accuracy"),
            "gate": _gate_outcome(g),
            "export": v.export_hash[:12],
            "rank": hp.get("rank"),
            "lr": hp.get("lr"),
            "epochs": hp.get("epochs"),
        })
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


def _reference(session: Session, result: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str, str | None]:
    """``(validation metrics, test metrics, name, reason-if-none)`` of what a round's adapter is
    gated against: the active version when the round evaluated that very adapter (its baseline),
    else -- no version active -- the base model (the round's step-0 evaluations)."""
    current = active_version(session, result["base_model"])
    if current is None:
        return result.get("initial_metrics"), result.get("initial_test_metrics"), "no adapter (base model)", None
    baseline = result.get("baseline") or {}
    if baseline.get("adapter") and Path(baseline["adapter"]).resolve() == Path(current.path).resolve():
        return baseline.get("metrics"), baseline.get("test_metrics"), f"adapter #{current.id}", None
    return None, None, f"adapter #{current.id}", (
        f"the active adapter #{current.id} was not evaluated on this round's test photos "
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
    passes and ``auto_activate`` -- flips the active flags. A version the gate could not decide on
    (too few test photos, reference not scored by the round) is never activated automatically.

    The version's ``metrics_json``: the selected checkpoint's validation metrics at the top level
    (``balanced_accuracy``, ``accuracy``, ``macro_f1``, ``val_loss``, ``per_breed``, ``n``), then
    ``best_step``, ``initial`` / ``baseline`` (validation metrics of the base model / the active
    adapter), ``test`` (the selected checkpoint on the test split: ``n``, ``balanced_accuracy``,
    ``accuracy``, ``macro_f1``, ``loss``, ``per_breed``), ``reference_test`` (the reference gated
    against, same keys; ``None`` without one), ``n_test``, ``gate``
    (:meth:`GateDecision.to_dict`: ``passed``, ``gated``, ``reasons``, ``reference``,
    ``candidate_balanced_accuracy`` / ``reference_balanced_accuracy`` (test), ``p_better``,
    ``n``, ``split``, ``breeds``), ``gate_policy``, ``run_dir``, ``steps``, ``samples_per_second``.

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
        _, reference_test, ref_name, why_not = _reference(s, result)
        candidate_test = result.get("test_metrics")
        if why_not is not None:
            decision = GateDecision(False, [why_not], ref_name, None, (candidate_test or {}).get("balanced_accuracy"),
                                    split="test", n=(candidate_test or {}).get("n"), gated=False)
        else:
            decision = gate(candidate_test, reference_test, policy, reference_name=ref_name)
        metrics = {
            **(result.get("metrics") or {}),
            "best_step": result.get("best_step"),
            "initial": result.get("initial_metrics"),
            "baseline": (result.get("baseline") or {}).get("metrics"),
            "test": strip_per_photo(candidate_test),
            "reference_test": strip_per_photo(reference_test),
            "n_test": result.get("n_test"),
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
