"""Classification and calibration metrics, written once for calibration, training and comparison.

* **Balanced accuracy** (mean per-class recall; Brodersen, Ong, Stephan & Buhmann 2010, "The
  balanced accuracy and its posterior distribution", ICPR), per-class accuracy and macro F1. The
  users' 67 classes are heavily imbalanced, so plain accuracy mostly measures the majority class.
  Balanced accuracy and macro F1 are scikit-learn's (``recall_score`` / ``f1_score`` with
  ``average="macro"``); scikit-learn is imported on first use, as its import takes seconds.
* **Expected calibration error** (ECE) with equal-width confidence bins and **reliability bins**
  for a reliability diagram: Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural
  Networks", ICML (section 2, eq. 3); also Naeini, Cooper & Hauskrecht 2015. These are ours:
  scikit-learn's ``calibration_curve`` is binary-only, bins ``[a, b)`` rather than ``(a, b]``,
  drops empty bins and has no ECE.

Labels are class names (str) for the classification metrics and int class indices for the
calibration metrics.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ClassAccuracy",
    "ReliabilityBin",
    "balanced_accuracy",
    "check_labels",
    "check_n_bins",
    "ece_from_bins",
    "expected_calibration_error",
    "macro_f1",
    "per_class_accuracy",
    "reliability_bins",
    "reliability_bins_from_confidences",
]


# Classification metrics


def _pair(y_true: Sequence[str], y_pred: Sequence[str]) -> tuple[list[str], list[str]]:
    t, p = list(y_true), list(y_pred)
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred differ in length: {len(t)} vs {len(p)}")
    if not t:
        raise ValueError("y_true is empty")
    return t, p


class ClassAccuracy(NamedTuple):
    """Accuracy (recall) of one true class: ``correct`` of its ``total`` samples; NaN when ``total == 0``."""

    correct: int
    total: int
    accuracy: float


def per_class_accuracy(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str] | None = None,
) -> dict[str, ClassAccuracy]:
    """Per-class accuracy (recall): for each true class, how many of its samples were predicted right.

    Args:
        y_true, y_pred: equal-length sequences of class labels (str).
        labels: classes to report, in order; default: the sorted distinct values of ``y_true``.

    Returns:
        ``{label: ClassAccuracy(correct, total, accuracy)}`` (a tuple); ``accuracy`` is NaN when
        ``total == 0``.

    Raises:
        ValueError: empty or unequal-length inputs.
    """
    t, p = _pair(y_true, y_pred)
    classes = sorted(set(t)) if labels is None else list(labels)
    totals = Counter(t)
    hits = Counter(a for a, b in zip(t, p) if a == b)
    return {c: ClassAccuracy(hits[c], totals[c], hits[c] / totals[c] if totals[c] else math.nan) for c in classes}


def balanced_accuracy(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str] | None = None,
) -> float:
    """Balanced accuracy: the mean over classes of per-class recall.

    Same definition as scikit-learn's ``balanced_accuracy_score`` (``adjusted=False``) and
    Brodersen et al. 2010: classes that never occur in ``y_true`` (recall undefined) are left out.
    Computed as ``recall_score(average="macro")`` over the listed classes present in ``y_true``
    (every one has support, so no zero division), which is ``balanced_accuracy_score`` restricted
    to ``labels`` without its warning about predicted classes absent from ``y_true``.

    Args:
        y_true, y_pred: equal-length sequences of class labels (str).
        labels: classes to average over; default: the distinct values of ``y_true``.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: empty or unequal-length inputs, or no listed class occurs in ``y_true``.
    """
    from sklearn.metrics import recall_score

    t, p = _pair(y_true, y_pred)
    present = set(t)
    classes = sorted(present) if labels is None else [c for c in labels if c in present]
    if not classes:
        raise ValueError("none of the classes occurs in y_true")
    return float(recall_score(t, p, labels=classes, average="macro", zero_division=0.0))


def macro_f1(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str] | None = None,
) -> float:
    """Unweighted mean over classes of ``F1 = 2 TP / (2 TP + FP + FN)``.

    scikit-learn's ``f1_score(average="macro", zero_division=0)``: default classes are the sorted
    union of ``y_true`` and ``y_pred``, and a class with ``TP + FP + FN = 0`` scores 0.

    Args:
        y_true, y_pred: equal-length sequences of class labels (str).
        labels: classes to average over, in order; default: the sorted union of both.

    Raises:
        ValueError: empty or unequal-length inputs, or an empty ``labels``.
    """
    from sklearn.metrics import f1_score

    t, p = _pair(y_true, y_pred)
    classes = sorted(set(t) | set(p)) if labels is None else list(labels)
    if not classes:
        raise ValueError("no classes to average over")
    return float(f1_score(t, p, labels=classes, average="macro", zero_division=0.0))


# Calibration metrics: ECE and reliability bins


def check_labels(labels: Any, n: int, n_classes: int) -> np.ndarray:
    """``labels`` as int64 class indices of shape ``(n,)``, each in ``[0, n_classes)``.

    Raises:
        ValueError: wrong shape, a non-integer dtype, or an index out of range.
    """
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if np.any(arr < 0) or np.any(arr >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes}), got min {arr.min()}, max {arr.max()}")
    return arr


def _as_probs_2d(probs: Any) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"probs must have shape (N, C) with N, C >= 1, got {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0.0) or np.any(arr > 1.0):
        raise ValueError("probs must be finite and in [0, 1]")
    return arr


def check_n_bins(n_bins: int) -> int:
    """``n_bins`` as an int; raises ValueError unless it is a positive integer."""
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


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


def reliability_bins_from_confidences(confidences: Any, correct: Any, n_bins: int = 15) -> list[ReliabilityBin]:
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
    n_bins = check_n_bins(n_bins)
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
    y = check_labels(labels, p.shape[0], p.shape[1])
    return reliability_bins_from_confidences(p.max(axis=1), p.argmax(axis=1) == y, n_bins)


def ece_from_bins(bins: Sequence[ReliabilityBin]) -> float:
    """``ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|`` (Guo et al. 2017, eq. 3); in [0, 1].

    Raises:
        ValueError: every bin is empty.
    """
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
