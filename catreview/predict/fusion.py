"""Blend the stage-1 classifier's top-k probabilities with the VLM's verdict, and route photos.

The blend is a **linear opinion pool** (Stone 1961; Genest & Zidek 1986, "Combining Probability
Distributions: A Critique and an Annotated Bibliography", *Statistical Science* 1(1):114-148):

    p(y) = (1 - w) * p1(y) + w * p2(y)        for every outcome y,

with ``w`` the VLM's share (``FusionConfig.weight``). Both opinions must be distributions over the
same outcomes, so they are put on a common outcome space first:

* **Outcomes** are the stage-1 candidates (its top-k labels, in stage-1 order) plus
  :data:`OTHER` ("the answer is none of these candidates").
* **Stage 1** (``p1``): the top-k probabilities are renormalised to sum to 1 over the candidates,
  ``p1(c) = q(c) / sum_k q(k)``, and ``p1(OTHER) = 0``. Renormalising (rather than giving
  ``OTHER`` the residual ``1 - sum_k q(k)``) keeps stage 1 consistent with its temperature
  scaling in :mod:`catreview.evaluate.temperature`, which is fitted over the fixed candidate set and so
  has no residual mass; it also makes ``weight == 0`` reproduce the stage-1 ranking exactly.
* **VLM** (``p2``): its probabilities over the candidates and ``OTHER`` are used as given (divided
  by their total so they sum to 1). A missing ``OTHER`` key means the VLM was not offered that
  answer: ``p2(OTHER) = 0``.

``OTHER`` is **kept as its own outcome** rather than spread over the candidates. The VLM is the only
stage that can say "none of these"; spreading that mass in proportion to the candidates would be
conditioning the VLM on "the answer is a candidate", i.e. discarding exactly the evidence that the
stage-1 shortlist is wrong, and spreading it uniformly would invent support for candidates the VLM
rejected. Kept separate, ``p(OTHER) = w * p2(OTHER)`` is the pool's honest probability that the
shortlist misses, and a reviewer can act on it. Pass ``keep_other=False`` to get the conditioned
version instead (the VLM renormalised over the candidates, no ``OTHER`` key) when a breed must be
chosen.

The linear pool is not externally Bayesian (Genest & Zidek 1986), and a linear pool of calibrated
distributions is itself under-confident unless the stages agree (Ranjan & Gneiting 2010,
"Combining probability forecasts", JRSS B 72(1):71-91). So the per-stage temperatures and the
weight are fitted on reviewed photos (:func:`catreview.evaluate.calibration.calibrate`), which also
reports the fused ECE rather than assuming it.

Labels are compared as exact strings; map spellings (``Maine_Coon`` vs ``Maine Coon``) before
calling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

OTHER = "other"
"""The VLM's "none of these candidates" outcome."""

TopK = Mapping[str, float] | Sequence[tuple[str, float]]


def _check_probability(label: str, value: float, source: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{source} probability for {label!r} must be finite and >= 0, got {value!r}")
    return value


def _check_weight(weight: float) -> float:
    weight = float(weight)
    if not (0.0 <= weight <= 1.0):
        raise ValueError(f"weight (the VLM's share) must be in [0, 1], got {weight!r}")
    return weight


def normalise_topk(stage1_topk: TopK) -> dict[str, float]:
    """Renormalise stage-1 top-k probabilities over the candidates.

    Args:
        stage1_topk: ``{label: probability}`` or ``[(label, probability), ...]``; probabilities are
            softmax outputs in [0, 1] (they need not sum to 1: the rest of the mass sits on labels
            outside the top k). ``OTHER`` is not allowed as a stage-1 label.

    Returns:
        ``{label: probability}`` in the input order, summing to 1.

    Raises:
        ValueError: empty input, a duplicate label, a label equal to ``OTHER``, a negative or
            non-finite probability, or probabilities that are all zero.
    """
    items = list(stage1_topk.items()) if isinstance(stage1_topk, Mapping) else list(stage1_topk)
    if not items:
        raise ValueError("stage-1 top-k is empty")
    probs: dict[str, float] = {}
    for label, value in items:
        if label in probs:
            raise ValueError(f"duplicate stage-1 label {label!r}")
        if label == OTHER:
            raise ValueError(f"{OTHER!r} is reserved for the VLM's 'none of these' outcome")
        probs[label] = _check_probability(label, value, "stage-1")
    total = sum(probs.values())
    if total <= 0.0:
        raise ValueError("stage-1 top-k probabilities are all zero")
    return {label: p / total for label, p in probs.items()}


def normalise_vlm(vlm_probs: Mapping[str, float], candidates: Sequence[str]) -> dict[str, float]:
    """Put VLM probabilities on the outcome space ``candidates + [OTHER]``, summing to 1.

    Args:
        vlm_probs: ``{label: probability}`` over ``candidates`` and optionally ``OTHER``; values
            are >= 0 and are divided by their total (a missing ``OTHER`` means probability 0).
        candidates: the stage-1 candidate labels.

    Returns:
        ``{label: probability}`` with keys ``candidates`` (in order) then ``OTHER``.

    Raises:
        ValueError: a candidate is missing, a label is neither a candidate nor ``OTHER``, a
            probability is negative or non-finite, or all are zero.
    """
    extra = set(vlm_probs) - set(candidates) - {OTHER}
    if extra:
        raise ValueError(f"VLM labels {sorted(extra)} are not stage-1 candidates {list(candidates)}")
    missing = [c for c in candidates if c not in vlm_probs]
    if missing:
        raise ValueError(f"VLM probabilities lack candidates {missing}")
    probs = {c: _check_probability(c, vlm_probs[c], "VLM") for c in candidates}
    probs[OTHER] = _check_probability(OTHER, vlm_probs.get(OTHER, 0.0), "VLM")
    total = sum(probs.values())
    if total <= 0.0:
        raise ValueError("VLM probabilities are all zero")
    return {label: p / total for label, p in probs.items()}


def fuse(
    stage1_topk: TopK,
    vlm_probs: Mapping[str, float] | None,
    weight: float,
    *,
    keep_other: bool = True,
) -> dict[str, float]:
    """Linear opinion pool ``p = (1 - weight) * p1 + weight * p2`` (see the module docstring).

    Args:
        stage1_topk: stage-1 top-k, ``{label: prob}`` or ``[(label, prob), ...]``.
        vlm_probs: VLM probabilities over the candidates (+ optional ``OTHER``), or ``None`` when
            routing skipped the VLM.
        weight: the VLM's share in [0, 1].
        keep_other: keep ``OTHER`` as an outcome (default). ``False`` conditions the VLM on "the
            answer is a candidate" (renormalises it over the candidates) and returns no ``OTHER``.

    Returns:
        ``{label: probability}`` over the candidates in stage-1 order, then ``OTHER`` when
        ``keep_other``; values in [0, 1] summing to 1. With ``vlm_probs=None`` this is the
        renormalised stage-1 distribution (``OTHER`` = 0), whatever the weight.

    Raises:
        ValueError: weight outside [0, 1], or invalid inputs (see :func:`normalise_topk`,
            :func:`normalise_vlm`).
    """
    weight = _check_weight(weight)
    p1 = normalise_topk(stage1_topk)
    candidates = list(p1)
    if vlm_probs is None:
        fused = dict(p1)
        if keep_other:
            fused[OTHER] = 0.0
        return fused
    p2 = normalise_vlm(vlm_probs, candidates)
    if not keep_other:
        in_candidates = sum(p2[c] for c in candidates)
        if in_candidates <= 0.0:
            raise ValueError("keep_other=False but the VLM puts all its mass on 'other'")
        p2 = {c: p2[c] / in_candidates for c in candidates}
    fused = {c: (1.0 - weight) * p1[c] + weight * p2[c] for c in candidates}
    if keep_other:
        fused[OTHER] = weight * p2[OTHER]
    return fused


def top_label(probs: Mapping[str, float]) -> str:
    """The label with the highest probability; ties go to the first in iteration order."""
    if not probs:
        raise ValueError("empty distribution")
    return max(probs, key=lambda label: probs[label])


def should_route_to_vlm(stage1_top1_prob: float, threshold: float | None) -> bool:
    """Whether a photo goes to the VLM.

    Args:
        stage1_top1_prob: stage-1 probability of its top-1 label, in [0, 1].
        threshold: ``FusionConfig.routing_threshold``; ``None`` disables routing (every photo goes
            to the VLM).

    Returns:
        ``False`` (skip the VLM) when ``stage1_top1_prob > threshold``, else ``True``.

    Raises:
        ValueError: a probability or threshold outside [0, 1] or not finite.
    """
    prob = float(stage1_top1_prob)
    if not (0.0 <= prob <= 1.0):
        raise ValueError(f"stage-1 top-1 probability must be in [0, 1], got {prob!r}")
    if threshold is None:
        return True
    threshold = float(threshold)
    if not (0.0 <= threshold <= 1.0):
        raise ValueError(f"routing threshold must be in [0, 1], got {threshold!r}")
    return not prob > threshold
