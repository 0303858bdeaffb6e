"""The loop, measured: stage 1, VLM and fused accuracy per model version on held-out photos.

:func:`evaluation_report` answers "what did each round change?". For every model version that has
predictions in the database (rows of ``predictions`` carry ``model_id`` and ``model_version``), it
scores the stored outputs against the reviewers' current labels:

* **stage 1**, one row per stage-1 version: its top-1 label;
* **VLM**, one row per (VLM version, stage-1 version whose candidates it scored): its top label over
  the candidates and ``"other"``; plus the **candidate accuracy** (on photos whose label is among
  the candidates, how often the VLM ranks it first among them; chance is 1/k);
* **fused**, one row per such pair: the top label of the blend the app shows
  (:func:`catreview.query.photos.fuse_view` with :func:`~catreview.query.photos.current_blend`);
  a photo routed past the VLM (``fusion.routing_threshold``) counts with stage 1's label, as in the app.

Each row has n, top-1 accuracy, balanced accuracy (mean per-breed recall, scikit-learn through
:mod:`catreview.metrics`), per-breed accuracy (recall) and the confusion matrix
(``sklearn.metrics.confusion_matrix``; rows: true breeds; columns: the same breeds, then
:data:`ANOTHER_BREED` for a breed outside the evaluated ones, then ``"other"``). A prediction of
``"other"`` ("none of the candidates") is never a right breed, so all three stages are scored on the
same question: is the shown breed the reviewer's?

**Which photos.** Photos whose current review names a breed ("Not a cat" / "Unsure" are left
out), minus every photo a compared version may have been trained on, so all versions are measured
on the same held-out photos: for an adapter version, the ``train`` split its exports used
(:func:`catreview.adapters.versions.training_photo_hashes`); for a stage-1 version, what the
``stage1_trained`` callback returns (default: nothing, i.e. weights not fitted on this database's
reviews: a user's checkpoint or the built-in backbone). A version whose training photos are unknown
(an adapter folder set in the config, not a version of this database) is reported with a note.
Rows whose n is below the number of evaluated photos cover only the photos predicted so far.

**Scale.** Reviewed photos are read in keyset pages of ``batch_size`` ids, and their prediction
rows with one indexed query per page; only integer label codes per (row, photo) are kept, so memory
is a few bytes per photo and version (the training photos' hashes excepted).
"""

from __future__ import annotations

import functools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.adapters.versions import training_photo_hashes
from catreview.data.db import AdapterVersion, ImageRecord, Prediction
from catreview.data.labels import BreedVocabulary, is_breed
from catreview.errors import CatreviewError
from catreview.metrics import (
    ClassAccuracy,
    ReliabilityBin,
    balanced_accuracy,
    per_class_accuracy,
    reliability_bins_from_confidences,
)
from catreview.predict.fusion import OTHER, should_route_to_vlm, top_label
from catreview.predict.runner import candidates_key
from catreview.query.photos import Blend, current_blend, fuse_view

__all__ = [
    "ANOTHER_BREED",
    "STAGES",
    "EvaluationReport",
    "EvaluationRow",
    "Stage1Trained",
    "VersionKey",
    "active_versions",
    "adapter_name_of",
    "evaluation_report",
]

STAGES = ("stage 1", "VLM", "fused")
#: Confusion-matrix column of predictions naming a breed that is not among the evaluated breeds.
ANOTHER_BREED = "(another breed)"
#: Image ids per page (one query for the images, one for their predictions).
BATCH_SIZE = 1000
#: Equal-width confidence bins of each row's reliability diagram (15, as in Guo et al. 2017 and
#: :func:`catreview.evaluate.calibration.calibrate`).
RELIABILITY_BINS = 15

#: ``stage1_trained(session, model_id, model_version)``: sha256 of the photos a stage-1 version was
#: fitted on (an empty set: none of this database's; ``None``: unknown).
Stage1Trained = Callable[[Session, str, str], "set[str] | None"]


def _no_stage1_training(session: Session, model_id: str, model_version: str) -> set[str] | None:
    return set()


@dataclass(frozen=True, order=True)
class VersionKey:
    """A model version as stored in ``predictions``: ``(model_id, model_version)``."""

    model_id: str
    model_version: str


@dataclass(frozen=True)
class EvaluationRow:
    """The scores of one stage of one model version (pair) on the held-out photos.

    Attributes:
        stage: one of :data:`STAGES`.
        stage1_version: the stage-1 ``model_version`` (whose candidates the VLM scored).
        vlm_version: the VLM ``model_version`` (``None`` for a stage-1 row).
        active: these are the versions the app uses now.
        n: photos scored.
        accuracy: top-1 accuracy in [0, 1].
        balanced_accuracy: mean per-breed recall in [0, 1] over the breeds among the n photos.
        candidate_accuracy: VLM rows only: accuracy among the candidates on the
            ``n_candidate`` photos whose label is a candidate (else ``None``).
        n_candidate: photos behind ``candidate_accuracy`` (0 for other stages).
        n_candidates: candidates per photo (k; chance is 1/k), 0 for other stages.
        per_breed: ``{breed: ClassAccuracy(correct, total, accuracy)}`` over :attr:`labels`.
        labels: the confusion matrix's rows (true breeds, sorted).
        columns: its columns (``labels``, then :data:`ANOTHER_BREED` and ``"other"``).
        confusion: int64 array ``(len(labels), len(columns))``: photos of breed i shown as column j.
        blend: where the fused blend came from (``"config"`` or ``"calibration #N"``), else ``None``.
        reliability: :data:`RELIABILITY_BINS` equal-width bins of the shown label's probability
            (stage 1: its top-1; VLM: its top label; fused: the blend's top label, stage 1's top-1
            for photos routed past the VLM) against being right
            (:func:`catreview.metrics.reliability_bins_from_confidences`, the calibration's binning).
    """

    stage: str
    stage1_version: str
    vlm_version: str | None
    active: bool
    n: int
    accuracy: float
    balanced_accuracy: float
    candidate_accuracy: float | None
    n_candidate: int
    n_candidates: int
    per_breed: dict[str, ClassAccuracy]
    labels: list[str]
    columns: list[str]
    confusion: np.ndarray
    blend: str | None = None
    reliability: list[ReliabilityBin] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A short unique name: ``"stage 1 <version>"`` or ``"<stage> <vlm version> | <stage-1 version>"``."""
        if self.vlm_version is None:
            return f"{self.stage} {self.stage1_version}"
        return f"{self.stage} {self.vlm_version} | {self.stage1_version}"

    def summary(self) -> dict[str, Any]:
        """The row as a flat dict (the CLI table and the app's summary table)."""
        return {
            "stage": self.stage,
            "vlm_version": self.vlm_version or "",
            "stage1_version": self.stage1_version,
            "active": self.active,
            "n": self.n,
            "top1": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "candidate_accuracy": self.candidate_accuracy,
            "blend": self.blend or "",
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: :meth:`summary` plus per-breed accuracy and the confusion matrix (NaN -> null)."""
        return {
            **self.summary(),
            "n_candidate": self.n_candidate,
            "n_candidates": self.n_candidates,
            "per_breed": {
                b: {"correct": a.correct, "total": a.total, "accuracy": _finite(a.accuracy)}
                for b, a in self.per_breed.items()
            },
            "confusion": {"labels": self.labels, "columns": self.columns, "matrix": self.confusion.tolist()},
            "reliability": [
                {**vars(b), "confidence": _finite(b.confidence), "accuracy": _finite(b.accuracy)}
                for b in self.reliability
            ],
        }


@dataclass(frozen=True)
class EvaluationReport:
    """Every version's scores on one set of held-out photos.

    Attributes:
        rows: stage-1 rows, then VLM and fused rows per pair (active versions first in each stage).
        breeds: the breeds of the evaluated photos (sorted).
        n_reviewed: photos whose current review names a breed.
        n_excluded: of those, photos some compared version may have been trained on (left out).
        n_evaluated: ``n_reviewed - n_excluded``.
        notes: what a reader must know (left-out photos, unknown training sets, partial rows).
    """

    rows: list[EvaluationRow]
    breeds: list[str]
    n_reviewed: int
    n_excluded: int
    n_evaluated: int
    notes: list[str] = field(default_factory=list)

    def summary_rows(self) -> list[dict[str, Any]]:
        """:meth:`EvaluationRow.summary` of every row."""
        return [r.summary() for r in self.rows]

    def per_breed_rows(self) -> list[dict[str, Any]]:
        """One dict per breed: ``breed``, ``photos`` (evaluated photos of the breed), then the
        accuracy of each row under its :attr:`EvaluationRow.name` (``None`` where it scored none)."""
        out = []
        for breed in self.breeds:
            d: dict[str, Any] = {"breed": breed, "photos": 0}
            for r in self.rows:
                a = r.per_breed.get(breed)
                d[r.name] = _finite(a.accuracy) if a is not None else None
                d["photos"] = max(d["photos"], a.total if a is not None else 0)
            out.append(d)
        return out

    def row(self, name: str) -> EvaluationRow:
        """The row named ``name`` (:attr:`EvaluationRow.name`).

        Raises:
            KeyError: no such row.
        """
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report (the ``evaluate --json`` output)."""
        return {
            "photos": {"reviewed": self.n_reviewed, "excluded": self.n_excluded, "evaluated": self.n_evaluated},
            "breeds": self.breeds,
            "notes": self.notes,
            "rows": [r.to_dict() for r in self.rows],
        }


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def active_versions(registry: Any, vlm_name: str | None = None) -> tuple[str | None, str | None]:
    """``(stage-1 model_version, VLM model_version)`` that ``registry``
    (:class:`catreview.models.registry.ModelRegistry`) uses now; ``None`` for a model that cannot
    be loaded or is not trained yet (any :class:`~catreview.errors.CatreviewError`)."""
    out: list[str | None] = []
    for get in (lambda: registry.classifier().model_version, lambda: registry.vlm(vlm_name).model_version):
        try:
            out.append(get())
        except CatreviewError:
            out.append(None)
    return out[0], out[1]


def adapter_name_of(vlm_version: str) -> str | None:
    """The adapter folder name inside a VLM ``model_version`` (``"<model>+<adapter>@<hash>-<prompt>"``,
    :func:`catreview.models.vlm.loading.model_version_string`), or ``None`` without an adapter."""
    stem = vlm_version.rsplit("@", 1)[0]
    return stem.rsplit("+", 1)[1] if "+" in stem else None


def _vlm_trained(session: Session, vlm_version: str) -> tuple[set[str] | None, str | None]:
    """``(training photo hashes or None when unknown, adapter folder name)`` of a VLM version."""
    name = adapter_name_of(vlm_version)
    if name is None:
        return set(), None
    for path in session.exec(select(AdapterVersion.path)):
        if path.rstrip("/").rsplit("/", 1)[-1] == name:
            return training_photo_hashes(session, path), name
    return None, name


def _versions(session: Session) -> dict[str, list[VersionKey]]:
    """``{"stage1": [...], "vlm": [...]}``: the versions that have predictions (one GROUP BY)."""
    q = (
        select(Prediction.kind, Prediction.model_id, Prediction.model_version)
        .where(col(Prediction.kind).in_(("stage1", "vlm")))
        .group_by(col(Prediction.kind), col(Prediction.model_id), col(Prediction.model_version))
    )
    out: dict[str, list[VersionKey]] = {"stage1": [], "vlm": []}
    for kind, model_id, version in session.exec(q):
        out[kind].append(VersionKey(model_id, version))
    return {k: sorted(v) for k, v in out.items()}


def _reviewed_pages(session: Session, batch_size: int) -> Iterator[list[tuple[int, str, str]]]:
    """``(id, sha256, label)`` of decodable photos whose current review names a breed, in keyset pages."""
    after = 0
    while True:
        q = (
            select(ImageRecord.id, ImageRecord.sha256, ImageRecord.current_label)
            .where(col(ImageRecord.id) > after, col(ImageRecord.current_label).is_not(None))
            .where(col(ImageRecord.error).is_(None))
            .order_by(col(ImageRecord.id))
            .limit(batch_size)
        )
        page = [(int(i), sha, lab) for i, sha, lab in session.exec(q) if i is not None and lab is not None]
        if not page:
            return
        yield [p for p in page if is_breed(p[2])]
        after = page[-1][0]


class _Codes:
    """Label <-> integer code (codes in order of first sight)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, label: str) -> int:
        code = self._index.get(label)
        if code is None:
            code = self._index[label] = len(self.names)
            self.names.append(label)
        return code


@dataclass
class _Scores:
    """True and predicted label codes of one row, plus the candidate-accuracy counts."""

    true: list[int] = field(default_factory=list)
    pred: list[int] = field(default_factory=list)
    conf: list[float] = field(default_factory=list)  # probability of the shown label, clipped to [0, 1]
    cand_hits: int = 0
    cand_n: int = 0
    k: int = 0

    def add(self, t: int, p: int, confidence: float) -> None:
        self.true.append(t)
        self.pred.append(p)
        self.conf.append(min(1.0, max(0.0, confidence)))


def evaluation_report(
    engine: Engine,
    settings: Any,
    *,
    vocabulary: BreedVocabulary | None = None,
    active: tuple[str | None, str | None] = (None, None),
    stage1_trained: Stage1Trained = _no_stage1_training,
    batch_size: int = BATCH_SIZE,
) -> EvaluationReport:
    """Score every stored model version on the held-out reviewed photos (see the module docstring).

    Args:
        engine: the database.
        settings: :class:`catreview.config.Settings` (the fusion weight, routing threshold).
        vocabulary: maps stage-1 and VLM labels to the reviews' canonical names
            (default: ``classifier.labels_file`` of ``settings``).
        active: ``(stage-1 model_version, VLM model_version)`` the app uses now (marked ``active``).
        stage1_trained: photos a stage-1 version was fitted on (:data:`Stage1Trained`).
        batch_size: photos per page.

    Returns:
        An :class:`EvaluationReport`; rows are absent for versions with no prediction on the
        held-out photos.

    Raises:
        ValueError: ``batch_size`` < 1, or stored predictions that are not valid probabilities.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    vocab = vocabulary or BreedVocabulary.from_labels_file(settings.classifier.labels_file)
    canon = functools.lru_cache(maxsize=4096)(vocab.canonical_or_same)  # a few distinct labels
    threshold = settings.fusion.routing_threshold
    notes: list[str] = []
    with Session(engine) as session:
        versions = _versions(session)
        trained: set[str] = set()
        for v in versions["stage1"]:
            hashes = stage1_trained(session, v.model_id, v.model_version)
            if hashes is None:
                notes.append(
                    f"stage 1 {v.model_version}: its training photos are unknown; they cannot be left out, "
                    "so its numbers may be optimistic."
                )
            else:
                trained |= hashes
        for v in versions["vlm"]:
            hashes, adapter = _vlm_trained(session, v.model_version)
            if hashes is None:
                notes.append(
                    f"VLM {v.model_version}: adapter {adapter} is not a version of this database; the photos it "
                    "was trained on cannot be left out, so its numbers may be optimistic."
                )
            else:
                trained |= hashes
        blends: dict[tuple[str, str], Blend] = {}
        codes = _Codes()
        s1_scores: dict[VersionKey, _Scores] = defaultdict(_Scores)
        vlm_scores: dict[tuple[VersionKey, VersionKey], _Scores] = defaultdict(_Scores)
        fused_scores: dict[tuple[VersionKey, VersionKey], _Scores] = defaultdict(_Scores)
        skipped: dict[VersionKey, _Scores] = defaultdict(_Scores)  # routed past the VLM: fused = stage 1
        n_reviewed = n_excluded = 0
        for page in _reviewed_pages(session, batch_size):
            n_reviewed += len(page)
            kept = [(i, lab) for i, sha, lab in page if sha not in trained]
            n_excluded += len(page) - len(kept)
            if not kept:
                continue
            labels = dict(kept)
            s1: dict[int, dict[VersionKey, list[tuple[str, float]]]] = defaultdict(dict)
            vlm: dict[int, dict[str, list[tuple[VersionKey, dict[str, Any]]]]] = defaultdict(lambda: defaultdict(list))
            q = sa_select(
                col(Prediction.image_id),
                col(Prediction.kind),
                col(Prediction.model_id),
                col(Prediction.model_version),
                col(Prediction.input_key),
                col(Prediction.payload_json),
            ).where(col(Prediction.image_id).in_(list(labels)), col(Prediction.kind).in_(("stage1", "vlm")))
            for image_id, kind, model_id, version, input_key, payload_json in session.execute(q):
                payload = json.loads(payload_json)
                key = VersionKey(model_id, version)
                if kind == "stage1":
                    s1[image_id][key] = [(lab, float(p)) for lab, p in payload["topk"]]
                else:
                    vlm[image_id][input_key].append((key, payload))
            for image_id, human in labels.items():
                t = codes(human)
                for s1_key, raw in s1.get(image_id, {}).items():
                    if not raw:
                        continue
                    topk = [(canon(lab), p) for lab, p in raw]
                    s1_pred = codes(topk[0][0])
                    s1_scores[s1_key].add(t, s1_pred, topk[0][1])
                    if not should_route_to_vlm(topk[0][1], threshold):
                        skipped[s1_key].add(t, s1_pred, topk[0][1])
                        continue
                    for vlm_key, payload in vlm.get(image_id, {}).get(candidates_key([lab for lab, _ in raw]), []):
                        pair = (s1_key, vlm_key)
                        probs = {
                            (OTHER if c == OTHER else canon(c)): float(p)
                            for c, p in zip(payload["candidates"], payload["probabilities"])
                        }
                        sc = vlm_scores[pair]
                        vlm_top = top_label(probs)
                        sc.add(t, codes(vlm_top), probs[vlm_top])
                        cands = [c for c in probs if c != OTHER]
                        sc.k = max(sc.k, len(cands))
                        if human in cands:
                            sc.cand_n += 1
                            sc.cand_hits += max(cands, key=lambda c: probs[c]) == human
                        bkey = (s1_key.model_version, vlm_key.model_version)
                        if bkey not in blends:
                            blends[bkey] = current_blend(session, settings, *bkey)
                        fused = fuse_view(topk, probs, blends[bkey])
                        fused_top = top_label(fused)
                        fused_scores[pair].add(t, codes(fused_top), fused[fused_top])
    for (s1_key, _), sc in fused_scores.items():
        sc.true += skipped[s1_key].true
        sc.pred += skipped[s1_key].pred
        sc.conf += skipped[s1_key].conf
    n_evaluated = n_reviewed - n_excluded
    if n_excluded:
        notes.insert(
            0,
            f"Left out {n_excluded} of {n_reviewed} reviewed photos: a compared version may have been trained "
            "on them (the train split of its exports).",
        )
    breeds = sorted({codes.names[t] for sc in s1_scores.values() for t in sc.true})
    s1_active, vlm_active = active
    rows: list[EvaluationRow] = []
    for key, sc in _ordered(s1_scores, lambda k: k.model_version == s1_active):
        rows.append(_row("stage 1", key.model_version, None, key.model_version == s1_active, sc, codes, breeds))
    pairs = _ordered(vlm_scores, lambda p: (p[0].model_version, p[1].model_version) == (s1_active, vlm_active))
    for stage, table in (("VLM", vlm_scores), ("fused", fused_scores)):
        for pair, _ in pairs:
            sc = table[pair]
            is_active = (pair[0].model_version, pair[1].model_version) == (s1_active, vlm_active)
            blend = blends[(pair[0].model_version, pair[1].model_version)].source if stage == "fused" else None
            rows.append(_row(stage, pair[0].model_version, pair[1].model_version, is_active, sc, codes, breeds, blend))
    partial = [r for r in rows if r.n < n_evaluated]
    if partial and n_evaluated:
        notes.append(
            f"{len(partial)} row(s) cover fewer than the {n_evaluated} evaluated photos (not predicted on all of "
            "them yet, or routed past the VLM); compare rows with equal n."
        )
    return EvaluationReport(rows, breeds, n_reviewed, n_excluded, n_evaluated, notes)


def _ordered(table: dict[Any, _Scores], is_active: Callable[[Any], bool]) -> list[tuple[Any, _Scores]]:
    """Entries with at least one photo, the active one first, then by key."""
    items = [(k, v) for k, v in table.items() if v.true]
    return sorted(items, key=lambda kv: (not is_active(kv[0]), kv[0]))


def _row(
    stage: str,
    stage1_version: str,
    vlm_version: str | None,
    active: bool,
    sc: _Scores,
    codes: _Codes,
    breeds: Sequence[str],
    blend: str | None = None,
) -> EvaluationRow:
    """Metrics of one row from its label codes (scikit-learn's ``confusion_matrix``)."""
    from sklearn.metrics import confusion_matrix

    names = codes.names
    y_true = [names[t] for t in sc.true]
    known = set(breeds)
    y_pred = [names[p] if names[p] in known or names[p] == OTHER else ANOTHER_BREED for p in sc.pred]
    columns = [*breeds, ANOTHER_BREED, OTHER]
    matrix = confusion_matrix(y_true, y_pred, labels=columns)[: len(breeds)]
    return EvaluationRow(
        stage=stage,
        stage1_version=stage1_version,
        vlm_version=vlm_version,
        active=active,
        n=len(y_true),
        accuracy=float(np.mean(np.asarray(sc.true) == np.asarray(sc.pred))),
        balanced_accuracy=balanced_accuracy(y_true, y_pred),
        candidate_accuracy=(sc.cand_hits / sc.cand_n) if sc.cand_n else None,
        n_candidate=sc.cand_n,
        n_candidates=sc.k,
        per_breed=per_class_accuracy(y_true, y_pred, labels=breeds),
        labels=list(breeds),
        columns=columns,
        confusion=np.asarray(matrix, dtype=np.int64),
        blend=blend,
        reliability=reliability_bins_from_confidences(
            sc.conf, np.asarray(sc.true) == np.asarray(sc.pred), RELIABILITY_BINS
        ),
    )
