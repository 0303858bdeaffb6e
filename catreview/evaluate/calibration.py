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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import numpy as np

from catreview.evaluate.errors import CalibrationError
from catreview.evaluate.folds import stratified_folds
from catreview.evaluate.fusion_weight import fit_fusion_weight, outcome_matrices
from catreview.evaluate.temperature import fit_fused_temperature, fit_temperature
from catreview.metrics import (
    ClassAccuracy,
    ReliabilityBin,
    balanced_accuracy,
    check_n_bins,
    ece_from_bins,
    per_class_accuracy,
    reliability_bins_from_confidences,
)
from catreview.predict.fusion import OTHER, TopK, fuse, normalise_topk, normalise_vlm, top_label
from catreview.predict.temperature import log_probabilities, scale_probabilities

__all__ = [
    "STAGES",
    "STAGE_TITLES",
    "CalibrationReport",
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


def _stage_outcome(dists: list[dict[str, float]], human: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Confidence, correctness and an effective prediction per photo.

    A prediction is right when it is the human label, or is OTHER while the human label is not a
    candidate. The effective prediction is the human label when right, else the predicted label,
    so that per-class metrics over human labels count OTHER-for-a-non-candidate as a hit.
    """
    conf = np.array([max(d.values()) for d in dists])
    correct, effective = [], []
    for d, h in zip(dists, human):
        pred = top_label(d)
        ok = pred == h or (pred == OTHER and h not in d)
        correct.append(ok)
        effective.append(h if ok else pred)
    return conf, np.array(correct, dtype=bool), effective


def _scaled_vlm(v: Mapping[str, float], t: float | None) -> dict[str, float]:
    return dict(v) if t is None else scale_probabilities(v, t)


@dataclass(frozen=True)
class _Fit:
    """Fitted parameters of :func:`calibrate` (see its steps 1-3)."""

    t1: float
    t2: float | None
    weight: float
    excluded1: int
    excluded2: int
    t_fused: float = 1.0

    def stage1(self, topk: TopK) -> dict[str, float]:
        return scale_probabilities(normalise_topk(topk), self.t1)

    def vlm(self, probs: Mapping[str, float] | None) -> dict[str, float] | None:
        return None if probs is None else _scaled_vlm(probs, self.t2)

    def pooled(self, topk: TopK, probs: Mapping[str, float] | None) -> dict[str, float]:
        """The linear pool of the scaled stages, before the fused temperature."""
        return fuse(self.stage1(topk), self.vlm(probs), self.weight)

    def fused(self, topk: TopK, probs: Mapping[str, float] | None) -> dict[str, float]:
        return scale_probabilities(self.pooled(topk, probs), self.t_fused)


def _fit(recs: Sequence[ReviewRecord], current_weight: float, n_weight_steps: int) -> _Fit:
    """Steps 1-3 of :func:`calibrate` on ``recs``. Raises ValueError as :func:`calibrate`."""
    human = [r.human_label for r in recs]
    matrices = outcome_matrices([r.stage1_topk for r in recs], [r.vlm_probs for r in recs], human)
    n, k_plus_other = matrices.p1.shape
    other_col = k_plus_other - 1
    has_vlm = np.array([r.vlm_probs is not None for r in recs], dtype=bool)

    # (1) stage-1 temperature over candidate columns only.
    z1 = log_probabilities(matrices.p1[:, :other_col])
    in_cands = matrices.truth != other_col
    usable1 = in_cands & np.isfinite(z1[np.arange(n), np.where(in_cands, matrices.truth, 0)])
    # With no photo whose label is a candidate, or only one candidate per photo (top_k = 1),
    # there is nothing to fit: stage 1 stays unscaled.
    identifiable1 = bool((np.isfinite(z1[usable1]).sum(axis=1) >= 2).any())
    t1 = fit_temperature(z1[usable1], matrices.truth[usable1]) if identifiable1 else 1.0

    # (2) VLM temperature over candidates + OTHER, on photos with a verdict.
    z2 = log_probabilities(matrices.p2[has_vlm])
    y2 = matrices.truth[has_vlm]
    usable2 = np.isfinite(z2[np.arange(len(y2)), y2]) if len(y2) else np.zeros(0, dtype=bool)
    t2: float | None = None
    if usable2.any():
        try:
            t2 = fit_temperature(z2[usable2], y2[usable2])
        except ValueError as exc:
            raise CalibrationError(f"VLM temperature: {exc}") from exc

    # (3) fusion weight on calibrated distributions.
    partial = _Fit(t1, t2, current_weight, int(n - usable1.sum()), int(len(y2) - usable2.sum()))
    weight = fit_fusion_weight(
        [partial.stage1(r.stage1_topk) for r in recs],
        [partial.vlm(r.vlm_probs) for r in recs],
        human,
        current_weight=current_weight,
        n_steps=n_weight_steps,
    )
    # (3b) temperature of the pool at that weight.
    pooled = _Fit(t1, t2, weight, partial.excluded1, partial.excluded2)
    t_fused = fit_fused_temperature([pooled.pooled(r.stage1_topk, r.vlm_probs) for r in recs], human)
    return _Fit(t1, t2, weight, partial.excluded1, partial.excluded2, t_fused)


@dataclass(frozen=True)
class _CrossValidated:
    """Every photo's distributions scored with the fit of the other folds (empty lists: no CV)."""

    stage1: list[dict[str, float]]
    vlm: list[dict[str, float] | None]
    fused: list[dict[str, float]]
    note: str | None  # why cross-validation was skipped, else None


def _cross_validate(
    recs: Sequence[ReviewRecord], n_folds: int, current_weight: float, n_weight_steps: int
) -> _CrossValidated:
    """Refit steps 1-3 without each fold (:func:`stratified_folds` by human label) and score that fold."""
    n = len(recs)
    if not n_folds:
        return _CrossValidated([], [], [], "n_folds=0")
    if n < 2 * n_folds:
        return _CrossValidated([], [], [], f"{n} photos are too few for {n_folds} folds (need {2 * n_folds})")
    folds = stratified_folds([r.human_label for r in recs], n_folds)
    fold_fits = []
    for f in range(n_folds):
        try:
            fold_fits.append(_fit([r for r, g in zip(recs, folds) if g != f], current_weight, n_weight_steps))
        except ValueError as exc:
            return _CrossValidated([], [], [], f"fold {f + 1} of {n_folds} could not be fitted ({exc})")
    return _CrossValidated(
        stage1=[fold_fits[g].stage1(r.stage1_topk) for r, g in zip(recs, folds)],
        vlm=[fold_fits[g].vlm(r.vlm_probs) for r, g in zip(recs, folds)],
        fused=[fold_fits[g].fused(r.stage1_topk, r.vlm_probs) for r, g in zip(recs, folds)],
        note=None,
    )


def calibrate(
    records: Sequence[ReviewRecord | Mapping[str, Any]],
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
    :func:`~catreview.evaluate.fusion_weight.fit_fusion_weight` on the temperature-scaled
    distributions, then the pool's own temperature by
    :func:`~catreview.evaluate.temperature.fit_fused_temperature`; (4) ECE, accuracy and
    balanced accuracy of each stage before and after, and per-breed accuracy.

    Scoring of a human label that is not among the stage-1 candidates: a miss for stage 1 (and
    left out of its temperature fit, which has no such outcome); for the VLM and the fusion the
    right answer is OTHER. Balanced accuracy averages over the human labels (breeds) present.
    Photos without a VLM verdict count for stage 1 and the fusion (which equals stage 1 there).
    Stage-1 confidences are over its candidates (renormalised top-k), before and after scaling.
    The fit (steps 1-3) uses all photos, and the "after" numbers are measured on those same photos,
    so they are optimistic. The ``*_cv`` numbers are honest estimates: ``n_folds``-fold
    cross-validation, stratified by human label (:func:`~catreview.evaluate.folds.stratified_folds`),
    repeats steps 1-3 without each fold and scores that fold's photos with the result (Hastie,
    Tibshirani & Friedman, *The Elements of Statistical Learning*, 2nd ed., section 7.10). If a
    fold cannot be fitted, or there are fewer than ``2 * n_folds`` photos, the CV values are
    ``None`` and ``cv_note`` says why; the in-sample fit is still returned.

    Args:
        records: :class:`ReviewRecord` objects or mappings with keys ``human_label``,
            ``stage1_topk`` and optionally ``vlm_probs``.
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
    recs = [_as_record(i, r) for i, r in enumerate(records)]
    human = [r.human_label for r in recs]
    n = len(recs)
    fit = _fit(recs, current_weight, n_weight_steps)  # validates the records, naming the bad one
    stage1 = [normalise_topk(r.stage1_topk) for r in recs]
    has_vlm = np.array([r.vlm_probs is not None for r in recs], dtype=bool)
    scaled1 = [fit.stage1(r.stage1_topk) for r in recs]
    scaled_vlm = [fit.vlm(r.vlm_probs) for r in recs]
    cv = _cross_validate(recs, n_folds, current_weight, n_weight_steps)

    # (4) metrics.
    reliability: dict[str, list[ReliabilityBin]] = {}
    per_breed: dict[str, dict[str, ClassAccuracy]] = {}
    breeds = sorted(set(human))

    def measure(
        key: str,
        before: list[dict[str, float]],
        after: list[dict[str, float]],
        cv_dists: list[dict[str, float]],
        who: list[str],
    ) -> StageMetrics:
        def scored(dists: list[dict[str, float]], tag: str) -> tuple[float, float, float, list[str]]:
            conf, ok, eff = _stage_outcome(dists, who)
            bins = reliability_bins_from_confidences(conf, ok, n_bins)
            reliability[f"{key}_{tag}"] = bins
            return ece_from_bins(bins), float(ok.mean()), balanced_accuracy(who, eff), eff

        e0, a0, b0, _ = scored(before, "before")
        e1, a1, b1, eff_after = scored(after, "after")
        ec, ac, bc = scored(cv_dists, "cv")[:3] if cv_dists else (None, None, None)
        counts = per_class_accuracy(who, eff_after, labels=breeds)
        for b in breeds:
            per_breed.setdefault(b, {})[key] = counts[b]
        return StageMetrics(len(who), e0, e1, a0, a1, b0, b1, ec, ac, bc)

    m1 = measure("stage1", stage1, scaled1, cv.stage1, human)
    mv = None
    if has_vlm.any():
        raw_v = [normalise_vlm(v, list(s1)) for s1, v in zip(stage1, (r.vlm_probs for r in recs)) if v is not None]
        cal_v = [normalise_vlm(v, list(s1)) for s1, v in zip(stage1, scaled_vlm) if v is not None]
        cv_v = [normalise_vlm(v, list(s1)) for s1, v in zip(stage1, cv.vlm) if v is not None]
        mv = measure("vlm", raw_v, cal_v, cv_v, [h for h, ok in zip(human, has_vlm) if ok])
    else:
        for b in breeds:
            per_breed.setdefault(b, {})["vlm"] = ClassAccuracy(0, 0, math.nan)
    fused_before = [fuse(r.stage1_topk, r.vlm_probs, current_weight) for r in recs]
    fused_after = [fit.fused(r.stage1_topk, r.vlm_probs) for r in recs]
    mf = measure("fused", fused_before, fused_after, cv.fused, human)

    return CalibrationReport(
        n_reviews=n,
        n_with_vlm=int(has_vlm.sum()),
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
