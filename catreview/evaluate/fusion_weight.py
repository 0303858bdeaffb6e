"""The fusion weight: the VLM's share in the linear pool of :mod:`catreview.predict.fusion`.

Chosen by grid search to maximise the balanced accuracy (:func:`catreview.metrics.balanced_accuracy`)
of the fused argmax on reviewed photos. A photo counts as right when the fused argmax is its human
label, or is :data:`~catreview.predict.fusion.OTHER` when its label is not a stage-1 candidate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from catreview.predict.fusion import OTHER, TopK, normalise_topk, normalise_vlm

__all__ = ["OutcomeMatrices", "fit_fusion_weight", "fusion_weight_curve", "outcome_matrices"]

_TIE_TOL = 1e-12


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


def _balanced_accuracy_of_correct(correct: np.ndarray, class_index: np.ndarray, n_classes: int) -> float:
    """Mean per-class accuracy from per-photo hits: the vectorised balanced accuracy of the grid."""
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
    m = outcome_matrices(stage1_topk, vlm_probs, human_labels)
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
