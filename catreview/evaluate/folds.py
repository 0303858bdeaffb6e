"""Deterministic stratified k-fold assignment for the cross-validated calibration metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["stratified_folds"]


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
    n = len(labels)
    if int(n_folds) != n_folds or not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be an integer in [2, {n}], got {n_folds!r}")
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    folds = np.empty(n, dtype=np.int64)
    deal = 0
    for label in sorted(by_label, key=str):
        for i in by_label[label]:
            folds[i] = deal % n_folds
            deal += 1
    return folds
