"""The Train tab's "Retrain classifier" in the background: :func:`catreview.heads.refit.refit_classifier`
on a :class:`catreview.jobs.BackgroundJob`, with the messages the tab shows.

One job per app (:func:`classifier_job`). When the refit activates a head, the app predicts the
new version in the background, review queue first (:meth:`ReviewApp.schedule_predictions`).
"""

from __future__ import annotations

import threading
import weakref

from catreview.adapters.gate import DEFAULT_POLICY, GatePolicy
from catreview.app.core import ReviewApp
from catreview.app.presenters import train as text
from catreview.heads.refit import RefitResult, refit_classifier
from catreview.jobs import BackgroundJob, JobState


class ClassifierJob:
    """A stage-1 refit of ``app``'s backbone in a daemon thread.

    ``state`` is its :class:`JobState` (progress ``("features", done, total)`` then ``("fit", ...)``;
    once finished, :func:`catreview.app.presenters.train.classifier_message` of the result, or
    ``"Classifier not retrained: <why>"`` for a :class:`~catreview.errors.CatreviewError`);
    ``result`` is the last finished refit; ``policy`` the gate's thresholds (assign another to
    gate more or less strictly).
    """

    def __init__(self, app: ReviewApp, policy: GatePolicy = DEFAULT_POLICY) -> None:
        self.app = app
        self.policy = policy
        self.result: RefitResult | None = None
        self._job = BackgroundJob("catreview-classifier", failure_prefix=text.CLASSIFIER_FAILED)

    @property
    def state(self) -> JobState:
        """Progress of the current (or last) refit."""
        return self._job.state

    def running(self) -> bool:
        """A refit is running now."""
        return self._job.state.running

    def start(self) -> bool:
        """Start a refit; ``False`` (nothing started) when one is already running."""

        def work(state: JobState, stop: threading.Event) -> str:
            result = refit_classifier(
                self.app.registry, self.app.engine, policy=self.policy, progress=state.progress, stop=stop
            )
            self.result = result
            if result.activated:
                self.app.schedule_predictions(f"stage-1 head #{result.version_id} activated")
            return text.classifier_message(result)

        return self._job.start(work)

    def stop(self) -> None:
        """Ask the running refit to stop before its next batch of features."""
        self._job.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running refit; ``True`` when none is running any more."""
        return self._job.wait(timeout)


_JOBS: weakref.WeakKeyDictionary[ReviewApp, ClassifierJob] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def classifier_job(app: ReviewApp) -> ClassifierJob:
    """The :class:`ClassifierJob` of ``app`` (created on first use)."""
    with _LOCK:
        job = _JOBS.get(app)
        if job is None:
            job = _JOBS[app] = ClassifierJob(app)
        return job


__all__ = ["ClassifierJob", "classifier_job"]
