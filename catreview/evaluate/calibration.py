"""Calibration and evaluation of both stages and their fusion, fitted on human-reviewed photos.

What is measured and fitted:

* **Expected calibration error** (ECE) with equal-width confidence bins and **reliability bins**
  for a reliability diagram: Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural
  Networks", ICML (section 2, eq. 3); also Naeini, Cooper & Hauskrecht 2015.
* **Temperature scaling** (Guo et al. 2017, section 4.2): one scalar ``T > 0`` per stage,
  ``probs = softmax(logits / T)``, fitted by minimising the negative log-likelihood (NLL). It never
  changes a stage's argmax.
* **Balanced accuracy** (mean per-class recall; Brodersen, Ong, Stephan & Buhmann 2010, "The
  balanced accuracy and its posterior distribution", ICPR; scikit-learn's
  ``balanced_accuracy_score``), per-class accuracy and macro F1. The users' 67 classes are heavily
  imbalanced, so plain accuracy mostly measures the majority class.
* The **fusion weight** (the VLM's share in the linear pool of :mod:`catreview.predict.fusion`), chosen by
  grid search to maximise balanced accuracy of the fused argmax.

Stored predictions are probabilities, not logits: stage 1 keeps its top-k probabilities, and the
VLM keeps probabilities from its candidate log-likelihood scores. Log-probabilities are valid
logits here: over a fixed candidate set, ``softmax(log p) = p / sum(p)``, so
``softmax(log p / T) = p**(1/T) / sum(p**(1/T))``, and adding a constant to a row (stage 1's
top-k renormalisation, or the VLM's log-normaliser) does not change the result. Temperature
scaling of stored probabilities is therefore exactly temperature scaling of the stage's scores,
restricted to the candidates. A probability of exactly 0 becomes the logit ``-inf`` and stays 0 at
every temperature.

How a human label outside the stage-1 candidates is scored (see :func:`calibrate`): for stage 1 it
is a miss (no candidate can be right); for the VLM and the fusion the correct outcome is
:data:`catreview.predict.fusion.OTHER` ("none of these").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from catreview.predict.fusion import OTHER, TopK, fuse, normalise_topk, normalise_vlm, top_label

__all__ = [
    "CalibrationReport",
    "ReliabilityBin",
    "ReviewRecord",
    "StageMetrics",
    "apply_temperature",
    "balanced_accuracy",
    "calibrate",
    "ece_from_bins",
    "expected_calibration_error",
    "fit_fused_temperature",
    "fit_fusion_weight",
    "fit_temperature",
    "fusion_weight_curve",
    "log_probabilities",
    "macro_f1",
    "per_class_accuracy",
    "reliability_bins",
    "reliability_bins_from_confidences",
    "scale_probabilities",
    "stratified_folds",
    "temperature_nll",
]

_TIE_TOL = 1e-12


# --------------------------------------------------------------------------- input checks


def _as_probs_2d(probs: Any) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"probs must have shape (N, C) with N, C >= 1, got {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0.0) or np.any(arr > 1.0):
        raise ValueError("probs must be finite and in [0, 1]")
    return arr


def _as_labels(labels: Any, n: int, n_classes: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if np.any(arr < 0) or np.any(arr >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes}), got min {arr.min()}, max {arr.max()}")
    return arr


def _as_logits_2d(logits: Any) -> np.ndarray:
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, C) with N, C >= 1, got {arr.shape}")
    if np.any(np.isnan(arr)) or np.any(arr == np.inf):
        raise ValueError("logits must not contain NaN or +inf (-inf marks a non-candidate)")
    if not np.all(np.any(np.isfinite(arr), axis=1)):
        raise ValueError("every row of logits needs at least one finite entry")
    return arr


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def _check_n_bins(n_bins: int) -> int:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


# --------------------------------------------------------------------------- ECE / reliability


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin ``(lower, upper]`` (the first bin also holds 0).

    ``confidence`` and ``accuracy`` are the mean confidence and the fraction correct of the
    ``count`` predictions in the bin; both are NaN when ``count == 0``.
    """

    lower: float
    upper: float
    confidence: float
    accuracy: float
    count: int


def reliability_bins_from_confidences(
    confidences: Any, correct: Any, n_bins: int = 15
) -> list[ReliabilityBin]:
    """Bin predictions by confidence into ``n_bins`` equal-width bins over [0, 1].

    Args:
        confidences: shape ``(N,)``, float in [0, 1]: the probability of each predicted class.
        correct: shape ``(N,)``, bool: whether each prediction was right.
        n_bins: number of bins ``M``; bin ``m`` (0-based) is ``(m/M, (m+1)/M]``, bin 0 also holds
            confidence 0 (Guo et al. 2017, section 2).

    Returns:
        ``n_bins`` :class:`ReliabilityBin`, lowest first (empty bins included, with NaN means).

    Raises:
        ValueError: empty input, mismatched shapes, confidences outside [0, 1], bad ``n_bins``.
    """
    n_bins = _check_n_bins(n_bins)
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct)
    if conf.ndim != 1 or conf.size == 0 or ok.shape != conf.shape:
        raise ValueError(
            f"confidences and correct must be non-empty with equal shape (N,), got {conf.shape}, {ok.shape}"
        )
    if ok.dtype != np.bool_:
        raise ValueError(f"correct must be boolean, got dtype {ok.dtype}")
    if not np.all(np.isfinite(conf)) or np.any(conf < 0.0) or np.any(conf > 1.0):
        raise ValueError("confidences must be finite and in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") - 1 puts c in bin m when edges[m] < c <= edges[m + 1].
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    bins = []
    for m in range(n_bins):
        member = index == m
        count = int(member.sum())
        bins.append(
            ReliabilityBin(
                lower=float(edges[m]),
                upper=float(edges[m + 1]),
                confidence=float(conf[member].mean()) if count else math.nan,
                accuracy=float(ok[member].mean()) if count else math.nan,
                count=count,
            )
        )
    return bins


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> list[ReliabilityBin]:
    """Reliability-diagram bins of a classifier's top-1 predictions.

    Args:
        probs: shape ``(N, C)``, float probabilities in [0, 1] (rows normally sum to 1).
        labels: shape ``(N,)``, int true class indices in ``[0, C)``.
        n_bins: number of equal-width confidence bins.

    Returns:
        See :func:`reliability_bins_from_confidences`; confidence is ``max_c probs[i, c]`` and
        the prediction is its argmax (ties: the lowest index).

    Raises:
        ValueError: bad shapes, probabilities outside [0, 1], labels outside ``[0, C)``.
    """
    p = _as_probs_2d(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    return reliability_bins_from_confidences(p.max(axis=1), p.argmax(axis=1) == y, n_bins)


def ece_from_bins(bins: Sequence[ReliabilityBin]) -> float:
    """``ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|`` (Guo et al. 2017, eq. 3); in [0, 1]."""
    total = sum(b.count for b in bins)
    if total == 0:
        raise ValueError("all bins are empty")
    return float(sum(b.count / total * abs(b.accuracy - b.confidence) for b in bins if b.count))


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error of top-1 predictions, equal-width bins (Guo et al. 2017).

    Args:
        probs: shape ``(N, C)``, float probabilities in [0, 1].
        labels: shape ``(N,)``, int class indices in ``[0, C)``.
        n_bins: number of bins (15 as in Guo et al.).

    Returns:
        ECE in [0, 1]; 0 means confidence equals accuracy in every bin.

    Raises:
        ValueError: see :func:`reliability_bins`.
    """
    return ece_from_bins(reliability_bins(probs, labels, n_bins))


# --------------------------------------------------------------------------- temperature scaling


def log_probabilities(probs: Any) -> np.ndarray:
    """``log(probs)`` as logits for temperature scaling; exact zeros become ``-inf``.

    Args:
        probs: any shape, float probabilities in [0, 1].

    Raises:
        ValueError: values outside [0, 1] or not finite.
    """
    p = np.asarray(probs, dtype=np.float64)
    if not np.all(np.isfinite(p)) or np.any(p < 0.0) or np.any(p > 1.0):
        raise ValueError("probabilities must be finite and in [0, 1]")
    with np.errstate(divide="ignore"):
        return np.log(p)


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; ``-inf`` entries get probability 0."""
    shifted = z - z.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis.

    Args:
        logits: shape ``(N, C)`` or ``(C,)``, float; logits or log-probabilities (see the module
            docstring). ``-inf`` marks an outcome that is not a candidate (probability 0).
        temperature: ``T > 0``; ``T > 1`` softens, ``T < 1`` sharpens, ``T = 1`` is plain softmax.

    Returns:
        float64 probabilities of the same shape, rows summing to 1.

    Raises:
        ValueError: non-positive or non-finite temperature; NaN or +inf logits; a row that is
            all ``-inf``.
    """
    t = _check_temperature(temperature)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        return _softmax_rows(_as_logits_2d(z[None, :]) / t)[0]
    return _softmax_rows(_as_logits_2d(z) / t)


def scale_probabilities(probs: Mapping[str, float], temperature: float) -> dict[str, float]:
    """Temperature-scale one stored distribution: ``p**(1/T) / sum(p**(1/T))``, keys kept in order.

    Use it to apply a fitted temperature to a stage-1 top-k or a VLM verdict before
    :func:`catreview.predict.fusion.fuse`. Zeros stay zero.

    Raises:
        ValueError: empty mapping, probabilities outside [0, 1] or all zero, bad temperature.
    """
    if not probs:
        raise ValueError("empty distribution")
    labels = list(probs)
    z = log_probabilities([probs[k] for k in labels])
    if not np.any(np.isfinite(z)):
        raise ValueError("all probabilities are zero")
    scaled = apply_temperature(z, temperature)
    return {k: float(v) for k, v in zip(labels, scaled)}


def _masked_stats(z: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Row log-normalisers ``logsumexp(beta * z)`` and expectations ``E_p[z]`` under softmax."""
    finite = np.isfinite(z)
    zb = beta * z
    row_max = zb.max(axis=1, keepdims=True)
    e = np.exp(zb - row_max)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    expect = np.where(finite, p * np.where(finite, z, 0.0), 0.0).sum(axis=1)
    return (row_max + np.log(s))[:, 0], expect


def temperature_nll(logits: Any, labels: Any, temperature: float) -> float:
    """Mean negative log-likelihood ``-mean_i log softmax(logits_i / T)[labels_i]`` (nats).

    Args:
        logits: shape ``(N, C)``, float (``-inf`` allowed, not at a label).
        labels: shape ``(N,)``, int in ``[0, C)``.
        temperature: ``T > 0``.

    Raises:
        ValueError: bad shapes or values, or a label whose logit is ``-inf``.
    """
    z, y = _check_fit_inputs(logits, labels)
    beta = 1.0 / _check_temperature(temperature)
    lse, _ = _masked_stats(z, beta)
    return float(np.mean(lse - beta * z[np.arange(len(y)), y]))


def _check_fit_inputs(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = _as_logits_2d(logits)
    y = _as_labels(labels, z.shape[0], z.shape[1])
    if not np.all(np.isfinite(z[np.arange(len(y)), y])):
        raise ValueError("a label's logit is -inf (zero probability): drop such rows before fitting")
    return z, y


def fit_temperature(
    logits: Any,
    labels: Any,
    *,
    bounds: tuple[float, float] = (1e-2, 1e2),
    tol: float = 1e-10,
) -> float:
    """Fit the temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    The NLL is convex in ``1/T`` (a log-sum-exp of linear functions), so it has one minimum and
    its derivative with respect to ``log T``,
    ``(1/T) * mean_i (z[i, y_i] - E_softmax(z_i/T)[z_i])``, changes sign once. The optimiser
    bisects that derivative over ``log T`` within ``bounds``: deterministic, no step sizes, and
    exact to ``tol`` in ``log T``.

    Args:
        logits: shape ``(N, C)``, float: logits, or log-probabilities of stored probabilities
            (see the module docstring and :func:`log_probabilities`). ``-inf`` marks a
            non-candidate in that row (rows may have different numbers of candidates).
        labels: shape ``(N,)``, int in ``[0, C)``; the label's logit must be finite.
        bounds: ``(T_min, T_max)``, ``0 < T_min < T_max``.
        tol: stop when the ``log T`` bracket is narrower than this.

    Returns:
        The fitted temperature, a float in ``[T_min, T_max]``. ``T > 1`` means the scores were
        over-confident. If the optimum lies outside the bounds (for instance, every prediction
        is right, so the NLL keeps falling as ``T -> 0``) the nearest bound is returned with a
        ``RuntimeWarning``.

    Raises:
        ValueError: bad shapes or values; a label at ``-inf``; or no row with two different
            finite logits (the temperature is then not identifiable).
    """
    z, y = _check_fit_inputs(logits, labels)
    t_min, t_max = (float(b) for b in bounds)
    if not (0.0 < t_min < t_max and math.isfinite(t_max)):
        raise ValueError(f"bounds must satisfy 0 < T_min < T_max < inf, got {bounds!r}")
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
        warnings.warn(
            f"NLL still falls below T={t_min:g} (e.g. every prediction right); returning the bound",
            RuntimeWarning,
            stacklevel=2,
        )
        return t_min
    if grad(hi) <= 0.0:
        warnings.warn(
            f"NLL still falls above T={t_max:g} (scores carry no signal); returning the bound",
            RuntimeWarning,
            stacklevel=2,
        )
        return t_max
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if grad(mid) > 0.0:
            hi = mid
        else:
            lo = mid
    return float(math.exp(0.5 * (lo + hi)))


# --------------------------------------------------------------------------- classification metrics


def _pair(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> tuple[list, list]:
    t, p = list(y_true), list(y_pred)
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred differ in length: {len(t)} vs {len(p)}")
    if not t:
        raise ValueError("y_true is empty")
    return t, p


def per_class_accuracy(
    y_true: Sequence[Hashable],
    y_pred: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> dict[Hashable, tuple[int, int, float]]:
    """Per-class accuracy (recall): for each true class, how many of its samples were predicted right.

    Args:
        y_true, y_pred: equal-length sequences of class labels (any hashable, e.g. str).
        labels: classes to report, in order; default: the sorted distinct values of ``y_true``.

    Returns:
        ``{label: (correct, total, accuracy)}``; ``accuracy`` is NaN when ``total == 0``.

    Raises:
        ValueError: empty or unequal-length inputs.
    """
    t, p = _pair(y_true, y_pred)
    classes = sorted(set(t)) if labels is None else list(labels)
    out: dict[Hashable, tuple[int, int, float]] = {}
    for c in classes:
        total = sum(1 for a in t if a == c)
        correct = sum(1 for a, b in zip(t, p) if a == c and b == c)
        out[c] = (correct, total, correct / total if total else math.nan)
    return out


def balanced_accuracy(
    y_true: Sequence[Hashable],
    y_pred: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> float:
    """Balanced accuracy: the mean over classes of per-class recall.

    Same definition as scikit-learn's ``balanced_accuracy_score`` (``adjusted=False``) and
    Brodersen et al. 2010: classes that never occur in ``y_true`` (recall undefined) are left out.

    Args:
        y_true, y_pred: equal-length sequences of class labels.
        labels: classes to average over; default: the distinct values of ``y_true``.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: empty or unequal-length inputs, or no listed class occurs in ``y_true``.
    """
    recalls = [acc for _, total, acc in per_class_accuracy(y_true, y_pred, labels).values() if total]
    if not recalls:
        raise ValueError("none of the classes occurs in y_true")
    return float(np.mean(recalls))


def macro_f1(
    y_true: Sequence[Hashable],
    y_pred: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> float:
    """Unweighted mean over classes of ``F1 = 2 TP / (2 TP + FP + FN)``.

    Matches scikit-learn's ``f1_score(average="macro")``: default classes are the sorted union of
    ``y_true`` and ``y_pred``, and a class with ``TP + FP + FN = 0`` scores 0.

    Raises:
        ValueError: empty or unequal-length inputs, or an empty ``labels``.
    """
    t, p = _pair(y_true, y_pred)
    classes = sorted(set(t) | set(p)) if labels is None else list(labels)
    if not classes:
        raise ValueError("no classes to average over")
    scores = []
    for c in classes:
        tp = sum(1 for a, b in zip(t, p) if a == c and b == c)
        fp = sum(1 for a, b in zip(t, p) if a != c and b == c)
        fn = sum(1 for a, b in zip(t, p) if a == c and b != c)
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


# --------------------------------------------------------------------------- fusion weight


@dataclass(frozen=True)
class _OutcomeMatrices:
    """Stage distributions on a shared outcome grid: ``k_max`` candidate columns, then OTHER.

    Padding columns (rows with fewer candidates) hold 0. ``p2`` equals ``p1`` on rows without a VLM
    verdict, so any blend of the two gives the stage-1 distribution there, as :func:`fuse` does.
    """

    p1: np.ndarray  # (N, K) float64
    p2: np.ndarray  # (N, K) float64
    truth: np.ndarray  # (N,) int64: candidate column of the human label, else the OTHER column


def _outcome_matrices(
    stage1_topk: Sequence[TopK],
    vlm_probs: Sequence[Mapping[str, float] | None],
    human_labels: Sequence[str],
) -> _OutcomeMatrices:
    n = len(human_labels)
    if not (len(stage1_topk) == len(vlm_probs) == n) or n == 0:
        raise ValueError(
            "stage1_topk, vlm_probs and human_labels must be non-empty and of equal length, got "
            f"{len(stage1_topk)}, {len(vlm_probs)}, {n}"
        )
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
    return _OutcomeMatrices(p1, p2, truth)


def _weight_grid(n_steps: int) -> np.ndarray:
    if int(n_steps) != n_steps or n_steps < 2:
        raise ValueError(f"n_steps must be an integer >= 2, got {n_steps!r}")
    return np.linspace(0.0, 1.0, int(n_steps))


def _balanced_accuracy_of_correct(correct: np.ndarray, class_index: np.ndarray, n_classes: int) -> float:
    hits = np.bincount(class_index, weights=correct.astype(np.float64), minlength=n_classes)
    totals = np.bincount(class_index, minlength=n_classes)
    return float(np.mean(hits / totals))


def fusion_weight_curve(
    stage1_topk: Sequence[TopK],
    vlm_probs: Sequence[Mapping[str, float] | None],
    human_labels: Sequence[str],
    *,
    n_steps: int = 101,
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced accuracy of the fused argmax at each weight of an even grid over [0, 1].

    Args:
        stage1_topk: per photo, the stage-1 top-k (as for :func:`catreview.predict.fusion.fuse`), already
            temperature-scaled if temperatures are used.
        vlm_probs: per photo, the VLM distribution or ``None`` (routed past the VLM).
        human_labels: per photo, the reviewed label (exact string).
        n_steps: grid size, >= 2 (``101`` gives steps of 0.01).

    Returns:
        ``(weights, scores)``: two float64 arrays of shape ``(n_steps,)``. A photo counts as right
        when the fused argmax (ties: first candidate, in stage-1 order, then OTHER, as
        :func:`catreview.predict.fusion.top_label`) is its label, or is OTHER when its label is not a
        candidate. Balanced accuracy averages per-class accuracy over the human labels.

    Raises:
        ValueError: unequal lengths, empty input, invalid distributions (message names the record).
    """
    weights = _weight_grid(n_steps)
    m = _outcome_matrices(stage1_topk, vlm_probs, human_labels)
    classes = sorted(set(human_labels))
    class_index = np.array([classes.index(h) for h in human_labels], dtype=np.int64)
    scores = np.empty_like(weights)
    for j, w in enumerate(weights):
        pred = ((1.0 - w) * m.p1 + w * m.p2).argmax(axis=1)
        scores[j] = _balanced_accuracy_of_correct(pred == m.truth, class_index, len(classes))
    return weights, scores


def _pick_weight(weights: np.ndarray, scores: np.ndarray, current_weight: float) -> float:
    best = scores.max()
    tied = weights[scores >= best - _TIE_TOL]
    distance = np.abs(tied - current_weight)
    # Among the closest, the smallest weight (least reliance on the VLM) wins.
    return float(tied[distance <= distance.min() + _TIE_TOL].min())


def fit_fusion_weight(
    stage1_topk: Sequence[TopK],
    vlm_probs: Sequence[Mapping[str, float] | None],
    human_labels: Sequence[str],
    *,
    current_weight: float = 0.5,
    n_steps: int = 101,
) -> float:
    """The fusion weight (VLM share) that maximises balanced accuracy on reviewed photos.

    Grid search over ``n_steps`` evenly spaced weights in [0, 1] (see :func:`fusion_weight_curve`).
    Balanced accuracy is flat over intervals of weights, so ties are common: among the best
    weights (within 1e-12) the one closest to ``current_weight`` wins, so a refit moves the
    setting only when that improves the score; equidistant ties go to the smaller weight.

    Returns:
        A weight in [0, 1] from the grid.

    Raises:
        ValueError: ``current_weight`` outside [0, 1], plus those of :func:`fusion_weight_curve`.
    """
    if not (0.0 <= float(current_weight) <= 1.0):
        raise ValueError(f"current_weight must be in [0, 1], got {current_weight!r}")
    weights, scores = fusion_weight_curve(stage1_topk, vlm_probs, human_labels, n_steps=n_steps)
    return _pick_weight(weights, scores, float(current_weight))


# --------------------------------------------------------------------------- the full report


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
_STAGE_TITLES = {"stage1": "stage 1", "vlm": "VLM", "fused": "fused"}


@dataclass(frozen=True)
class CalibrationReport:
    """Result of :func:`calibrate`.

    Attributes:
        n_reviews: reviewed photos used; ``n_with_vlm`` of them have a VLM verdict.
        stage1_temperature, vlm_temperature: fitted ``T`` (``vlm_temperature`` is ``None`` when no
            usable VLM verdict exists; the VLM is then left unscaled).
        current_weight, weight: the fusion weight before and after fitting.
        fused_temperature: ``T`` of the pooled distribution (:func:`fit_fused_temperature`).
        stage1, vlm, fused: :class:`StageMetrics` (``vlm`` is ``None`` without VLM verdicts).
        per_breed: ``{breed: {stage: (correct, total, accuracy)}}`` for stages "stage1", "vlm"
            (photos the VLM saw) and "fused" (after calibration); accuracy NaN when total is 0.
        reliability: ``{"<stage>_before" | "<stage>_after": [ReliabilityBin, ...]}``.
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
    per_breed: dict[str, dict[str, tuple[int, int, float]]]
    reliability: dict[str, list[ReliabilityBin]] = field(repr=False)
    excluded_from_fit: dict[str, int]
    n_folds: int = 0
    cv_note: str | None = None
    data_note: str | None = None

    def summary_rows(self) -> list[dict[str, Any]]:
        """One dict per stage (keys: stage, n, ece_before, ece_after, accuracy_before, ...)."""
        rows = []
        for key in STAGES:
            m: StageMetrics | None = getattr(self, key)
            if m is None:
                continue
            rows.append({"stage": _STAGE_TITLES[key], **asdict(m)})
        return rows

    def per_breed_rows(self) -> list[dict[str, Any]]:
        """One dict per breed, for a dataframe: breed, reviews, and per stage correct/reviews/accuracy.

        Keys: ``breed, reviews, stage1_correct, stage1_accuracy, vlm_reviews, vlm_correct,
        vlm_accuracy, fused_correct, fused_accuracy``; accuracies are floats in [0, 1] or ``None``
        where the stage saw no photo of that breed. Sorted by reviews (descending), then breed.
        """
        rows = []
        for breed, stages in self.per_breed.items():
            s1, v, f = stages["stage1"], stages["vlm"], stages["fused"]
            rows.append(
                {
                    "breed": breed,
                    "reviews": s1[1],
                    "stage1_correct": s1[0],
                    "stage1_accuracy": s1[2],
                    "vlm_reviews": v[1],
                    "vlm_correct": v[0],
                    "vlm_accuracy": v[2] if v[1] else None,
                    "fused_correct": f[0],
                    "fused_accuracy": f[2],
                }
            )
        return sorted(rows, key=lambda r: (-r["reviews"], r["breed"]))

    def to_table(self) -> str:
        """Plain-text report for a terminal."""
        t_vlm = "n/a" if self.vlm_temperature is None else f"{self.vlm_temperature:.3f}"
        lines = [
            f"Calibration on {self.n_reviews} reviewed photos ({self.n_with_vlm} with a VLM verdict), "
            f"ECE with {self.n_bins} bins. 'after' is in-sample (fitted and measured on the same photos); "
            + (f"'CV' is {self.n_folds}-fold cross-validated (stratified by breed): each photo is measured "
               "with the calibration fitted on the other folds."
               if self.n_folds else f"no cross-validation: {self.cv_note}"),
            f"Temperature: stage 1 T={self.stage1_temperature:.3f}, VLM T={t_vlm}, "
            f"fused (after the pool) T={self.fused_temperature:.3f}. "
            f"Fusion weight (VLM share): {self.current_weight:.2f} -> {self.weight:.2f}.",
            f"Stage 1 missed the human breed in its top-k on {self.excluded_from_fit['stage1']} of "
            f"{self.n_reviews} photos, so its temperature is fitted on the other "
            f"{self.n_reviews - self.excluded_from_fit['stage1']} (few photos make it unreliable). The VLM and the fusion answer over the candidates plus 'other', "
            "so on those photos 'other' counts as correct; a model that says 'other' often scores "
            "well when stage 1 is weak."
            + (" No label was a candidate, so stage 1's temperature stays 1." if self.excluded_from_fit["stage1"] >= self.n_reviews else "")
            + (f" {self.data_note}" if self.data_note else ""),
            "",
        ]
        head = ["stage", "n", "ECE before", "ECE after", "ECE CV", "acc before", "acc after", "acc CV",
                "bal.acc before", "bal.acc after", "bal.acc CV"]
        body = [
            [
                r["stage"],
                str(r["n"]),
                f"{r['ece_before']:.3f}",
                f"{r['ece_after']:.3f}",
                "-" if r["ece_after_cv"] is None else f"{r['ece_after_cv']:.3f}",
                _pct(r["accuracy_before"]),
                _pct(r["accuracy_after"]),
                _pct(r["accuracy_after_cv"]),
                _pct(r["balanced_accuracy_before"]),
                _pct(r["balanced_accuracy_after"]),
                _pct(r["balanced_accuracy_after_cv"]),
            ]
            for r in self.summary_rows()
        ]
        lines += _format_table(head, body)
        lines += ["", "Per-breed accuracy (fused: after calibration)"]
        head = ["breed", "reviews", "stage 1", "VLM", "fused"]
        body = [
            [
                r["breed"],
                str(r["reviews"]),
                f"{r['stage1_correct']}/{r['reviews']} {_pct(r['stage1_accuracy'])}",
                "-" if not r["vlm_reviews"] else
                f"{r['vlm_correct']}/{r['vlm_reviews']} {_pct(r['vlm_accuracy'])}",
                f"{r['fused_correct']}/{r['reviews']} {_pct(r['fused_accuracy'])}",
            ]
            for r in self.per_breed_rows()
        ]
        lines += _format_table(head, body)
        return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _format_table(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(cells).rstrip()

    return [fmt(head), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]


def _as_record(i: int, record: ReviewRecord | Mapping[str, Any]) -> ReviewRecord:
    if isinstance(record, ReviewRecord):
        return record
    if isinstance(record, Mapping):
        missing = {"human_label", "stage1_topk"} - set(record)
        if missing:
            raise ValueError(f"record {i}: missing keys {sorted(missing)}")
        return ReviewRecord(record["human_label"], record["stage1_topk"], record.get("vlm_probs"))
    raise TypeError(f"record {i}: expected ReviewRecord or mapping, got {type(record).__name__}")


def _stage_outcome(
    dists: list[dict[str, float]], human: list[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
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


def fit_fused_temperature(fused: Sequence[Mapping[str, float]], human_labels: Sequence[str]) -> float:
    """Temperature of the pooled (fused) distribution, fitted by NLL like :func:`fit_temperature`.

    A linear pool of calibrated forecasts is under-confident (Hora 2004; Ranjan & Gneiting 2010,
    "Combining probability forecasts", JRSS-B 72(1)), so the pool gets its own temperature on
    its log-probabilities (the simplest recalibration of a pool; it keeps the fused argmax). The
    correct outcome is the human label when it is a key of the distribution, else ``OTHER``;
    photos whose correct outcome has probability 0 (e.g. ``OTHER`` where the VLM was skipped) are
    left out of the fit.

    Args:
        fused: per photo ``{label: probability}`` over its candidates and ``OTHER``.
        human_labels: the reviewed label per photo.

    Returns:
        ``T`` in [0.01, 100]; 1.0 when no usable photo has two outcomes of non-zero probability.

    Raises:
        ValueError: lengths differ; or the temperature is not identifiable (message prefixed
            "fused temperature").
    """
    if len(fused) != len(human_labels):
        raise ValueError(f"fused and human_labels differ in length: {len(fused)} vs {len(human_labels)}")
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
        return 1.0  # no usable photo with two possible outcomes: nothing to scale
    try:
        return fit_temperature(z[usable], y[usable])
    except ValueError as exc:
        raise ValueError(f"fused temperature: {exc}") from exc


def _fit(recs: Sequence[ReviewRecord], current_weight: float, n_weight_steps: int) -> _Fit:
    """Steps 1-3 of :func:`calibrate` on ``recs``. Raises ValueError as :func:`calibrate`."""
    human = [r.human_label for r in recs]
    matrices = _outcome_matrices([r.stage1_topk for r in recs], [r.vlm_probs for r in recs], human)
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
            raise ValueError(f"VLM temperature: {exc}") from exc

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


def stratified_folds(labels: Sequence[Hashable], n_folds: int) -> np.ndarray:
    """Deterministic stratified k-fold assignment.

    The items of each label, in input order, are dealt to folds round-robin, the deal continuing
    from one label to the next (labels in sorted order), so every label is spread over the folds
    as evenly as its count allows and fold sizes differ by at most one. The same split as
    scikit-learn's ``StratifiedKFold(shuffle=False)`` in spirit, without the dependency.

    Args:
        labels: one hashable, sortable label per item.
        n_folds: number of folds, ``2 <= n_folds <= len(labels)``.

    Returns:
        ``(len(labels),)`` int64, the fold of each item, in ``[0, n_folds)``.

    Raises:
        ValueError: ``n_folds`` out of range.
    """
    n = len(labels)
    if int(n_folds) != n_folds or not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be an integer in [2, {n}], got {n_folds!r}")
    by_label: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    folds = np.empty(n, dtype=np.int64)
    deal = 0
    for label in sorted(by_label, key=str):
        for i in by_label[label]:
            folds[i] = deal % n_folds
            deal += 1
    return folds


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

    Steps: (1) stage-1 ``T`` by :func:`fit_temperature` on log top-k probabilities over each
    photo's candidates; (2) VLM ``T`` the same way over candidates + OTHER, on photos with a VLM
    verdict; (3) the weight by :func:`fit_fusion_weight` on the temperature-scaled distributions,
    then the pool's own temperature by :func:`fit_fused_temperature`; (4) ECE, accuracy and
    balanced accuracy of each stage before and after, and per-breed accuracy.

    Scoring of a human label that is not among the stage-1 candidates: a miss for stage 1 (and
    left out of its temperature fit, which has no such outcome); for the VLM and the fusion the
    right answer is OTHER. Balanced accuracy averages over the human labels (breeds) present.
    Photos without a VLM verdict count for stage 1 and the fusion (which equals stage 1 there).
    Stage-1 confidences are over its candidates (renormalised top-k), before and after scaling.
    The fit (steps 1-3) uses all photos, and the "after" numbers are measured on those same photos,
    so they are optimistic. The ``*_cv`` numbers are honest estimates: ``n_folds``-fold
    cross-validation, stratified by human label (:func:`stratified_folds`), repeats steps 1-3
    without each fold and scores that fold's photos with the result (Hastie, Tibshirani &
    Friedman, *The Elements of Statistical Learning*, 2nd ed., section 7.10). If a fold cannot be
    fitted, or there are fewer than ``2 * n_folds`` photos, the CV values are ``None`` and
    ``cv_note`` says why; the in-sample fit is still returned.

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
        ValueError: fewer than ``min_reviews`` records; invalid records (message names the
            record). With no human label among the stage-1 candidates, stage 1's ``T`` stays 1.
        TypeError: a record that is neither a ReviewRecord nor a mapping.
    """
    if len(records) < min_reviews:
        raise ValueError(
            f"calibration needs at least {min_reviews} reviewed photos, got {len(records)}; "
            "review more photos or lower fusion.calibration_min_reviews"
        )
    n_bins = _check_n_bins(n_bins)
    recs = [_as_record(i, r) for i, r in enumerate(records)]
    human = [r.human_label for r in recs]
    n = len(recs)
    fit = _fit(recs, current_weight, n_weight_steps)  # validates the records, naming the bad one
    stage1 = [normalise_topk(r.stage1_topk) for r in recs]
    has_vlm = np.array([r.vlm_probs is not None for r in recs], dtype=bool)
    t1, t2, weight = fit.t1, fit.t2, fit.weight
    scaled1 = [fit.stage1(r.stage1_topk) for r in recs]
    scaled_vlm = [fit.vlm(r.vlm_probs) for r in recs]

    # Cross-validation: every photo scored with the parameters fitted on the other folds.
    cv_note = None
    cv1: list[dict[str, float]] = []
    cv_vlm: list[dict[str, float] | None] = []
    cv_fused: list[dict[str, float]] = []
    if n_folds and n < 2 * n_folds:
        cv_note = f"{n} photos are too few for {n_folds} folds (need {2 * n_folds})"
    elif n_folds:
        folds = stratified_folds(human, n_folds)
        fold_fits = []
        for f in range(n_folds):
            try:
                fold_fits.append(_fit([r for r, g in zip(recs, folds) if g != f], current_weight, n_weight_steps))
            except ValueError as exc:
                cv_note = f"fold {f + 1} of {n_folds} could not be fitted ({exc})"
                break
        if cv_note is None:
            for r, g in zip(recs, folds):
                cv1.append(fold_fits[g].stage1(r.stage1_topk))
                cv_vlm.append(fold_fits[g].vlm(r.vlm_probs))
                cv_fused.append(fold_fits[g].fused(r.stage1_topk, r.vlm_probs))
    else:
        cv_note = "n_folds=0"

    # (4) metrics.
    reliability: dict[str, list[ReliabilityBin]] = {}
    per_breed: dict[str, dict[str, tuple[int, int, float]]] = {}
    breeds = sorted(set(human))

    def measure(
        key: str,
        before: list[dict[str, float]],
        after: list[dict[str, float]],
        cv: list[dict[str, float]],
        who: list[str],
    ) -> StageMetrics:
        out = []
        for tag, dists in (("before", before), ("after", after), ("cv", cv)):
            if not dists:
                out.append((None, None, None, None))
                continue
            conf, ok, eff = _stage_outcome(dists, who)
            bins = reliability_bins_from_confidences(conf, ok, n_bins)
            reliability[f"{key}_{tag}"] = bins
            out.append((ece_from_bins(bins), float(ok.mean()), balanced_accuracy(who, eff), eff))
        (e0, a0, b0, _), (e1, a1, b1, eff_after), (ec, ac, bc, _) = out
        counts = per_class_accuracy(who, eff_after, labels=breeds)
        for b in breeds:
            per_breed.setdefault(b, {})[key] = counts[b]
        return StageMetrics(len(who), e0, e1, a0, a1, b0, b1, ec, ac, bc)

    m1 = measure("stage1", stage1, scaled1, cv1, human)
    vlm_idx = np.flatnonzero(has_vlm)
    mv = None
    if len(vlm_idx):
        cands = [list(stage1[i]) for i in vlm_idx]
        raw_v = [normalise_vlm(recs[i].vlm_probs, c) for i, c in zip(vlm_idx, cands)]
        cal_v = [normalise_vlm(scaled_vlm[i], c) for i, c in zip(vlm_idx, cands)]
        cv_v = [normalise_vlm(cv_vlm[i], c) for i, c in zip(vlm_idx, cands)] if cv_vlm else []
        mv = measure("vlm", raw_v, cal_v, cv_v, [human[i] for i in vlm_idx])
    else:
        for b in breeds:
            per_breed.setdefault(b, {})["vlm"] = (0, 0, math.nan)
    fused_before = [fuse(r.stage1_topk, r.vlm_probs, current_weight) for r in recs]
    fused_after = [fit.fused(r.stage1_topk, r.vlm_probs) for r in recs]
    mf = measure("fused", fused_before, fused_after, cv_fused, human)

    return CalibrationReport(
        n_reviews=n,
        n_with_vlm=int(has_vlm.sum()),
        n_bins=n_bins,
        stage1_temperature=t1,
        vlm_temperature=t2,
        current_weight=float(current_weight),
        weight=weight,
        fused_temperature=fit.t_fused,
        stage1=m1,
        vlm=mv,
        fused=mf,
        per_breed=per_breed,
        reliability=reliability,
        excluded_from_fit={"stage1": fit.excluded1, "vlm": fit.excluded2},
        n_folds=n_folds if cv_note is None else 0,
        cv_note=cv_note,
    )
