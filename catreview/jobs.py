"""Progress of a background job, shared by the core's workers and read by the UI's timers.

A leaf module (standard library only), so core modules (:mod:`catreview.compare`) and the app
core (:mod:`catreview.app_core`) can both use :class:`JobState` without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class JobState:
    """Progress of one background job (a thread), read by the UI's timer.

    Attributes:
        running: the job's thread is working.
        stage: what it does now, in words (e.g. ``"import"``, ``"VLM A (7B)"``).
        done: items finished in the current stage (photos, batches: the stage's unit).
        total: items in the current stage (0 when unknown).
        message: the outcome, once finished (empty before).
        error: ``"<ExceptionType>: <message>"`` when the job failed, else ``None``.
        log: summary lines and, after a failure, the traceback.
    """

    running: bool = False
    stage: str = "idle"
    done: int = 0
    total: int = 0
    message: str = ""
    error: str | None = None
    log: list[str] = field(default_factory=list)

    def text(self) -> str:
        """One line for the UI: the failure, ``"Working: <stage> <done>/<total>"``, the finished
        job's message, or ``"Idle"``."""
        if self.error:
            return f"Background job failed: {self.error}"
        if self.running:
            pct = f" {self.done}/{self.total}" if self.total else ""
            return f"Working: {self.stage}{pct}"
        return self.message or "Idle"


__all__ = ["JobState"]
