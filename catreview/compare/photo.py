"""The state of one photo's comparison, updated in place while both sides run, and which photo it is.

:meth:`catreview.compare.session.CompareSession.compare_photo` yields a :class:`PhotoComparison`
after every change; :func:`catreview.app.presenters.compare.display_sides` turns it into panels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from catreview.compare.memory import MemoryReading
from catreview.compare.pairs import model_label


@dataclass
class SideState:
    """One side of a per-photo comparison, updated while it runs.

    Seconds are wall time; for cached outputs they are those stored when the output was computed.
    ``status``: ``waiting``, ``loading``, ``scoring``, ``reasoning``, ``done``, ``stopped`` or
    ``error``.
    """

    name: str
    model_id: str
    model_version: str
    status: str = "waiting"
    verdict: dict[str, Any] | None = None
    verdict_seconds: float | None = None
    verdict_cached: bool = False
    reasoning: str = ""
    reasoning_seconds: float | None = None
    reasoning_cached: bool = False
    load_seconds: float | None = None
    memory: MemoryReading | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        """``"<profile>|<model_version>"`` (:func:`catreview.compare.pairs.model_label`)."""
        return model_label(self.name, self.model_version)


@dataclass
class PhotoComparison:
    """The state of one photo's comparison (what the UI renders after each update).

    ``sides`` holds side A then side B as chosen; ``swapped`` says whether B is displayed as
    "Model 1" in blind mode. ``trial_id`` is set once both sides finished (the key for
    :meth:`catreview.compare.session.CompareSession.record_preference`), unless
    :func:`catreview.compare.blind.preference_refusal` finds nothing to
    judge: then ``preference_refused`` says why and ``trial_id`` stays ``None``.
    """

    image_id: int
    candidates: list[str]
    prompt: str
    sides: tuple[SideState, SideState]
    blind: bool
    swapped: bool
    one_at_a_time: bool
    human_label: str | None = None
    trial_id: str | None = None
    preference_refused: str | None = None  # blind, finished, but nothing to judge (preference_refusal)

    def displayed(self) -> tuple[SideState, SideState]:
        """The sides in display order (blind order when ``blind``)."""
        a, b = self.sides
        return (b, a) if self.blind and self.swapped else (a, b)

    @property
    def finished(self) -> bool:
        """Both sides are done (not stopped, not failed)."""
        return all(s.status == "done" for s in self.sides)


@dataclass(frozen=True)
class PhotoPick:
    """A photo chosen for comparison (:meth:`catreview.compare.session.CompareSession.pick_photo`).

    Attributes:
        position: its index in :meth:`catreview.compare.session.CompareSession.photo_ids` (0-based).
        image_id: its database id.
        total: how many decodable photos there are (>= 1).
    """

    position: int
    image_id: int
    total: int


__all__ = ["PhotoComparison", "PhotoPick", "SideState"]
