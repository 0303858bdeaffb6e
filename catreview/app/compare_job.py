"""The Compare tab's aggregate run in the background: :meth:`CompareSession.run_aggregate` on a
:class:`catreview.jobs.BackgroundJob`, with the messages the tab shows.

It lives in the app layer (not in :mod:`catreview.compare`) because what it reports is UI text
from :mod:`catreview.app.presenters.compare`.
"""

from __future__ import annotations

import threading

from catreview.app.presenters.compare import ALREADY_RUNNING, BUSY_AGGREGATE, aggregate_message
from catreview.compare.aggregate import CompareAggregate
from catreview.compare.session import CompareSession
from catreview.jobs import BackgroundJob, JobState


class AggregateJob:
    """:meth:`CompareSession.run_aggregate` in a daemon thread with progress for a UI timer.

    ``state`` is a :class:`catreview.jobs.JobState` (its message, once finished, is
    :func:`~catreview.app.presenters.compare.aggregate_message`, or ``"Cannot compare: <why>"``
    for a :class:`~catreview.compare.errors.CompareError`); ``result`` the last finished
    aggregate and ``version`` counts finished runs (the UI redraws when it changes).
    """

    def __init__(self, session: CompareSession) -> None:
        self.session = session
        self.result: CompareAggregate | None = None
        self._job = BackgroundJob("catreview-compare", failure_prefix="Cannot compare: ")

    @property
    def state(self) -> JobState:
        """Progress of the current (or last) run."""
        return self._job.state

    @state.setter
    def state(self, value: JobState) -> None:
        self._job.state = value

    @property
    def version(self) -> int:
        """Finished runs so far (0 before the first)."""
        return self._job.version

    @property
    def _thread(self) -> threading.Thread | None:
        """The last run's thread (``None`` before the first start)."""
        return self._job.thread

    def start(self, name_a: str, name_b: str, *, one_at_a_time: bool = False) -> bool:
        """Start a run; ``False`` (nothing started) when one is already running."""

        def work(state: JobState, stop: threading.Event) -> str:
            result = self.session.run_aggregate(
                name_a, name_b, one_at_a_time=one_at_a_time, progress=state.progress, stop=stop
            )
            self.result = result
            return aggregate_message(result)

        return self._job.start(work, stage="waiting for the models")

    def try_start(self, name_a: str, name_b: str, *, one_at_a_time: bool = False) -> str:
        """Start a run unless the models are busy (the session's ``busy``) or a run is going on;
        returns what to show: :data:`~catreview.app.presenters.compare.BUSY_AGGREGATE`,
        :data:`~catreview.app.presenters.compare.ALREADY_RUNNING`, or the progress line of the
        started run."""
        if self.session.busy():
            return BUSY_AGGREGATE
        if not self.start(name_a, name_b, one_at_a_time=one_at_a_time):
            return ALREADY_RUNNING
        return self.state.text()

    def stop(self) -> None:
        """Ask the run to stop after the current batch."""
        self._job.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends or ``timeout`` seconds pass (tests, CLI); ``True`` when no run
        is going on."""
        return self._job.wait(timeout)


__all__ = ["AggregateJob"]
