"""Applying a fitted temperature: ``probs = softmax(logits / T)`` (Guo et al. 2017, section 4.2).

The temperatures are fitted in :mod:`catreview.evaluate.temperature`; this module only applies
them (to show calibrated views, :mod:`catreview.query.photos`, and inside the fit). Temperature
scaling never changes a stage's argmax.

Stored predictions are probabilities, not logits: stage 1 keeps its top-k probabilities, and the
VLM keeps probabilities from its candidate log-likelihood scores. Log-probabilities are valid
logits here: over a fixed candidate set, ``softmax(log p) = p / sum(p)``, so
``softmax(log p / T) = p**(1/T) / sum(p**(1/T))``, and adding a constant to a row (stage 1's
top-k renormalisation, or the VLM's log-normaliser) does not change the result. Temperature
scaling of stored probabilities is therefore exactly temperature scaling of the stage's scores,
restricted to the candidates. A probability of exactly 0 becomes the logit ``-inf`` and stays 0 at
every temperature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["apply_temperature", "check_logits", "check_temperature", "log_probabilities", "scale_probabilities"]


def check_logits(logits: Any) -> np.ndarray:
    """``logits`` as a float64 array of shape ``(N, C)``, ``N, C >= 1``.

    ``-inf`` is allowed (a non-candidate), but every row needs one finite entry.

    Raises:
        ValueError: wrong shape, NaN or ``+inf``, or a row that is all ``-inf``.
    """
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, C) with N, C >= 1, got {arr.shape}")
    if np.any(np.isnan(arr)) or np.any(arr == np.inf):
        raise ValueError("logits must not contain NaN or +inf (-inf marks a non-candidate)")
    if not np.all(np.any(np.isfinite(arr), axis=1)):
        raise ValueError("every row of logits needs at least one finite entry")
    return arr


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float; raises ValueError unless it is finite and > 0."""
    t = float(temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


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
    t = check_temperature(temperature)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        return _softmax_rows(check_logits(z[None, :]) / t)[0]
    return _softmax_rows(check_logits(z) / t)


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
