"""The review app's core, free of Gradio: what the UI shows and does, tested directly.

:class:`ReviewApp` owns the engine, the models (lazily), a background worker that imports
folders and runs predictions with visible progress, so the page is usable at once, and the
app's LoRA training rounds (:attr:`ReviewApp.train_jobs`). The UI (:mod:`catreview.app.ui`) sits on
top of it; core modules never import it (:class:`~catreview.jobs.JobState` lives in
:mod:`catreview.jobs` and is re-exported here).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, select

from catreview.config import Settings
from catreview.data.db import ImageRecord, get_image, make_engine
from catreview.data.images import load_rgb
from catreview.data.importer import import_folder
from catreview.jobs import JobState
from catreview.data.labels import BreedVocabulary
from catreview.predict.runner import candidates_key, cached_predictions, run_predictions, store_reasoning
from catreview.models.registry import ModelRegistry
from catreview.query.photos import iter_views, model_snapshot
from catreview.data.reviews import ReviewError, current_reviews, record_review, review_counts

if TYPE_CHECKING:
    from catreview.adapters.jobs import TrainJobs

__all__ = ["JobState", "ReviewApp"]


class ReviewApp:
    """State of one running app: settings, database, models, background predictions, training
    rounds (:attr:`train_jobs`).

    Args:
        settings: the loaded :class:`Settings`.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.registry = ModelRegistry(settings, engine=self.engine)
        self.vocabulary = BreedVocabulary.from_labels_file(settings.classifier.labels_file)
        self.job = JobState()
        self._job_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._train_jobs: TrainJobs | None = None
        self._train_jobs_lock = threading.Lock()

    def check_models(self) -> None:
        """Load the stage-1 classifier and resolve the active VLM's version (its config, without
        the weights), so a wrong path or an uncached hub id fails at start with one clear
        message instead of on every photo later.

        Raises:
            catreview.models.classifier.ClassifierError: the classifier cannot be loaded.
            catreview.models.vlm.postclassifier.VLMError: the VLM's config is not found (missing folder, offline hub id).
        """
        self.registry.classifier()
        _ = self.registry.vlm().model_version

    # ------------------------------------------------------------------ training rounds
    @property
    def train_jobs(self) -> TrainJobs:
        """The app's :class:`catreview.adapters.jobs.TrainJobs` (LoRA rounds in a separate process),
        created on first use with the default gate policy; creating it recovers crashed runs
        (:meth:`~catreview.adapters.jobs.TrainJobs.reconcile`). Assign to use another one (e.g. a
        stricter :class:`~catreview.adapters.versions.GatePolicy`)."""
        with self._train_jobs_lock:
            if self._train_jobs is None:
                from catreview.adapters.jobs import TrainJobs

                self._train_jobs = TrainJobs(self.engine, self.settings)
            return self._train_jobs

    @train_jobs.setter
    def train_jobs(self, jobs: TrainJobs) -> None:
        with self._train_jobs_lock:
            self._train_jobs = jobs

    # ------------------------------------------------------------------ background work
    def start_background(self, folders: list[Path] | None = None) -> bool:
        """Import ``folders`` (if any), then predict every photo, in a daemon thread.

        Returns ``False`` (and starts nothing) when a job is already running.
        """
        with self._job_lock:
            if self.job.running:
                return False
            self.job = JobState(running=True, stage="starting")
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, args=(list(folders or []),), daemon=True, name="catreview-predict")
            self._thread.start()
            return True

    def _progress(self, stage: str, done: int, total: int) -> None:
        self.job.stage, self.job.done, self.job.total = stage, done, total

    def _work(self, folders: list[Path]) -> None:
        try:
            for folder in folders:
                self.job.stage = f"importing {folder}"
                summary = import_folder(self.engine, folder, vocabulary=self.vocabulary, progress=lambda d, t: self._progress("import", d, t))
                self.job.log += summary.lines()
            self.job.stage = "loading models"
            summary = run_predictions(self.engine, self.registry, progress=self._progress, stop=self._stop)
            self.job.log += summary.lines()
            self.job.message = "Predictions ready. " + "; ".join(summary.lines()[:2])
        except Exception as exc:  # surfaced in the UI; the thread must not die silently
            self.job.error = f"{type(exc).__name__}: {exc}"
            self.job.log.append(traceback.format_exc())
        finally:
            self.job.running = False

    def wait(self, timeout: float | None = None) -> None:
        """Block until the background job ends (for tests and the CLI)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        """Ask the background job to stop after its current batch."""
        self._stop.set()

    # ------------------------------------------------------------------ reading
    def image_ids(self) -> list[int]:
        """Ids of decodable photos, in import order."""
        with Session(self.engine) as s:
            return list(s.exec(select(ImageRecord.id).where(ImageRecord.error.is_(None)).order_by(ImageRecord.id)))  # type: ignore[union-attr, arg-type]

    def failed_images(self) -> list[tuple[str, str]]:
        """(path, reason) of photos that could not be decoded."""
        with Session(self.engine) as s:
            return [(r.path, r.error or "") for r in s.exec(select(ImageRecord).where(ImageRecord.error.is_not(None)))]  # type: ignore[union-attr]

    def next_unreviewed(self, position: int) -> int | None:
        """Position (in :meth:`image_ids`) of the first photo without any review after
        ``position``, wrapping around to the start; ``None`` when every photo is reviewed.

        ``position`` -1 (or less) searches from the first photo; a position at or past the last
        photo searches from the first photo too.
        """
        ids = self.image_ids()
        with Session(self.engine) as s:
            done = set(current_reviews(s))
        start = min(max(position + 1, 0), len(ids))
        order = list(range(start, len(ids))) + list(range(0, start))
        return next((i for i in order if ids[i] not in done), None)

    def counts(self) -> tuple[int, int]:
        """(reviewed, total) photos."""
        with Session(self.engine) as s:
            return review_counts(s)

    def view(self, image_id: int) -> dict[str, Any]:
        """The photo's :func:`catreview.query.photos.image_view` (stage 1, VLM, fused, review).

        Raises:
            catreview.data.reviews.ReviewError: no photo with ``image_id``.
        """
        view = next(iter_views(self.engine, self.registry, image_ids=[image_id]), None)
        if view is None:
            raise ReviewError(f"no photo with id {image_id}")
        return view

    def image(self, image_id: int):
        """The photo decoded by :func:`catreview.data.images.load_rgb` (PIL RGB)."""
        with Session(self.engine) as s:
            return load_rgb(get_image(s, image_id).path)

    # ------------------------------------------------------------------ writing
    def review(self, image_id: int, label: str, annotator: str, note: str | None = None) -> dict[str, Any]:
        """Record a review (with the models' outputs at review time); returns the new view.

        Raises:
            catreview.data.reviews.ReviewError: no annotator, unknown label, failed image, unknown id.
        """
        snapshot = model_snapshot(self.view(image_id))
        with Session(self.engine) as s:
            record_review(s, image_id, label, annotator, vocabulary=self.vocabulary, note=note, model_snapshot=snapshot)
        return self.view(image_id)

    # ------------------------------------------------------------------ reasoning
    def stream_reasoning(self, image_id: int, stop: threading.Event | None = None) -> Iterator[str]:
        """Yield the reasoning text as it grows; cached texts are yielded at once.

        Yields nothing when stage 1 has not run yet for this photo or routing skipped the VLM.
        """
        v = self.view(image_id)
        if not v["stage1"] or (v["vlm"] or {}).get("skipped"):
            return
        candidates = [d["label"] for d in v["stage1"]]
        vlm = self.registry.vlm()
        with Session(self.engine) as s:
            hit = cached_predictions(s, "reasoning", vlm.model_id, vlm.model_version, [image_id]).get((image_id, candidates_key(candidates)))
        if hit is not None:
            yield hit.payload["text"]
            return
        t0 = time.perf_counter()
        text = ""
        stop = stop or threading.Event()
        for text in vlm.stream_reasoning(self.image(image_id), candidates, stop_event=stop):
            yield text
        if not stop.is_set():
            with Session(self.engine) as s:
                store_reasoning(s, vlm, image_id, candidates, text, time.perf_counter() - t0)
