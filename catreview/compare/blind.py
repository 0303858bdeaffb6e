"""Blind trials: a finished blind comparison awaiting a choice, when a choice would teach nothing,
and the outcome of recording one.

The annotator's choice is stored in ``preferences`` with both outputs in display order
(``model_a`` = what was shown as Model 1) and exported as DPO pairs by
:func:`catreview.export.preferences.export_preference_pairs`. No preference is recorded when both
sides are the same model version or their outputs are the same text (:func:`preference_refusal`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from catreview.compare.pairs import split_model_label
from catreview.data.db import Preference

CHOICES = ("1", "2", "tie")
"""Choices offered in blind mode: displayed Model 1, Model 2, or a tie."""


@dataclass(frozen=True)
class BlindTrial:
    """A finished blind comparison awaiting the annotator's choice (kept server-side)."""

    image_id: int
    prompt: str
    shown: tuple[tuple[str, str], tuple[str, str]]  # ((model label, reasoning), ...) in display order


def preference_refusal(shown: Sequence[tuple[str, str]]) -> str | None:
    """Why a blind choice between ``shown`` (``(model label, output)`` of Model 1 and Model 2)
    would be a useless training pair, or ``None`` when it is a real choice.

    Refused: both sides are the same model version (:func:`catreview.compare.pairs.model_label`; two profile names for
    the same checkpoint count as the same), or both outputs are the same text (ignoring
    surrounding whitespace), since chosen would equal rejected.
    """
    (label_1, out_1), (label_2, out_2) = shown
    if split_model_label(label_1)[1] == split_model_label(label_2)[1]:
        return (
            "both sides are the same model version, so there is nothing to choose between; "
            "pick two different profiles (or two adapter versions) to record preferences"
        )
    if (out_1 or "").strip() == (out_2 or "").strip():
        return "both outputs are the same text, so a chosen/rejected pair would teach nothing"
    return None


@dataclass(frozen=True)
class PreferenceResult:
    """Outcome of :meth:`catreview.compare.session.CompareSession.try_record_preference`: the stored row, or why not.

    Exactly one of ``preference`` and ``error`` is set.
    """

    preference: Preference | None = None
    error: str | None = None

    @property
    def saved(self) -> bool:
        """Whether a preference was stored."""
        return self.preference is not None

    def text(self) -> str:
        """The tab's message: ``"Saved preference #7: Model 2 (photo 3, by alice)."`` (``a tie``
        for a tie), or ``"⚠️ <why not>"``."""
        pref = self.preference
        if pref is None:
            return f"⚠️ {self.error}"
        said = {"a": "Model 1", "b": "Model 2", "tie": "a tie"}[pref.choice]
        return f"Saved preference #{pref.id}: {said} (photo {pref.image_id}, by {pref.annotator})."

    def api_text(self) -> str:
        """The API's answer: ``"saved preference #7"`` or ``"error: <why not>"``."""
        return f"saved preference #{self.preference.id}" if self.preference is not None else f"error: {self.error}"


__all__ = ["CHOICES", "BlindTrial", "PreferenceResult", "preference_refusal"]
