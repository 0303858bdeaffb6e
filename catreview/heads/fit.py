"""The linear breed head: class-balanced multinomial logistic regression on standardised features.

:func:`fit_head` standardises the (N, F) features (scikit-learn ``StandardScaler``) and fits
``LogisticRegression(class_weight="balanced")`` (scikit-learn, lbfgs, multinomial loss with L2
penalty; "balanced" weights each sample by ``n_samples / (n_classes * count(class))``:
https://scikit-learn.org/stable/modules/generated/sklearn.linear_model.LogisticRegression.html).
The standardisation is then folded into the weights (``W' = W / sigma``, ``b' = b - W' mu``), so
the head is one ``Linear(F, C)``: exactly what a timm model's classifier computes on its
pre-logit features (:meth:`LinearHead.logits`).

:func:`out_of_fold` cross-fits the same head (``StratifiedKFold``): each photo's probabilities come
from a model fitted on the other folds only, the input label-error detection (cleanlab's
``find_label_issues``) needs.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from catreview.errors import CatreviewError
from catreview.metrics import balanced_accuracy, macro_f1, per_class_accuracy

#: Inverse L2 strength of the logistic regression on standardised features (scikit-learn's ``C``).
#: Measured on the 330 shared photos (Lite2 features, 5-fold out-of-fold balanced accuracy):
#: C=0.01 0.768, 0.05 0.758, 0.2 0.743, 1.0 (scikit-learn's default) 0.747: a few hundred photos
#: in 1280 dimensions want a strong penalty (differences of ~0.02 are within noise).
DEFAULT_C = 0.01
#: lbfgs iterations (scikit-learn's default 100 stops early on 1280 standardised features).
MAX_ITER = 2000
DEFAULT_FOLDS = 5


class HeadFitError(CatreviewError, ValueError):
    """The reviews cannot make a head (fewer than two breeds, too few photos)."""


@dataclass
class LinearHead:
    """A fitted head: ``logits = features @ weight.T + bias``.

    Attributes:
        labels: C class names, in logit order (sorted, as scikit-learn orders ``classes_``).
        weight: (C, F) float32, the standardisation folded in.
        bias: (C,) float32.
    """

    labels: list[str]
    weight: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N, C) float32 logits (float64 arithmetic)."""
        return (np.asarray(features, dtype=np.float64) @ self.weight.T.astype(np.float64) + self.bias).astype(
            np.float32
        )

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(N, C) float32 softmax probabilities."""
        z = self.logits(features).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, features: np.ndarray) -> list[str]:
        """Top-1 label per row."""
        if len(features) == 0:
            return []
        return [self.labels[i] for i in self.logits(features).argmax(axis=1)]


def fit_head(features: np.ndarray, labels: Sequence[str], *, c: float = DEFAULT_C, seed: int = 0) -> LinearHead:
    """Fit the class-balanced head on ``features`` (N, F) with ``labels`` (N breed names).

    Raises:
        HeadFitError: fewer than two distinct labels, or ``features`` and ``labels`` disagree in length.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(list(labels))
    if x.ndim != 2 or len(x) != len(y):
        raise HeadFitError(f"features {x.shape} and {len(y)} labels do not match")
    classes = sorted(set(y.tolist()))
    if len(classes) < 2:
        raise HeadFitError(f"a head needs reviewed photos of at least 2 breeds (got {len(classes)})")
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(class_weight="balanced", C=c, max_iter=MAX_ITER, random_state=seed)
    # One BLAS thread: these small problems (hundreds of rows) ran 30x slower with a thread pool
    # per core on a busy 2-core machine (16 s vs 0.5 s for 330 photos), and never gain from one.
    with threadpool_limits(limits=1):
        clf.fit(scaler.transform(x), y)
    coef = clf.coef_.astype(np.float64)
    intercept = clf.intercept_.astype(np.float64)
    if len(classes) == 2:  # one logit w.x + b for classes_[1]: softmax over [0, w.x + b] is the same model
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    return LinearHead([str(c_) for c_ in clf.classes_], weight.astype(np.float32), bias.astype(np.float32))


def n_folds(labels: Sequence[str], wanted: int = DEFAULT_FOLDS) -> int:
    """Folds for :func:`out_of_fold`: ``wanted``, at most the largest class's photo count (so
    ``StratifiedKFold`` can stratify), at least 2.

    Raises:
        HeadFitError: fewer than 2 photos in every class (nothing to cross-fit).
    """
    counts = Counter(labels)
    biggest = max(counts.values()) if counts else 0
    if biggest < 2:
        raise HeadFitError("out-of-fold probabilities need at least 2 reviewed photos of some breed")
    return max(2, min(wanted, biggest))


@dataclass
class OutOfFold:
    """Cross-fitted probabilities: row ``i`` comes from a head fitted without fold ``folds[i]``.

    Attributes:
        probabilities: (N, C) float32 over ``labels`` (a class absent from a fold's training
            photos gets probability 0 from that fold's head).
        labels: C class names (sorted).
        folds: (N,) int64 fold index of each photo.
    """

    probabilities: np.ndarray
    labels: list[str]
    folds: np.ndarray


def out_of_fold(
    features: np.ndarray, labels: Sequence[str], *, n_splits: int = DEFAULT_FOLDS, c: float = DEFAULT_C, seed: int = 0
) -> OutOfFold:
    """Out-of-fold probabilities of :func:`fit_head` for every photo (``StratifiedKFold``,
    shuffled with ``seed``; :func:`n_folds` folds).

    Classes with fewer photos than folds are stratified as well as they can be (scikit-learn's
    warning about them is expected here and not shown).

    Raises:
        HeadFitError: too few photos, or a fold whose training photos hold a single breed.
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(list(labels))
    names = sorted(set(y.tolist()))
    k = n_folds(y.tolist(), n_splits)
    if len(y) < k:
        raise HeadFitError(f"{len(y)} photos cannot make {k} folds")
    probs = np.zeros((len(y), len(names)), dtype=np.float32)
    folds = np.full(len(y), -1, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(splitter.split(np.zeros(len(y)), y))
    col = {n: i for i, n in enumerate(names)}
    for f, (train, held) in enumerate(splits):
        head = fit_head(features[train], y[train].tolist(), c=c, seed=seed)
        p = head.probabilities(features[held])
        for j, name in enumerate(head.labels):
            probs[held, col[name]] = p[:, j]
        folds[held] = f
    return OutOfFold(probs, names, folds)


def eval_metrics(photos: Sequence[str], truth: Sequence[str], predicted: Sequence[str]) -> dict[str, object]:
    """Test metrics in the gate's format (:class:`catreview.adapters.results.EvalMetrics` as a
    dict): ``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``per_breed`` (``{breed:
    {"correct", "n", "accuracy"}}``), and the per-photo ``photos`` (sha256), ``truth``,
    ``predicted`` (``""``: no prediction). Empty inputs give ``{"n": 0}``."""
    if not truth:
        return {"n": 0}
    acc = per_class_accuracy(truth, predicted)
    return {
        "n": len(truth),
        "accuracy": sum(t == p for t, p in zip(truth, predicted)) / len(truth),
        "balanced_accuracy": balanced_accuracy(truth, predicted),
        "macro_f1": macro_f1(truth, predicted),
        "per_breed": {b: {"correct": a.correct, "n": a.total, "accuracy": a.accuracy} for b, a in acc.items()},
        "photos": list(photos),
        "truth": list(truth),
        "predicted": list(predicted),
    }


__all__ = [
    "DEFAULT_C",
    "DEFAULT_FOLDS",
    "HeadFitError",
    "LinearHead",
    "OutOfFold",
    "eval_metrics",
    "fit_head",
    "n_folds",
    "out_of_fold",
]
