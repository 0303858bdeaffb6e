"""Deterministic stratified k-fold assignment for the cross-validated calibration metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["deal_folds", "stratified_folds"]


def _check_n_folds(n_folds: int, n: int) -> int:
    if int(n_folds) != n_folds or not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be an integer in [2, {n}], got {n_folds!r}")
    return int(n_folds)


def deal_folds(label_rank: np.ndarray, n_folds: int) -> np.ndarray:
    """:func:`stratified_folds` of items given as label ranks (array form, no per-item Python work).

    Args:
        label_rank: ``(N,)`` int, each item's label as its position among the labels in sorted
            order (equal labels, equal rank).
        n_folds: number of folds, ``2 <= n_folds <= N``.

    Returns:
        ``(N,)`` int64, the fold of each item, in ``[0, n_folds)``: the items sorted by rank, ties
        in input order, are dealt to the folds round-robin.

    Raises:
        ValueError: ``n_folds`` out of range, or ``label_rank`` not one-dimensional.
    """
    rank = np.asarray(label_rank)
    if rank.ndim != 1:
        raise ValueError(f"label_rank must have shape (N,), got {rank.shape}")
    k = _check_n_folds(n_folds, rank.shape[0])
    folds = np.empty(rank.shape[0], dtype=np.int64)
    folds[np.argsort(rank, kind="stable")] = np.arange(rank.shape[0], dtype=np.int64) % k
    return folds


def stratified_folds(labels: Sequence[str], n_folds: int) -> np.ndarray:
    """Deterministic stratified k-fold assignment.

    The items of each label, in input order, are dealt to folds round-robin, the deal continuing
    from one label to the next (labels in sorted order), so every label is spread over the folds
    as evenly as its count allows and fold sizes differ by at most one. scikit-learn's
    ``StratifiedKFold(shuffle=False)`` gives every fold the same number of items of each label,
    but deals each label's items in contiguous blocks (other items per fold), raises when
    ``n_folds`` exceeds every label's count and warns when it exceeds any one's (common with
    rare breeds), so it is not used here.

    Args:
        labels: one label per item (sorted by ``str``).
        n_folds: number of folds, ``2 <= n_folds <= len(labels)``.

    Returns:
        ``(len(labels),)`` int64, the fold of each item, in ``[0, n_folds)``.

    Raises:
        ValueError: ``n_folds`` out of range.
    """
    items = list(labels)
    _check_n_folds(n_folds, len(items))
    rank = {label: r for r, label in enumerate(sorted(dict.fromkeys(items), key=str))}
    return deal_folds(np.fromiter((rank[x] for x in items), dtype=np.int64, count=len(items)), n_folds)
