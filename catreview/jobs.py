"""Background jobs: one daemon thread at a time, with progress shared with the UI's timers.

A leaf module (standard library and :mod:`catreview.errors` only). Users: the app's import +
predictions worker (:mod:`catreview.app.core`) and the aggregate comparison
(:mod:`catreview.app.compare_job`); training rounds run in a separate process instead
(:mod:`catreview.adapters.jobs`).
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from catreview.errors import CatreviewError


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

    def progress(self, stage: str, done: int, total: int) -> None:
        """Progress callback ``(stage, done, total)`` for the core's batch loops."""
        self.stage, self.done, self.total = stage, done, total


#: The work of a job: gets the job's state (to report progress) and its stop event (set by
#: :meth:`BackgroundJob.stop`; check it between batches); returns the finished job's message.
Work = Callable[[JobState, threading.Event], str]


class BackgroundJob:
    """Runs one :data:`Work` at a time in a daemon thread; ``state`` is its :class:`JobState`.

    A :class:`~catreview.errors.CatreviewError` raised by the work becomes the job's message
    (``failure_prefix`` + the error), as an expected outcome; any other exception is a bug and is
    kept as ``state.error`` with its traceback in ``state.log``, so the thread never dies silently.
    ``version`` counts finished runs (a UI redraws when it changes).
    """

    def __init__(self, name: str, *, failure_prefix: str = "") -> None:
        self.name = name
        self.failure_prefix = failure_prefix
        self.state = JobState()
        self.version = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def thread(self) -> threading.Thread | None:
        """The latest run's thread (``None`` before the first start)."""
        return self._thread

    @property
    def running(self) -> bool:
        """True while a run is going on."""
        return self.state.running

    def start(self, work: Work, *, stage: str = "starting") -> bool:
        """Start ``work`` in a new thread; ``False`` (nothing started) when a run is going on."""
        with self._lock:
            if self.state.running:
                return False
            self.state = JobState(running=True, stage=stage)
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, args=(work, self.state), name=self.name, daemon=True)
            self._thread.start()
            return True

    def _run(self, work: Work, state: JobState) -> None:
        try:
            state.message = work(state, self._stop)
            self.version += 1
        except CatreviewError as exc:
            state.message = f"{self.failure_prefix}{exc}"
        except Exception as exc:  # noqa: BLE001  (kept with its traceback in the UI; the thread must not die silently)
            state.error = f"{type(exc).__name__}: {exc}"
            state.log.append(traceback.format_exc())
        finally:
            state.running = False

    def stop(self) -> None:
        """Ask the run to stop (the work checks the stop event between batches)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends or ``timeout`` seconds pass; ``True`` when no run is going on."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True


__all__ = ["BackgroundJob", "JobState", "Work"]
