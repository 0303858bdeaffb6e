"""What stage 2 hands out: its verdict (:class:`VLMVerdict`) and its errors (:class:`VLMError`).

Kept apart from the modules that produce them (:mod:`catreview.models.vlm.loading`,
:mod:`catreview.models.vlm.scoring`, :mod:`catreview.models.vlm.postclassifier`) so each of
those can raise the same error without importing the others. Importing it imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from catreview.errors import CatreviewError


class VLMError(CatreviewError, RuntimeError):
    """A stage-2 problem the user can act on (configuration, missing model, memory).

    The message says what happened and what to change; the original exception, if any, is
    chained as ``__cause__``.
    """


class TokenBoundaryError(VLMError):
    """The prompt's tokens are not a prefix of prompt + answer tokens
    (see :func:`catreview.models.vlm.scoring.answer_token_ids`)."""


@dataclass(frozen=True)
class VLMVerdict:
    """Stage-2 verdict for one photo.

    Attributes:
        candidates: labels scored, stage-1 order, :data:`catreview.models.vlm.prompts.OTHER_LABEL` last.
        probabilities: softmax of ``scores``; floats in [0, 1], same length, sum to 1.
        scores: the normalised log-probabilities used (``<= 0``; mean or sum per profile).
        label: the candidate with the highest probability.
        confidence: its probability.
        model_version: :attr:`catreview.models.vlm.postclassifier.VLMPostClassifier.model_version`
            that produced it.
        extra: optional diagnostics, not compared (``generate_verdict`` puts the raw answer
            text under ``"answer"``).
    """

    candidates: list[str]
    probabilities: list[float]
    scores: list[float]
    label: str
    confidence: float
    model_version: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_scores(cls, candidates: Sequence[str], scores: Sequence[float], model_version: str) -> VLMVerdict:
        """Softmax ``scores`` (finite or ``-inf``; at least one finite) into a verdict."""
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        total = sum(exps)
        probs = [e / total for e in exps]
        best = max(range(len(probs)), key=probs.__getitem__)
        return cls(
            candidates=list(candidates),
            probabilities=probs,
            scores=[float(s) for s in scores],
            label=candidates[best],
            confidence=probs[best],
            model_version=model_version,
        )


__all__ = ["TokenBoundaryError", "VLMError", "VLMVerdict"]
