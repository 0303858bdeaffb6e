"""Fitting temperatures by negative log-likelihood: per stage and for the fused pool.

**Temperature scaling** (Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural
Networks", ICML, section 4.2): one scalar ``T > 0`` per stage, ``probs = softmax(logits / T)``,
fitted by minimising the negative log-likelihood (NLL). It never changes a stage's argmax.
Applying a fitted ``T``, and why stored log-probabilities are valid logits, is
:mod:`catreview.predict.temperature`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from catreview.evaluate.errors import CalibrationError
from catreview.metrics import check_labels
from catreview.predict.fusion import OTHER
from catreview.predict.temperature import check_logits, check_temperature, log_probabilities

__all__ = ["fit_fused_temperature", "fit_temperature", "temperature_nll"]


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


def _check_fit_inputs(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = check_logits(logits)
    y = check_labels(labels, z.shape[0], z.shape[1])
    if not np.all(np.isfinite(z[np.arange(len(y)), y])):
        raise ValueError("a label's logit is -inf (zero probability): drop such rows before fitting")
    return z, y


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
    beta = 1.0 / check_temperature(temperature)
    lse, _ = _masked_stats(z, beta)
    return float(np.mean(lse - beta * z[np.arange(len(y)), y]))


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
            (see :mod:`catreview.predict.temperature` and
            :func:`~catreview.predict.temperature.log_probabilities`). ``-inf`` marks a
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
        ValueError: lengths differ.
        CalibrationError: (a ``ValueError``) the temperature is not identifiable (message
            prefixed "fused temperature").
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
        raise CalibrationError(f"fused temperature: {exc}") from exc
