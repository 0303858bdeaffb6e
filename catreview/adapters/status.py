"""One training run as the Train tab and the CLI show it (:class:`RunStatus`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass
class RunStatus:
    """One run as the UI shows it.

    ``status``: the ``TrainingRun`` row's (``running``, ``succeeded``, ``failed``,
    ``cancelled``). ``phase``: ``exporting``, ``starting``, ``training``, ``finished``. ``step``/``total_steps``,
    ``loss``: last training row; ``val_*``: last evaluation row; ``gate``: the stored gate decision
    of the run's adapter version (``GateDecision.to_dict()``), ``None`` before it exists.
    The line people read is :func:`catreview.app.presenters.train.run_status_line`.
    """

    run_id: int
    status: str
    phase: str
    base_model: str
    run_dir: str
    pid: int | None
    started_at: datetime
    finished_at: datetime | None
    step: int
    total_steps: int | None
    loss: float | None
    val_loss: float | None
    val_balanced_accuracy: float | None
    adapter_id: int | None
    activated: bool | None
    gate: dict[str, Any] | None
    error: str | None

    @property
    def summary(self) -> str:
        """What went wrong, for people: the ``error`` up to its first blank line (the reason the
        round gave, then where its log is), at most 3 lines; ``""`` without an error."""
        text = (self.error or "").strip()
        if not text:
            return ""
        if "\n\n" not in text:  # rows written before errors had a summary part: their first line
            return text.splitlines()[0]
        return "\n".join(text.split("\n\n", 1)[0].splitlines()[:3])


__all__ = ["RunStatus"]
