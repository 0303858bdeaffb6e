"""The per-record calibration fit as it was before it was vectorised: a reference for the tests.

:func:`reference_calibrate` is the old ``catreview.evaluate.calibration.calibrate`` (dictionaries
per photo and per fold, built from the scalar helpers of :mod:`catreview.predict.fusion`,
:mod:`catreview.predict.temperature` and :mod:`catreview.metrics`), with its own copies of the old
``outcome_matrices``, weight search, temperature fits and folds, so that the array implementation
is compared with code it does not share. Too slow for more than a few thousand photos.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catreview.evaluate.calibration import CalibrationReport, ReviewRecord, StageMetrics
from catreview.evaluate.errors import CalibrationError
from catreview.metrics import (
    ClassAccuracy,
    ReliabilityBin,
    balanced_accuracy,
    ece_from_bins,
    per_class_accuracy,
    reliability_bins_from_confidences,
)
from catreview.predict.fusion import OTHER, TopK, fuse, normalise_topk, normalise_vlm, top_label
from catreview.predict.temperature import log_probabilities, scale_probabilities

# --------------------------------------------------------------------------- temperature (old temperature.py)


def _masked_stats(z: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    finite = np.isfinite(z)
    zb = beta * z
    row_max = zb.max(axis=1, keepdims=True)
    e = np.exp(zb - row_max)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    expect = np.where(finite, p * np.where(finite, z, 0.0), 0.0).sum(axis=1)
    return (row_max + np.log(s))[:, 0], expect


def ref_fit_temperature(z: np.ndarray, y: np.ndarray, bounds=(1e-2, 1e2), tol=1e-10) -> float:
    if not np.all(np.isfinite(z[np.arange(len(y)), y])):
        raise ValueError("a label's logit is -inf (zero probability): drop such rows before fitting")
    t_min, t_max = bounds
    finite = np.isfinite(z)
    spread = np.where(finite, z, -np.inf).max(axis=1) - np.where(finite, z, np.inf).min(axis=1)
    if not np.any(spread > 0.0):
        raise ValueError("temperature is not identifiable: no row has two different finite logits")
    z_true = z[np.arange(len(y)), y]

    def grad(log_t: float) -> float:
        beta = math.exp(-log_t)
        _, expect = _masked_stats(z, beta)
        return beta * float(np.mean(z_true - expect))

    lo, hi = math.log(t_min), math.log(t_max)
    if grad(lo) >= 0.0:
        warnings.warn("NLL still falls below T_min; returning the bound", RuntimeWarning, stacklevel=2)
        return t_min
    if grad(hi) <= 0.0:
        warnings.warn("NLL still falls above T_max; returning the bound", RuntimeWarning, stacklevel=2)
        return t_max
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if grad(mid) > 0.0:
            hi = mid
        else:
            lo = mid
    return float(math.exp(0.5 * (lo + hi)))


def ref_fit_fused_temperature(fused: Sequence[Mapping[str, float]], human_labels: Sequence[str]) -> float:
    width = max((len(d) for d in fused), default=0)
    z = np.full((len(fused), max(width, 1)), -np.inf)
    y = np.zeros(len(fused), dtype=np.int64)
    for i, (d, h) in enumerate(zip(fused, human_labels)):
        keys = list(d)
        z[i, : len(keys)] = log_probabilities([d[k] for k in keys])
        target = h if h in d else OTHER
        y[i] = keys.index(target) if target in d else -1
    usable = (y >= 0) & np.isfinite(z[np.arange(len(y)), np.maximum(y, 0)])
    if not (np.isfinite(z[usable]).sum(axis=1) >= 2).any():
        return 1.0
    try:
        return ref_fit_temperature(z[usable], y[usable])
    except ValueError as exc:
        raise CalibrationError(f"fused temperature: {exc}") from exc


# --------------------------------------------------------------------------- fusion weight (old fusion_weight.py)


@dataclass(frozen=True)
class _Matrices:
    p1: np.ndarray
    p2: np.ndarray
    truth: np.ndarray


def ref_outcome_matrices(stage1_topk, vlm_probs, human_labels) -> _Matrices:
    n = len(human_labels)
    norm1 = []
    for i, topk in enumerate(stage1_topk):
        try:
            norm1.append(normalise_topk(topk))
        except ValueError as exc:
            raise ValueError(f"record {i}: {exc}") from exc
    k_max = max(len(p) for p in norm1)
    other = k_max
    p1 = np.zeros((n, k_max + 1))
    p2 = np.zeros((n, k_max + 1))
    truth = np.full(n, other, dtype=np.int64)
    for i, (d1, v, label) in enumerate(zip(norm1, vlm_probs, human_labels)):
        cands = list(d1)
        p1[i, : len(cands)] = list(d1.values())
        if v is None:
            p2[i] = p1[i]
        else:
            try:
                d2 = normalise_vlm(v, cands)
            except ValueError as exc:
                raise ValueError(f"record {i}: {exc}") from exc
            p2[i, : len(cands)] = [d2[c] for c in cands]
            p2[i, other] = d2[OTHER]
        if label in d1:
            truth[i] = cands.index(label)
    return _Matrices(p1, p2, truth)


def ref_fusion_weight_curve(stage1_topk, vlm_probs, human_labels, n_steps=101) -> tuple[np.ndarray, np.ndarray]:
    weights = np.linspace(0.0, 1.0, int(n_steps))
    m = ref_outcome_matrices(stage1_topk, vlm_probs, human_labels)
    classes = sorted(set(human_labels))
    class_index = np.array([classes.index(h) for h in human_labels], dtype=np.int64)
    scores = np.empty_like(weights)
    for j, w in enumerate(weights):
        pred = ((1.0 - w) * m.p1 + w * m.p2).argmax(axis=1)
        correct = pred == m.truth
        hits = np.bincount(class_index, weights=correct.astype(np.float64), minlength=len(classes))
        totals = np.bincount(class_index, minlength=len(classes))
        scores[j] = float(np.mean(hits / totals))
    return weights, scores


def ref_fit_fusion_weight(stage1_topk, vlm_probs, human_labels, current_weight=0.5, n_steps=101) -> float:
    if not (0.0 <= float(current_weight) <= 1.0):
        raise ValueError(f"current_weight must be in [0, 1], got {current_weight!r}")
    weights, scores = ref_fusion_weight_curve(stage1_topk, vlm_probs, human_labels, n_steps)
    tied = weights[scores >= scores.max() - 1e-12]
    distance = np.abs(tied - current_weight)
    return float(tied[distance <= distance.min() + 1e-12].min())


def ref_stratified_folds(labels: Sequence[str], n_folds: int) -> np.ndarray:
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    folds = np.empty(len(labels), dtype=np.int64)
    deal = 0
    for label in sorted(by_label, key=str):
        for i in by_label[label]:
            folds[i] = deal % n_folds
            deal += 1
    return folds


# --------------------------------------------------------------------------- calibrate (old calibration.py)


@dataclass(frozen=True)
class _Fit:
    t1: float
    t2: float | None
    weight: float
    excluded1: int
    excluded2: int
    t_fused: float = 1.0

    def stage1(self, topk: TopK) -> dict[str, float]:
        return scale_probabilities(normalise_topk(topk), self.t1)

    def vlm(self, probs: Mapping[str, float] | None) -> dict[str, float] | None:
        if probs is None:
            return None
        return dict(probs) if self.t2 is None else scale_probabilities(probs, self.t2)

    def pooled(self, topk, probs) -> dict[str, float]:
        return fuse(self.stage1(topk), self.vlm(probs), self.weight)

    def fused(self, topk, probs) -> dict[str, float]:
        return scale_probabilities(self.pooled(topk, probs), self.t_fused)


def _fit(recs: Sequence[ReviewRecord], current_weight: float, n_weight_steps: int) -> _Fit:
    human = [r.human_label for r in recs]
    matrices = ref_outcome_matrices([r.stage1_topk for r in recs], [r.vlm_probs for r in recs], human)
    n, k_plus_other = matrices.p1.shape
    other_col = k_plus_other - 1
    has_vlm = np.array([r.vlm_probs is not None for r in recs], dtype=bool)
    z1 = log_probabilities(matrices.p1[:, :other_col])
    in_cands = matrices.truth != other_col
    usable1 = in_cands & np.isfinite(z1[np.arange(n), np.where(in_cands, matrices.truth, 0)])
    identifiable1 = bool((np.isfinite(z1[usable1]).sum(axis=1) >= 2).any())
    t1 = ref_fit_temperature(z1[usable1], matrices.truth[usable1]) if identifiable1 else 1.0
    z2 = log_probabilities(matrices.p2[has_vlm])
    y2 = matrices.truth[has_vlm]
    usable2 = np.isfinite(z2[np.arange(len(y2)), y2]) if len(y2) else np.zeros(0, dtype=bool)
    t2: float | None = None
    if usable2.any():
        try:
            t2 = ref_fit_temperature(z2[usable2], y2[usable2])
        except ValueError as exc:
            raise CalibrationError(f"VLM temperature: {exc}") from exc
    partial = _Fit(t1, t2, current_weight, int(n - usable1.sum()), int(len(y2) - usable2.sum()))
    weight = ref_fit_fusion_weight(
        [partial.stage1(r.stage1_topk) for r in recs],
        [partial.vlm(r.vlm_probs) for r in recs],
        human,
        current_weight=current_weight,
        n_steps=n_weight_steps,
    )
    pooled = _Fit(t1, t2, weight, partial.excluded1, partial.excluded2)
    t_fused = ref_fit_fused_temperature([pooled.pooled(r.stage1_topk, r.vlm_probs) for r in recs], human)
    return _Fit(t1, t2, weight, partial.excluded1, partial.excluded2, t_fused)


def _stage_outcome(dists, human) -> tuple[np.ndarray, np.ndarray, list[str]]:
    conf = np.array([max(d.values()) for d in dists])
    correct, effective = [], []
    for d, h in zip(dists, human):
        pred = top_label(d)
        ok = pred == h or (pred == OTHER and h not in d)
        correct.append(ok)
        effective.append(h if ok else pred)
    return conf, np.array(correct, dtype=bool), effective


def _cross_validate(recs, n_folds, current_weight, n_weight_steps):
    n = len(recs)
    if not n_folds:
        return [], [], [], "n_folds=0"
    if n < 2 * n_folds:
        return [], [], [], f"{n} photos are too few for {n_folds} folds (need {2 * n_folds})"
    folds = ref_stratified_folds([r.human_label for r in recs], n_folds)
    fits = []
    for f in range(n_folds):
        try:
            fits.append(_fit([r for r, g in zip(recs, folds) if g != f], current_weight, n_weight_steps))
        except ValueError as exc:
            return [], [], [], f"fold {f + 1} of {n_folds} could not be fitted ({exc})"
    return (
        [fits[g].stage1(r.stage1_topk) for r, g in zip(recs, folds)],
        [fits[g].vlm(r.vlm_probs) for r, g in zip(recs, folds)],
        [fits[g].fused(r.stage1_topk, r.vlm_probs) for r, g in zip(recs, folds)],
        None,
    )


def reference_calibrate(
    records: Sequence[ReviewRecord],
    n_bins: int = 15,
    min_reviews: int = 30,
    *,
    current_weight: float = 0.5,
    n_weight_steps: int = 101,
    n_folds: int = 5,
) -> CalibrationReport:
    """The old per-record ``calibrate`` (same arguments and report)."""
    if len(records) < min_reviews:
        raise CalibrationError(f"calibration needs at least {min_reviews} reviewed photos, got {len(records)}")
    recs = list(records)
    human = [r.human_label for r in recs]
    n = len(recs)
    fit = _fit(recs, current_weight, n_weight_steps)
    stage1 = [normalise_topk(r.stage1_topk) for r in recs]
    has_vlm = np.array([r.vlm_probs is not None for r in recs], dtype=bool)
    scaled1 = [fit.stage1(r.stage1_topk) for r in recs]
    scaled_vlm = [fit.vlm(r.vlm_probs) for r in recs]
    cv1, cvv, cvf, note = _cross_validate(recs, n_folds, current_weight, n_weight_steps)
    reliability: dict[str, list[ReliabilityBin]] = {}
    per_breed: dict[str, dict[str, ClassAccuracy]] = {}
    breeds = sorted(set(human))

    def measure(key, before, after, cv_dists, who) -> StageMetrics:
        def scored(dists, tag):
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

    m1 = measure("stage1", stage1, scaled1, cv1, human)
    mv = None
    if has_vlm.any():
        raw_v = [normalise_vlm(v, list(s1)) for s1, v in zip(stage1, (r.vlm_probs for r in recs)) if v is not None]
        cal_v = [normalise_vlm(v, list(s1)) for s1, v in zip(stage1, scaled_vlm) if v is not None]
        cv_v = [normalise_vlm(v, list(s1)) for s1, v in zip(stage1, cvv) if v is not None]
        mv = measure("vlm", raw_v, cal_v, cv_v, [h for h, ok in zip(human, has_vlm) if ok])
    else:
        for b in breeds:
            per_breed.setdefault(b, {})["vlm"] = ClassAccuracy(0, 0, math.nan)
    fused_before = [fuse(r.stage1_topk, r.vlm_probs, current_weight) for r in recs]
    fused_after = [fit.fused(r.stage1_topk, r.vlm_probs) for r in recs]
    mf = measure("fused", fused_before, fused_after, cvf, human)
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
        n_folds=n_folds if note is None else 0,
        cv_note=note,
    )


def assert_reports_equal(new: CalibrationReport, old: CalibrationReport, tol: float = 1e-6) -> None:
    """Counts, accuracies, the weight and bin counts exactly; temperatures, ECEs and confidences to ``tol``."""

    def close(a: Any, b: Any, what: str) -> None:
        if a is None or b is None:
            assert a is b, what
        elif isinstance(a, float) and math.isnan(a):
            assert isinstance(b, float) and math.isnan(b), what
        else:
            assert abs(a - b) <= tol, f"{what}: {a!r} vs {b!r}"

    for name in ("n_reviews", "n_with_vlm", "n_bins", "current_weight", "weight", "excluded_from_fit", "n_folds"):
        assert getattr(new, name) == getattr(old, name), name
    assert new.cv_note == old.cv_note and new.data_note == old.data_note
    close(new.stage1_temperature, old.stage1_temperature, "stage1_temperature")
    close(new.vlm_temperature, old.vlm_temperature, "vlm_temperature")
    close(new.fused_temperature, old.fused_temperature, "fused_temperature")
    for stage in ("stage1", "vlm", "fused"):
        a, b = getattr(new, stage), getattr(old, stage)
        assert (a is None) == (b is None), stage
        if a is None:
            continue
        assert a.n == b.n
        for f in ("accuracy_before", "accuracy_after", "accuracy_after_cv"):
            assert getattr(a, f) == getattr(b, f), f"{stage}.{f}"
        for f in ("balanced_accuracy_before", "balanced_accuracy_after", "balanced_accuracy_after_cv"):
            close(getattr(a, f), getattr(b, f), f"{stage}.{f}")  # a mean of exact per-class ratios
        for f in ("ece_before", "ece_after", "ece_after_cv"):
            close(getattr(a, f), getattr(b, f), f"{stage}.{f}")
    assert list(new.per_breed) == list(old.per_breed)
    for breed, stages in old.per_breed.items():
        assert list(new.per_breed[breed]) == list(stages)
        for stage, acc in stages.items():
            got = new.per_breed[breed][stage]
            assert got[:2] == acc[:2], (breed, stage)
            close(got.accuracy, acc.accuracy, f"{breed} {stage}")
    assert list(new.reliability) == list(old.reliability)
    for key, bins in old.reliability.items():
        got_bins = new.reliability[key]
        assert [b.count for b in got_bins] == [b.count for b in bins], key
        for g, b in zip(got_bins, bins):
            assert (g.lower, g.upper) == (b.lower, b.upper)
            close(g.confidence, b.confidence, f"{key} confidence")
            close(g.accuracy, b.accuracy, f"{key} accuracy")
