"""The fusion weight: the VLM's share in the linear pool of :mod:`catreview.predict.fusion`.

Chosen by grid search to maximise the balanced accuracy (:func:`catreview.metrics.balanced_accuracy`)
of the fused argmax on reviewed photos. A photo counts as right when the fused argmax is its human
label, or is :data:`~catreview.predict.fusion.OTHER` when its label is not a stage-1 candidate.

The search runs on arrays (:func:`fusion_weight_curve_arrays`, :func:`pick_fusion_weight`, what
:func:`catreview.evaluate.calibration.calibrate` calls); :func:`fit_fusion_weight` and
:func:`fusion_weight_curve` take per-photo distributions and put them on those arrays first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from catreview.predict.fusion import OTHER, TopK, normalise_topk, normalise_vlm

__all__ = [
    "OutcomeMatrices",
    "fit_fusion_weight",
    "fusion_weight_curve",
    "fusion_weight_curve_arrays",
    "outcome_matrices",
    "pick_fusion_weight",
]

_TIE_TOL = 1e-12
_STABLE_MARGIN = 1e-9
"""A photo whose two stages agree on the argmax, each ahead of its runner-up by more than this, has
that argmax at every weight (rounding errors of the blend are ~1e-16), so it is scored once."""


@dataclass(frozen=True)
class OutcomeMatrices:
    """Stage distributions on a shared outcome grid: ``k_max`` candidate columns, then OTHER.

    Padding columns (rows with fewer candidates) hold 0. ``p2`` equals ``p1`` on rows without a VLM
    verdict, so any blend of the two gives the stage-1 distribution there, as
    :func:`~catreview.predict.fusion.fuse` does.
    """

    p1: np.ndarray  # (N, K) float64
    p2: np.ndarray  # (N, K) float64
    truth: np.ndarray  # (N,) int64: candidate column of the human label, else the OTHER column


def outcome_matrices(
    stage1_topk: Sequence[TopK],
    vlm_probs: Sequence[Mapping[str, float] | None],
    human_labels: Sequence[str],
) -> OutcomeMatrices:
    """Both stages' distributions of every photo on one grid (see :class:`OutcomeMatrices`).

    Stage 1 is renormalised over its candidates (:func:`~catreview.predict.fusion.normalise_topk`),
    the VLM over the candidates + OTHER (:func:`~catreview.predict.fusion.normalise_vlm`).

    Raises:
        ValueError: unequal lengths, empty input, invalid distributions (message names the record).
    """
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
    return OutcomeMatrices(p1, p2, truth)


def _weight_grid(n_steps: int) -> np.ndarray:
    if int(n_steps) != n_steps or n_steps < 2:
        raise ValueError(f"n_steps must be an integer >= 2, got {n_steps!r}")
    return np.linspace(0.0, 1.0, int(n_steps))


def _top_margin(p: np.ndarray) -> np.ndarray:
    """Per row, the largest value minus the second largest (inf with one column)."""
    if p.shape[1] < 2:
        return np.full(p.shape[0], np.inf)
    part = np.partition(p, -2, axis=1)
    return part[:, -1] - part[:, -2]


def fusion_weight_curve_arrays(
    p1: np.ndarray,
    p2: np.ndarray,
    truth: np.ndarray,
    class_index: np.ndarray,
    *,
    n_steps: int = 101,
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced accuracy of the argmax of ``(1 - w) * p1 + w * p2`` at each weight of an even grid.

    The array form of :func:`fusion_weight_curve` (same scores on the same matrices).

    Args:
        p1, p2: ``(N, C)`` float64, the two stages on a shared outcome grid per photo (see
            :class:`OutcomeMatrices`; ``p2`` equal to ``p1`` where the VLM was skipped).
        truth: ``(N,)`` int, the column that counts as right (the human label's, else OTHER's).
        class_index: ``(N,)`` int >= 0, each photo's human label as a class number; balanced
            accuracy averages per-class accuracy over the classes present, in class order.
        n_steps: grid size, >= 2.

    Returns:
        ``(weights, scores)``, float64 arrays of shape ``(n_steps,)``. Argmax ties go to the
        lowest column.

    Raises:
        ValueError: ``n_steps`` < 2 or not an integer, shapes that do not match, empty input.
    """
    weights = _weight_grid(n_steps)
    p1, p2 = np.asarray(p1, dtype=np.float64), np.asarray(p2, dtype=np.float64)
    truth, classes = np.asarray(truth), np.asarray(class_index)
    n = p1.shape[0] if p1.ndim == 2 else -1
    if n < 1 or p2.shape != p1.shape or truth.shape != (n,) or classes.shape != (n,):
        raise ValueError(
            f"p1, p2 must be (N, C) with N >= 1 and truth, class_index (N,), got {p1.shape}, {p2.shape}, "
            f"{truth.shape}, {classes.shape}"
        )
    totals = np.bincount(classes)
    present = totals > 0
    # Photos whose argmax cannot move with the weight are scored once; the rest at every weight.
    top = p1.argmax(axis=1)
    stable = (top == p2.argmax(axis=1)) & (_top_margin(p1) > _STABLE_MARGIN) & (_top_margin(p2) > _STABLE_MARGIN)
    fixed_hits = np.bincount(classes[stable & (top == truth)], minlength=totals.size)
    rows = np.flatnonzero(~stable)
    # Outcomes as rows (C, M): each column operation runs over M contiguous values.
    q1, q2 = np.ascontiguousarray(p1[rows].T), np.ascontiguousarray(p2[rows].T)
    t_rows, c_rows = truth[rows], classes[rows]
    best, value, tmp = (np.empty(rows.size) for _ in range(3))
    pred = np.empty(rows.size, dtype=np.int64)
    ahead = np.empty(rows.size, dtype=bool)
    scores = np.empty_like(weights)
    for i, w in enumerate(weights):
        # argmax of (1 - w) * p1 + w * p2 per photo, ties to the first column, as ndarray.argmax
        pred.fill(0)
        for c in range(q1.shape[0]):
            np.multiply(1.0 - w, q1[c], out=value)
            np.multiply(w, q2[c], out=tmp)
            value += tmp
            if c == 0:
                best[:] = value
                continue
            np.greater(value, best, out=ahead)
            pred[ahead] = c
            np.maximum(best, value, out=best)
        hits = fixed_hits + np.bincount(c_rows[pred == t_rows], minlength=totals.size)
        scores[i] = float(np.mean(hits[present] / totals[present]))
    return weights, scores


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
    _weight_grid(n_steps)
    m = outcome_matrices(stage1_topk, vlm_probs, human_labels)
    rank = {c: i for i, c in enumerate(sorted(set(human_labels)))}
    class_index = np.array([rank[h] for h in human_labels], dtype=np.int64)
    return fusion_weight_curve_arrays(m.p1, m.p2, m.truth, class_index, n_steps=n_steps)


def pick_fusion_weight(weights: np.ndarray, scores: np.ndarray, current_weight: float) -> float:
    """The weight of the best score (within 1e-12), the one closest to ``current_weight`` among
    ties, the smaller one among equidistant ties (least reliance on the VLM).

    Args:
        weights, scores: ``(S,)`` float arrays, e.g. from :func:`fusion_weight_curve_arrays`.
        current_weight: the weight in force, in [0, 1].

    Raises:
        ValueError: ``current_weight`` outside [0, 1].
    """
    if not (0.0 <= float(current_weight) <= 1.0):
        raise ValueError(f"current_weight must be in [0, 1], got {current_weight!r}")
    best = scores.max()
    tied = weights[scores >= best - _TIE_TOL]
    distance = np.abs(tied - float(current_weight))
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
    return pick_fusion_weight(weights, scores, float(current_weight))
