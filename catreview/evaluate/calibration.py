"""Calibration of both stages and their fusion, fitted on human-reviewed photos: :func:`calibrate`.

What is fitted, on the reviewed photos:

* a **temperature** per stage (:func:`catreview.evaluate.temperature.fit_temperature`; applied by
  :mod:`catreview.predict.temperature`), Guo, Pleiss, Sun & Weinberger 2017;
* the **fusion weight** (the VLM's share in the linear pool of :mod:`catreview.predict.fusion`),
  :func:`catreview.evaluate.fusion_weight.fit_fusion_weight`, maximising balanced accuracy;
* a temperature of the **pool** (:func:`catreview.evaluate.temperature.fit_fused_temperature`).

What is measured (:mod:`catreview.metrics`): ECE with equal-width bins, reliability bins,
accuracy, balanced accuracy and per-breed accuracy of each stage before and after, in-sample and
cross-validated over :func:`catreview.evaluate.folds.stratified_folds`. The report is data
(:class:`CalibrationReport`); its text for users is :mod:`catreview.app.presenters.calibration`.

How a human label outside the stage-1 candidates is scored (see :func:`calibrate`): for stage 1 it
is a miss (no candidate can be right); for the VLM and the fusion the correct outcome is
:data:`catreview.predict.fusion.OTHER` ("none of these").

Scale: the fit runs on arrays, never on a dictionary per photo. The photos are
:class:`CandidateArrays` (integer label codes and probabilities), which :func:`calibrate` puts on
one outcome grid: per photo its K stage-1 candidates in stage-1 order, then OTHER (``(N, K + 1)``
float64 matrices, 0 where a photo has fewer candidates), and the grid column of its human label
(OTHER's when it is not a candidate). Every step is array operations on those matrices, with the
arithmetic of the per-photo helpers of :mod:`catreview.predict` (same values, bit for bit on the
tests' data): 127,000 photos take seconds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import numpy as np

from catreview.evaluate.errors import CalibrationError
from catreview.evaluate.folds import deal_folds
from catreview.evaluate.fusion_weight import fusion_weight_curve_arrays, pick_fusion_weight
from catreview.evaluate.temperature import fit_fused_temperature_arrays, fit_temperature
from catreview.metrics import (
    ClassAccuracy,
    ReliabilityBin,
    check_n_bins,
    ece_from_bins,
    reliability_bins_from_confidences,
)
from catreview.predict.fusion import OTHER, TopK, normalise_topk, normalise_vlm
from catreview.predict.temperature import apply_temperature, log_probabilities

__all__ = [
    "STAGES",
    "STAGE_TITLES",
    "CalibrationReport",
    "CandidateArrays",
    "PerBreedRow",
    "ReviewRecord",
    "StageMetrics",
    "calibrate",
]


@dataclass(frozen=True)
class ReviewRecord:
    """One human-reviewed photo.

    ``human_label``: the reviewer's label. ``stage1_topk``: ``[(label, probability), ...]`` as
    stored by stage 1 (or a dict). ``vlm_probs``: the VLM's probabilities over those candidates
    and optionally :data:`~catreview.predict.fusion.OTHER`, or ``None`` when routing skipped the VLM.
    """

    human_label: str
    stage1_topk: TopK
    vlm_probs: Mapping[str, float] | None = None


@dataclass(frozen=True)
class StageMetrics:
    """Metrics of one stage over the photos it saw, before and after calibration.

    For stage 1 and the VLM, "after" applies the fitted temperature, which leaves the argmax and
    so the accuracies unchanged (up to exact ties). For the fusion, "before" is the raw
    probabilities at the current weight, "after" the temperature-scaled ones at the fitted weight,
    with the pool's own temperature.
    "after" is in-sample (fitted and measured on the same photos); the ``*_cv`` values are
    cross-validated: each photo is measured with the temperatures and weight fitted on the other
    folds (:func:`calibrate`), ``None`` when cross-validation was not possible.
    ECE values and accuracies are in [0, 1].
    """

    n: int
    ece_before: float
    ece_after: float
    accuracy_before: float
    accuracy_after: float
    balanced_accuracy_before: float
    balanced_accuracy_after: float
    ece_after_cv: float | None = None
    accuracy_after_cv: float | None = None
    balanced_accuracy_after_cv: float | None = None


STAGES = ("stage1", "vlm", "fused")
"""Stage keys of :class:`CalibrationReport` (attributes, ``per_breed`` and ``reliability`` keys)."""
STAGE_TITLES = {"stage1": "stage 1", "vlm": "VLM", "fused": "fused"}
"""Each stage's name in :meth:`CalibrationReport.summary_rows` (stored in the fit's ``report_json``)."""


class PerBreedRow(TypedDict):
    """One breed of :meth:`CalibrationReport.per_breed_rows`; accuracies in [0, 1]."""

    breed: str
    reviews: int
    stage1_correct: int
    stage1_accuracy: float
    vlm_reviews: int
    vlm_correct: int
    vlm_accuracy: float | None
    fused_correct: int
    fused_accuracy: float


@dataclass(frozen=True)
class CalibrationReport:
    """Result of :func:`calibrate`.

    Attributes:
        n_reviews: reviewed photos used; ``n_with_vlm`` of them have a VLM verdict.
        stage1_temperature, vlm_temperature: fitted ``T`` (``vlm_temperature`` is ``None`` when no
            usable VLM verdict exists; the VLM is then left unscaled).
        current_weight, weight: the fusion weight before and after fitting.
        fused_temperature: ``T`` of the pooled distribution
            (:func:`~catreview.evaluate.temperature.fit_fused_temperature`).
        stage1, vlm, fused: :class:`StageMetrics` (``vlm`` is ``None`` without VLM verdicts).
        per_breed: ``{breed: {stage: ClassAccuracy(correct, total, accuracy)}}`` (tuples, see
            :class:`catreview.metrics.ClassAccuracy`) for stages "stage1", "vlm"
            (photos the VLM saw) and "fused" (after calibration); accuracy NaN when total is 0.
        reliability: ``{"<stage>_before" | "<stage>_after" | "<stage>_cv": [ReliabilityBin, ...]}``
            (:class:`catreview.metrics.ReliabilityBin`; ``_cv`` only when cross-validated).
        excluded_from_fit: ``{"stage1": k, "vlm": k}`` photos left out of the temperature fits
            because their label had no probability in that stage (e.g. not a stage-1 candidate).
        n_folds: folds of the cross-validated ``*_cv`` metrics (0: not cross-validated).
        cv_note: why cross-validation was skipped, or ``None``.
        data_note: what the caller left out of ``records`` and why (e.g. an adapter's training
            photos), shown in the report; ``None`` when nothing was.
    """

    n_reviews: int
    n_with_vlm: int
    n_bins: int
    stage1_temperature: float
    vlm_temperature: float | None
    current_weight: float
    weight: float
    fused_temperature: float
    stage1: StageMetrics
    vlm: StageMetrics | None
    fused: StageMetrics
    per_breed: dict[str, dict[str, ClassAccuracy]]
    reliability: dict[str, list[ReliabilityBin]] = field(repr=False)
    excluded_from_fit: dict[str, int]
    n_folds: int = 0
    cv_note: str | None = None
    data_note: str | None = None

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per stage that has metrics, in :data:`STAGES` order: ``stage`` (a
        :data:`STAGE_TITLES` value) and the fields of :class:`StageMetrics`."""
        rows = []
        for key in STAGES:
            m: StageMetrics | None = getattr(self, key)
            if m is not None:
                rows.append({"stage": STAGE_TITLES[key], **asdict(m)})
        return rows

    def per_breed_rows(self) -> list[PerBreedRow]:
        """One row per breed, for a dataframe: breed, reviews, and per stage correct/reviews/accuracy.

        Keys: ``breed, reviews, stage1_correct, stage1_accuracy, vlm_reviews, vlm_correct,
        vlm_accuracy, fused_correct, fused_accuracy``; accuracies are floats in [0, 1] or ``None``
        where the stage saw no photo of that breed. Sorted by reviews (descending), then breed.
        """
        rows = []
        for breed, stages in self.per_breed.items():
            s1, v, f = stages["stage1"], stages["vlm"], stages["fused"]
            rows.append(
                PerBreedRow(
                    breed=breed,
                    reviews=s1.total,
                    stage1_correct=s1.correct,
                    stage1_accuracy=s1.accuracy,
                    vlm_reviews=v.total,
                    vlm_correct=v.correct,
                    vlm_accuracy=v.accuracy if v.total else None,
                    fused_correct=f.correct,
                    fused_accuracy=f.accuracy,
                )
            )
        return sorted(rows, key=lambda r: (-r["reviews"], r["breed"]))


def _as_record(i: int, record: ReviewRecord | Mapping[str, Any]) -> ReviewRecord:
    if isinstance(record, ReviewRecord):
        return record
    if isinstance(record, Mapping):
        missing = {"human_label", "stage1_topk"} - set(record)
        if missing:
            raise ValueError(f"record {i}: missing keys {sorted(missing)}")
        return ReviewRecord(record["human_label"], record["stage1_topk"], record.get("vlm_probs"))
    raise TypeError(f"record {i}: expected ReviewRecord or mapping, got {type(record).__name__}")


@dataclass(frozen=True)
class CandidateArrays:
    """N reviewed photos as label codes and probabilities: the input :func:`calibrate` fits on.

    Labels are integer codes into ``labels`` (breed names, and :data:`~catreview.predict.fusion.OTHER`
    where a VLM verdict has it); ``K`` is the widest stage-1 top-k and ``V`` the widest VLM
    distribution. Entries whose code is -1 are padding (their probability is ignored).
    :meth:`from_records` builds it from :class:`ReviewRecord` values;
    :class:`catreview.evaluate.store.ReviewArrays` (a subclass) is streamed from the database.

    Attributes:
        labels: the name of each code (distinct).
        human: ``(N,)`` int, the reviewer's label.
        stage1_labels: ``(N, K)`` int, stage 1's top-k in its order; -1 past a photo's own k.
        stage1_probs: ``(N, K)`` float, its probabilities in [0, 1] (a top-k need not sum to 1).
        vlm_labels: ``(N, V)`` int, the VLM's outcomes (the candidates, optionally OTHER) in stored
            order; -1 padding (the whole row without a verdict).
        vlm_probs: ``(N, V)`` float >= 0.
        has_vlm: ``(N,)`` bool, the photo has a VLM verdict (routing may have skipped it).
    """

    labels: list[str]
    human: np.ndarray
    stage1_labels: np.ndarray
    stage1_probs: np.ndarray
    vlm_labels: np.ndarray
    vlm_probs: np.ndarray
    has_vlm: np.ndarray

    def __len__(self) -> int:
        return int(self.human.shape[0])

    def record(self, i: int) -> ReviewRecord:
        """Photo ``i`` as a :class:`ReviewRecord` (stage-1 top-k as ``(label, probability)`` pairs)."""
        names = self.labels
        s1 = self.stage1_labels[i] >= 0
        topk = [(names[c], float(p)) for c, p in zip(self.stage1_labels[i][s1], self.stage1_probs[i][s1])]
        vlm = None
        if self.has_vlm[i]:
            v = self.vlm_labels[i] >= 0
            vlm = {names[c]: float(p) for c, p in zip(self.vlm_labels[i][v], self.vlm_probs[i][v])}
        return ReviewRecord(names[self.human[i]], topk, vlm)

    def records(self) -> list[ReviewRecord]:
        """Every photo as a :class:`ReviewRecord`, in order (equal to the records it was built from)."""
        return [self.record(i) for i in range(len(self))]

    @classmethod
    def from_records(cls, records: Sequence[ReviewRecord]) -> CandidateArrays:
        """Encode records (one pass, a few list appends per photo).

        Raises:
            ValueError, TypeError: a record whose top-k or VLM probabilities cannot be read, as
                :func:`calibrate` reports it (the message names the record).
        """
        codes: dict[Any, int] = {}
        n = len(records)
        human = np.empty(n, dtype=np.int64)
        has_vlm = np.zeros(n, dtype=bool)
        s1_codes: list[list[int]] = []
        s1_probs: list[list[float]] = []
        v_codes: list[list[int]] = []
        v_probs: list[list[float]] = []
        try:
            for i, r in enumerate(records):
                human[i] = codes.setdefault(r.human_label, len(codes))
                topk = r.stage1_topk
                cs, ps = [], []
                for label, p in topk.items() if isinstance(topk, Mapping) else topk:
                    cs.append(codes.setdefault(label, len(codes)))
                    ps.append(float(p))
                s1_codes.append(cs)
                s1_probs.append(ps)
                v = r.vlm_probs
                if v is None:
                    v_codes.append([])
                    v_probs.append([])
                else:
                    has_vlm[i] = True
                    v_codes.append([codes.setdefault(label, len(codes)) for label in v])
                    v_probs.append([float(v[label]) for label in v])
        except (TypeError, ValueError):
            _check_records(records)  # raises the error the per-record helpers give, naming the record
            raise
        return cls(
            labels=list(codes),
            human=human,
            stage1_labels=_pad(s1_codes, -1, np.int64),
            stage1_probs=_pad(s1_probs, np.nan, np.float64),
            vlm_labels=_pad(v_codes, -1, np.int64),
            vlm_probs=_pad(v_probs, np.nan, np.float64),
            has_vlm=has_vlm,
        )


def _pad(rows: list[list[Any]], fill: float, dtype: type) -> np.ndarray:
    """Ragged rows as one ``(N, widest)`` array, ``fill`` past each row's end (rows grouped by length)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    out: np.ndarray = np.full((len(rows), int(lengths.max(initial=0))), fill, dtype=dtype)
    for k in np.unique(lengths):
        if k:
            idx = np.flatnonzero(lengths == k)
            out[idx, :k] = np.array([rows[i] for i in idx], dtype=dtype)
    return out


def _check_records(records: Sequence[ReviewRecord]) -> None:
    """The per-record checks of :func:`calibrate`: every stage-1 top-k first, then every verdict.

    Raises:
        ValueError: ``record i: ...`` from :func:`~catreview.predict.fusion.normalise_topk` or
            :func:`~catreview.predict.fusion.normalise_vlm`.
    """
    candidates = []
    for i, r in enumerate(records):
        try:
            candidates.append(list(normalise_topk(r.stage1_topk)))
        except ValueError as exc:
            raise ValueError(f"record {i}: {exc}") from exc
    for i, (r, cands) in enumerate(zip(records, candidates)):
        if r.vlm_probs is not None:
            try:
                normalise_vlm(r.vlm_probs, cands)
            except ValueError as exc:
                raise ValueError(f"record {i}: {exc}") from exc


def _record_error(i: int, record: ReviewRecord, stage: str) -> ValueError:
    """The error of record ``i``, the first whose ``stage`` ("stage1" or "vlm") the array checks
    found invalid (every earlier record, and every stage-1 top-k for "vlm", is valid), worded as
    the per-record checks of :func:`_check_records` word it."""
    try:
        candidates = list(normalise_topk(record.stage1_topk))
        if stage == "vlm" and record.vlm_probs is not None:
            normalise_vlm(record.vlm_probs, candidates)
    except ValueError as exc:
        error = ValueError(f"record {i}: {exc}")
        error.__cause__ = exc
        return error
    return ValueError(f"record {i}: {'VLM' if stage == 'vlm' else 'stage-1'} labels repeat")


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Row sums added left to right, as Python's ``sum`` adds a distribution's values (zeros add nothing)."""
    total = a[:, 0].copy()
    for j in range(1, a.shape[1]):
        total += a[:, j]
    return total


def _scatter(values: np.ndarray, columns: np.ndarray, width: int) -> np.ndarray:
    """``(M, width)`` zeros with ``values[i, j]`` put in column ``columns[i, j]`` (``width``: dropped)."""
    out = np.zeros((values.shape[0], width + 1))
    out[np.arange(values.shape[0])[:, None], columns] = values
    return out[:, :width]


@dataclass(frozen=True)
class _Grid:
    """The photos on their outcome grids: K candidate columns (stage-1 order, 0 past a photo's
    own k), then OTHER in column K. Rows are photos; :meth:`take` selects some."""

    p1: np.ndarray  # (N, K+1) stage 1 renormalised over its candidates (normalise_topk), OTHER 0
    p2: np.ndarray  # (N, K+1) the VLM over candidates + OTHER (normalise_vlm); p1 without a verdict
    z1: np.ndarray  # (N, K) log p1 over the candidate columns (-inf: none or zero)
    z2: np.ndarray  # (N, K+1) log p2
    v_log: np.ndarray  # (N, V) log of the stored VLM probabilities in stored order (-inf padding)
    v_col: np.ndarray  # (N, V) grid column of each stored VLM entry (K + 1: padding)
    vlm_over_one: np.ndarray  # (N,) a stored VLM probability > 1 (temperature scaling rejects it)
    truth: np.ndarray  # (N,) the human label's candidate column, else K (OTHER)
    has_vlm: np.ndarray  # (N,) bool
    cls: np.ndarray  # (N,) the human label's index in classes
    classes: list[str]  # the human labels present, sorted

    def take(self, rows: np.ndarray) -> _Grid:
        return _Grid(
            self.p1[rows],
            self.p2[rows],
            self.z1[rows],
            self.z2[rows],
            self.v_log[rows],
            self.v_col[rows],
            self.vlm_over_one[rows],
            self.truth[rows],
            self.has_vlm[rows],
            self.cls[rows],
            self.classes,
        )


def _grid(data: CandidateArrays, source: Sequence[ReviewRecord] | None) -> _Grid:
    """Check ``data`` as the per-record helpers would and put it on the outcome grid.

    Raises:
        ValueError: malformed arrays, or ``record i: ...`` for the first invalid photo (the
            message of :func:`~catreview.predict.fusion.normalise_topk` /
            :func:`~catreview.predict.fusion.normalise_vlm` on that record).
    """
    n = len(data)
    if n == 0:
        raise ValueError("stage1_topk, vlm_probs and human_labels must be non-empty and of equal length, got 0, 0, 0")
    names = list(data.labels)
    human = np.asarray(data.human, dtype=np.int64)
    lab1 = np.asarray(data.stage1_labels, dtype=np.int64)
    raw1 = np.asarray(data.stage1_probs, dtype=np.float64)
    lab2 = np.asarray(data.vlm_labels, dtype=np.int64)
    raw2 = np.asarray(data.vlm_probs, dtype=np.float64)
    has_vlm = np.asarray(data.has_vlm, dtype=bool)
    if not (
        human.shape == has_vlm.shape == (n,)
        and lab1.ndim == lab2.ndim == 2
        and lab1.shape[0] == lab2.shape[0] == n
        and raw1.shape == lab1.shape
        and raw2.shape == lab2.shape
    ):
        raise ValueError("CandidateArrays: human, has_vlm (N,); stage1_*, vlm_* (N, K) and (N, V) of matching shapes")
    lowest = min(lab1.min(initial=-1), lab2.min(initial=-1))
    highest = max(human.max(), lab1.max(initial=-1), lab2.max(initial=-1))
    if len(set(names)) != len(names) or human.min() < 0 or lowest < -1 or highest >= len(names):
        raise ValueError(f"CandidateArrays: label codes must index {len(names)} distinct labels (-1: padding)")

    def record_error(i: int, stage: str) -> ValueError:
        return _record_error(i, source[i] if source is not None else data.record(i), stage)

    k = lab1.shape[1]
    other = names.index(OTHER) if OTHER in names else -2
    valid1 = lab1 >= 0
    r1 = np.where(valid1, raw1, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        bad1 = ~valid1.any(axis=1) | (valid1 & ((lab1 == other) | ~(np.isfinite(raw1) & (raw1 >= 0.0)))).any(axis=1)
        for a in range(k):
            for b in range(a + 1, k):
                bad1 |= valid1[:, a] & valid1[:, b] & (lab1[:, a] == lab1[:, b])
        total1 = _seq_sum(r1) if k else np.zeros(n)
        bad1 |= ~(total1 > 0.0)
    if bad1.any():
        raise record_error(int(np.argmax(bad1)), "stage1")

    valid2 = (lab2 >= 0) & has_vlm[:, None]
    match = valid2[:, :, None] & valid1[:, None, :] & (lab2[:, :, None] == lab1[:, None, :])  # (N, V, K)
    found = match.any(axis=2)
    col = np.where(valid2 & (lab2 == other), k, np.where(found, match.argmax(axis=2), -1))
    col = np.where(valid2, col, k + 1)
    raw2_valid = np.where(valid2, raw2, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        bad2 = (col == -1).any(axis=1)  # a label that is neither a candidate nor OTHER
        bad2 |= has_vlm & (valid1 & ~match.any(axis=1)).any(axis=1)  # a candidate without a probability
        bad2 |= (valid2 & ~(np.isfinite(raw2) & (raw2 >= 0.0))).any(axis=1)
        for a in range(lab2.shape[1]):
            for b in range(a + 1, lab2.shape[1]):
                bad2 |= valid2[:, a] & valid2[:, b] & (lab2[:, a] == lab2[:, b])
        q = _scatter(np.where(col >= 0, raw2_valid, 0.0), np.maximum(col, 0), k + 1)
        total2 = _seq_sum(q)
        bad2 |= has_vlm & ~(total2 > 0.0)
    if bad2.any():
        raise record_error(int(np.argmax(bad2)), "vlm")

    p1 = np.zeros((n, k + 1))
    p1[:, :k] = r1 / total1[:, None]
    p2 = p1.copy()
    rows = np.flatnonzero(has_vlm)
    p2[rows] = q[rows] / total2[rows, None]
    eq = valid1 & (lab1 == human[:, None])
    truth = np.where(eq.any(axis=1), eq.argmax(axis=1), k)
    present = np.unique(human)
    classes = sorted(names[c] for c in present)
    rank = np.full(len(names), -1, dtype=np.int64)
    code_of = {name: c for c, name in enumerate(names)}
    for r, name in enumerate(classes):
        rank[code_of[name]] = r
    with np.errstate(divide="ignore"):
        return _Grid(
            p1=p1,
            p2=p2,
            z1=np.log(p1[:, :k]),
            z2=np.log(p2),
            v_log=np.log(raw2_valid),
            v_col=col,
            vlm_over_one=(valid2 & (raw2 > 1.0)).any(axis=1),
            truth=truth,
            has_vlm=has_vlm,
            cls=rank[human],
            classes=classes,
        )


@dataclass(frozen=True)
class _Fit:
    """Fitted parameters of :func:`calibrate` (see its steps 1-3)."""

    t1: float
    t2: float | None
    weight: float
    excluded1: int
    excluded2: int
    t_fused: float = 1.0


def _scaled(g: _Grid, t1: float, t2: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stages at temperatures ``t1``, ``t2`` (``None``: the VLM unscaled).

    Returns ``(s1, p1, p2)``: ``s1`` (M, K) stage 1 scaled (``scale_probabilities`` of its
    renormalised top-k); ``p1``, ``p2`` (M, K+1) on the grid as the pool sees them
    (``normalise_topk`` of ``s1``; ``normalise_vlm`` of the VLM scaled over its stored order,
    ``p1`` without a verdict).
    """
    s1 = apply_temperature(g.z1, t1)
    m, k = s1.shape
    p1 = np.zeros((m, k + 1))
    p1[:, :k] = s1 / _seq_sum(s1)[:, None]
    p2 = p1.copy()
    rows = np.flatnonzero(g.has_vlm)
    if rows.size:
        if t2 is None:
            p2[rows] = g.p2[rows]
        else:
            if g.vlm_over_one[rows].any():
                raise ValueError("probabilities must be finite and in [0, 1]")
            q = _scatter(apply_temperature(g.v_log[rows], t2), g.v_col[rows], k + 1)
            p2[rows] = q / _seq_sum(q)[:, None]
    return s1, p1, p2


def _pool(p1: np.ndarray, p2: np.ndarray, has_vlm: np.ndarray, weight: float) -> np.ndarray:
    """The linear pool of :func:`~catreview.predict.fusion.fuse` on the grid (stage 1 alone without a verdict)."""
    return np.where(has_vlm[:, None], (1.0 - weight) * p1 + weight * p2, p1)


def _fused(p1: np.ndarray, p2: np.ndarray, has_vlm: np.ndarray, fit: _Fit) -> np.ndarray:
    """The pool at the fitted weight, scaled by the pool's temperature."""
    return apply_temperature(log_probabilities(_pool(p1, p2, has_vlm, fit.weight)), fit.t_fused)


def _fit(g: _Grid, current_weight: float, n_weight_steps: int) -> _Fit:
    """Steps 1-3 of :func:`calibrate` on the photos of ``g``. Raises ValueError as :func:`calibrate`."""
    n, k = g.z1.shape
    rows = np.arange(n)

    # (1) stage-1 temperature over candidate columns only.
    in_cands = g.truth != k
    usable1 = in_cands & np.isfinite(g.z1[rows, np.where(in_cands, g.truth, 0)])
    # With no photo whose label is a candidate, or only one candidate per photo (top_k = 1),
    # there is nothing to fit: stage 1 stays unscaled.
    z1 = g.z1[usable1]
    identifiable1 = bool((np.isfinite(z1).sum(axis=1) >= 2).any())
    t1 = fit_temperature(z1, g.truth[usable1]) if identifiable1 else 1.0

    # (2) VLM temperature over candidates + OTHER, on photos with a verdict.
    z2 = g.z2[g.has_vlm]
    y2 = g.truth[g.has_vlm]
    usable2 = np.isfinite(z2[np.arange(len(y2)), y2]) if len(y2) else np.zeros(0, dtype=bool)
    t2: float | None = None
    if usable2.any():
        try:
            t2 = fit_temperature(z2[usable2], y2[usable2])
        except ValueError as exc:
            raise CalibrationError(f"VLM temperature: {exc}") from exc

    # (3) fusion weight on calibrated distributions, then (3b) the temperature of the pool.
    _, p1, p2 = _scaled(g, t1, t2)
    if not (0.0 <= float(current_weight) <= 1.0):
        raise ValueError(f"current_weight must be in [0, 1], got {current_weight!r}")
    weights, scores = fusion_weight_curve_arrays(p1, p2, g.truth, g.cls, n_steps=n_weight_steps)
    weight = pick_fusion_weight(weights, scores, float(current_weight))
    t_fused = fit_fused_temperature_arrays(_pool(p1, p2, g.has_vlm, weight), g.truth)
    return _Fit(t1, t2, weight, int(n - usable1.sum()), int(len(y2) - usable2.sum()), t_fused)


@dataclass(frozen=True)
class _CrossValidated:
    """Every photo's distributions scored with the fit of the other folds (``None``: no CV)."""

    stage1: np.ndarray | None  # (N, K)
    vlm: np.ndarray | None  # (N, K+1), stage 1 on rows without a verdict
    fused: np.ndarray | None  # (N, K+1)
    note: str | None  # why cross-validation was skipped, else None


def _plan_folds(n: int, cls: np.ndarray, n_folds: int) -> tuple[np.ndarray | None, str | None]:
    """The fold of each photo (stratified by human label), or ``None`` and why there is no CV.

    Raises:
        ValueError: ``n_folds`` is not a valid number of folds (from :func:`~catreview.evaluate.folds.deal_folds`).
    """
    if not n_folds:
        return None, "n_folds=0"
    if n < 2 * n_folds:
        return None, f"{n} photos are too few for {n_folds} folds (need {2 * n_folds})"
    return deal_folds(cls, n_folds), None


def _cross_validate(g: _Grid, folds: np.ndarray, futures: Sequence[Future[_Fit]]) -> _CrossValidated:
    """Score each fold with the fit without it (``futures``: steps 1-3 on the other folds, in
    fold order); the first fold that could not be fitted (a ``ValueError``) skips
    cross-validation with a note."""
    n, k = g.z1.shape
    fold_fits = []
    for f, future in enumerate(futures):
        try:
            fold_fits.append(future.result())
        except ValueError as exc:
            return _CrossValidated(None, None, None, f"fold {f + 1} of {len(futures)} could not be fitted ({exc})")
    stage1, vlm, fused = np.empty((n, k)), np.empty((n, k + 1)), np.empty((n, k + 1))
    for f, fit in enumerate(fold_fits):
        rows = np.flatnonzero(folds == f)
        sub = g.take(rows)
        stage1[rows], p1, vlm[rows] = _scaled(sub, fit.t1, fit.t2)
        fused[rows] = _fused(p1, vlm[rows], sub.has_vlm, fit)
    return _CrossValidated(stage1, vlm, fused, None)


@dataclass(frozen=True)
class _Scores:
    bins: list[ReliabilityBin]
    accuracy: float
    balanced_accuracy: float
    hits: np.ndarray  # (n_classes,) right answers per class
    totals: np.ndarray  # (n_classes,) photos per class


def _score(probs: np.ndarray, truth: np.ndarray, cls: np.ndarray, n_classes: int, n_bins: int) -> _Scores:
    """Confidence (the top probability) and hit (argmax, ties to the first column, is the truth
    column) per photo, binned; accuracy and balanced accuracy (mean per-class recall over the
    classes present, in class order: scikit-learn's ``balanced_accuracy_score``)."""
    ok = probs.argmax(axis=1) == truth
    totals = np.bincount(cls, minlength=n_classes)
    hits = np.bincount(cls[ok], minlength=n_classes)
    present = totals > 0
    return _Scores(
        bins=reliability_bins_from_confidences(probs.max(axis=1), ok, n_bins),
        accuracy=float(ok.mean()),
        balanced_accuracy=float(np.mean(hits[present] / totals[present])),
        hits=hits,
        totals=totals,
    )


def calibrate(
    records: Sequence[ReviewRecord | Mapping[str, Any]] | CandidateArrays,
    n_bins: int = 15,
    min_reviews: int = 30,
    *,
    current_weight: float = 0.5,
    n_weight_steps: int = 101,
    n_folds: int = 5,
) -> CalibrationReport:
    """Fit per-stage temperatures and the fusion weight on reviewed photos, and report metrics.

    Steps: (1) stage-1 ``T`` by :func:`~catreview.evaluate.temperature.fit_temperature` on log
    top-k probabilities over each photo's candidates; (2) VLM ``T`` the same way over candidates +
    OTHER, on photos with a VLM verdict; (3) the weight by
    :func:`~catreview.evaluate.fusion_weight.fusion_weight_curve_arrays` (the grid search of
    :func:`~catreview.evaluate.fusion_weight.fit_fusion_weight`) on the temperature-scaled
    distributions, then the pool's own temperature by
    :func:`~catreview.evaluate.temperature.fit_fused_temperature_arrays`; (4) ECE, accuracy and
    balanced accuracy of each stage before and after, and per-breed accuracy.

    Scoring of a human label that is not among the stage-1 candidates: a miss for stage 1 (and
    left out of its temperature fit, which has no such outcome); for the VLM and the fusion the
    right answer is OTHER. Balanced accuracy averages over the human labels (breeds) present.
    Photos without a VLM verdict count for stage 1 and the fusion (which equals stage 1 there).
    Stage-1 confidences are over its candidates (renormalised top-k), before and after scaling.
    The fit (steps 1-3) uses all photos, and the "after" numbers are measured on those same photos,
    so they are optimistic. The ``*_cv`` numbers are honest estimates: ``n_folds``-fold
    cross-validation, stratified by human label (:func:`~catreview.evaluate.folds.stratified_folds`),
    repeats steps 1-3 without each fold (the folds on a thread pool, one per core, while the full
    fit runs) and scores that fold's photos with the result (Hastie,
    Tibshirani & Friedman, *The Elements of Statistical Learning*, 2nd ed., section 7.10). If a
    fold cannot be fitted, or there are fewer than ``2 * n_folds`` photos, the CV values are
    ``None`` and ``cv_note`` says why; the in-sample fit is still returned.

    Everything runs on arrays (see the module docstring): about 3 s for 127,000 photos on 2 CPU
    cores (``benchmarks/calibration_bench.py``).

    Args:
        records: :class:`ReviewRecord` objects or mappings with keys ``human_label``,
            ``stage1_topk`` and optionally ``vlm_probs``; or the same photos as
            :class:`CandidateArrays` (what :func:`catreview.evaluate.store.fit_and_store` passes).
        n_bins: ECE bins.
        min_reviews: fewest records accepted (``FusionConfig.calibration_min_reviews``, default 30).
        current_weight: the configured fusion weight ("before", and the tie-break target).
        n_weight_steps: weight grid size.
        n_folds: cross-validation folds (default 5; 0 turns cross-validation off).

    Returns:
        A :class:`CalibrationReport`.

    Raises:
        CalibrationError: (a ``ValueError``) fewer than ``min_reviews`` records, or a VLM or
            pool temperature the records do not determine.
        ValueError: invalid records (message names the record). With no human label among the
            stage-1 candidates, stage 1's ``T`` stays 1.
        TypeError: a record that is neither a ReviewRecord nor a mapping.
    """
    if len(records) < min_reviews:
        raise CalibrationError(
            f"calibration needs at least {min_reviews} reviewed photos, got {len(records)}; "
            "review more photos or lower fusion.calibration_min_reviews"
        )
    n_bins = check_n_bins(n_bins)
    if isinstance(records, CandidateArrays):
        data, source = records, None
    else:
        source = [_as_record(i, r) for i, r in enumerate(records)]
        data = CandidateArrays.from_records(source)
    g = _grid(data, source)  # validates the records, naming the first bad one
    n, k = g.z1.shape
    try:
        folds, cv_note = _plan_folds(n, g.cls, n_folds)
        folds_error = None
    except ValueError as exc:  # raised after the fit's own errors, as before
        folds, cv_note, folds_error = None, None, exc
    # The fits without each fold run on a thread pool while this thread fits on all photos.
    with ThreadPoolExecutor(max_workers=max(1, min(n_folds if folds is not None else 1, os.cpu_count() or 1))) as pool:
        futures = (
            []
            if folds is None
            else [pool.submit(_fit, g.take(folds != f), current_weight, n_weight_steps) for f in range(n_folds)]
        )
        try:
            fit = _fit(g, current_weight, n_weight_steps)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
        if folds_error is not None:
            raise folds_error
        scaled1, p1, p2 = _scaled(g, fit.t1, fit.t2)
        cv = _CrossValidated(None, None, None, cv_note) if folds is None else _cross_validate(g, folds, futures)

    # (4) metrics.
    reliability: dict[str, list[ReliabilityBin]] = {}
    per_breed: dict[str, dict[str, ClassAccuracy]] = {}
    breeds = g.classes

    def measure(
        key: str,
        rows: np.ndarray | slice,
        before: np.ndarray,
        after: np.ndarray,
        cv_probs: np.ndarray | None,
    ) -> StageMetrics:
        truth, cls = g.truth[rows], g.cls[rows]

        def scored(probs: np.ndarray, tag: str) -> _Scores:
            s = _score(probs, truth, cls, len(breeds), n_bins)
            reliability[f"{key}_{tag}"] = s.bins
            return s

        s0, s1 = scored(before[rows], "before"), scored(after[rows], "after")
        sc = scored(cv_probs[rows], "cv") if cv_probs is not None else None
        for b, (h, t) in enumerate(zip(s1.hits.tolist(), s1.totals.tolist())):
            per_breed.setdefault(breeds[b], {})[key] = ClassAccuracy(h, t, h / t if t else math.nan)
        return StageMetrics(
            int(cls.shape[0]),
            ece_from_bins(s0.bins),
            ece_from_bins(s1.bins),
            s0.accuracy,
            s1.accuracy,
            s0.balanced_accuracy,
            s1.balanced_accuracy,
            None if sc is None else ece_from_bins(sc.bins),
            None if sc is None else sc.accuracy,
            None if sc is None else sc.balanced_accuracy,
        )

    everyone = slice(None)
    m1 = measure("stage1", everyone, g.p1[:, :k], scaled1, cv.stage1)
    mv = None
    if g.has_vlm.any():
        mv = measure("vlm", g.has_vlm, g.p2, p2, cv.vlm)
    else:
        for b in breeds:
            per_breed.setdefault(b, {})["vlm"] = ClassAccuracy(0, 0, math.nan)
    fused_before = _pool(g.p1, g.p2, g.has_vlm, float(current_weight))
    mf = measure("fused", everyone, fused_before, _fused(p1, p2, g.has_vlm, fit), cv.fused)

    return CalibrationReport(
        n_reviews=n,
        n_with_vlm=int(g.has_vlm.sum()),
        n_bins=n_bins,
        stage1_temperature=fit.t1,
        vlm_temperature=fit.t2,
        current_weight=float(current_weight),
        weight=fit.weight,
        fused_temperature=fit.t_fused,
        stage1=m1,
        vlm=mv,
        fused=mf,
        per_breed=per_breed,
        reliability=reliability,
        excluded_from_fit={"stage1": fit.excluded1, "vlm": fit.excluded2},
        n_folds=n_folds if cv.note is None else 0,
        cv_note=cv.note,
    )
