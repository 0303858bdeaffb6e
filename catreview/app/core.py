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
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from catreview.adapters.versions import activate, deactivate, version_rows
from catreview.compare.session import CompareSession
from catreview.config import Settings
from catreview.data.db import AdapterVersion, ImageRecord, Review, get_image, make_engine
from catreview.data.images import load_rgb
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.data.reviews import HEAD, Head, ReviewError, record_review
from catreview.errors import CatreviewError
from catreview.evaluate.calibration import CalibrationReport
from catreview.evaluate.store import fit_and_store
from catreview.export.archive import zip_export
from catreview.export.dataset import ExportSummary, export_dataset
from catreview.jobs import BackgroundJob, JobState
from catreview.models.registry import ModelRegistry
from catreview.predict.runner import cached_predictions, candidates_key, run_predictions, store_reasoning
from catreview.query import photos
from catreview.query.display import display_file
from catreview.query.photos import PhotoView, RoutingStats, model_snapshot

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
        self._background = BackgroundJob("catreview-predict")
        self._train_jobs: TrainJobs | None = None
        self._train_jobs_lock = threading.Lock()

    def check_models(self) -> None:
        """Load the stage-1 classifier and resolve the active VLM's version (its config, without
        the weights), so a wrong path or an uncached hub id fails at start with one clear
        message instead of on every photo later.

        Raises:
            catreview.models.classifier.ClassifierError: the classifier cannot be loaded.
            catreview.models.vlm.types.VLMError: the VLM's config is not found (missing folder, offline hub id).
        """
        self.registry.classifier()
        _ = self.registry.vlm().model_version

    # ------------------------------------------------------------------ training rounds
    @property
    def train_jobs(self) -> TrainJobs:
        """The app's :class:`catreview.adapters.jobs.TrainJobs` (LoRA rounds in a separate process),
        created on first use with the default gate policy; creating it recovers crashed runs
        (:meth:`~catreview.adapters.jobs.TrainJobs.reconcile`). Assign to use another one (e.g. a
        stricter :class:`~catreview.adapters.gate.GatePolicy`)."""
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
    @property
    def job(self) -> JobState:
        """Progress of the background import + predictions (read by the UI's timer)."""
        return self._background.state

    def start_background(self, folders: list[Path] | None = None, *, predict: bool = True) -> bool:
        """Import ``folders`` (if any), then (unless ``predict`` is false) predict every photo
        still lacking predictions, in a daemon thread.

        Returns ``False`` (and starts nothing) when a job is already running.
        """
        return self._background.start(lambda state, stop: self._work(list(folders or []), state, stop, predict))

    def _work(self, folders: list[Path], state: JobState, stop: threading.Event, predict: bool = True) -> str:
        for folder in folders:
            state.stage = f"importing {folder}"
            try:  # unreadable files are listed in the summary; a folder that fails as a whole is logged
                summary = import_folder(
                    self.engine,
                    folder,
                    vocabulary=self.vocabulary,
                    progress=lambda d, t: state.progress("import", d, t),
                )
            except (OSError, CatreviewError, BrokenProcessPool) as exc:  # gone, unlistable, a worker killed
                state.log.append(f"import of {folder} stopped (what was imported is kept): {exc}")
                continue
            state.log += summary.lines()
        if not predict:
            return f"Imported {len(folders)} folder(s); predictions not run (started with --no-predict)."
        state.stage = "loading models"
        predicted = run_predictions(self.engine, self.registry, progress=state.progress, stop=stop)
        state.log += predicted.lines()
        return "Predictions ready. " + "; ".join(predicted.lines()[:2])

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background job ends or ``timeout`` s pass; ``True`` when it has ended."""
        return self._background.wait(timeout)

    def stop(self) -> None:
        """Ask the background job to stop after its current batch."""
        self._background.stop()

    # ------------------------------------------------------------------ reading (constant time per click)
    def first_photo(self) -> int | None:
        """Id of the first photo in review order, or ``None`` (:func:`catreview.query.photos.first_photo`)."""
        return photos.first_photo(self.engine)

    def neighbour(self, image_id: int | None, step: int) -> int | None:
        """The photo after (``step`` +1) or before (-1) ``image_id`` (:func:`catreview.query.photos.neighbour`)."""
        return photos.neighbour(self.engine, image_id, step)

    def next_unreviewed(self, after: int | None = None) -> int | None:
        """Id of the next photo without a review after photo ``after``, wrapping around
        (:func:`catreview.query.photos.next_unreviewed`)."""
        return photos.next_unreviewed(self.engine, after)

    def failed_images(self, limit: int = 1000) -> list[tuple[str, str]]:
        """(path, reason) of up to ``limit`` photos that could not be decoded."""
        return photos.failed_images(self.engine, limit=limit)

    def counts(self) -> tuple[int, int]:
        """(reviewed, total) photos."""
        return photos.counts(self.engine)

    def view(self, image_id: int) -> PhotoView:
        """The photo's :class:`catreview.query.photos.PhotoView` (stage 1, VLM, fused, review).

        Raises:
            catreview.data.reviews.ReviewError: no photo with ``image_id``.
        """
        return photos.photo_view(self.engine, self.registry, image_id)

    def image(self, image_id: int):
        """The photo decoded by :func:`catreview.data.images.load_rgb` (PIL RGB)."""
        with Session(self.engine) as s:
            return load_rgb(get_image(s, image_id).path)

    def display_path(self, image_id: int) -> Path:
        """A file the browser can show for the photo: the stored file itself when browsers display
        it as is, else a cached, content-addressed JPEG (:func:`catreview.query.display.display_file`).

        Raises:
            catreview.data.reviews.ReviewError: no photo with ``image_id``.
            catreview.data.images.ImageDecodeError: the file is gone or cannot be decoded.
        """
        with Session(self.engine) as s:
            img = s.get(ImageRecord, image_id)
            if img is None:
                raise ReviewError(f"no photo with id {image_id}")
            path, sha = img.path, img.sha256
        return display_file(path, sha, self.display_dir)

    @property
    def display_dir(self) -> Path:
        """The folder of display files (``data_dir/display-cache``): the only one the UI serves."""
        return self.settings.data_dir / "display-cache"

    # ------------------------------------------------------------------ writing
    def review(
        self,
        image_id: int,
        label: str,
        annotator: str,
        note: str | None = None,
        *,
        replaces: int | Head | None = HEAD,
    ) -> Review:
        """Record a review (with the models' outputs at review time) and return it.

        Args:
            replaces: the review id the annotator was looking at (``None``: none); the default
                chains after the newest review (see :func:`catreview.data.reviews.record_review`).

        Raises:
            catreview.data.reviews.ReviewError: no annotator, unknown label, failed image, unknown id.
            catreview.data.reviews.ReviewConflictError: ``replaces`` is no longer the newest review.
        """
        snapshot = model_snapshot(self.view(image_id))
        with Session(self.engine) as s:
            return record_review(
                s,
                image_id,
                label,
                annotator,
                vocabulary=self.vocabulary,
                note=note,
                model_snapshot=snapshot,
                replaces=replaces,
            )

    # ------------------------------------------------------------------ calibration, export, adapters
    def calibrate(self) -> tuple[CalibrationReport, int | None]:
        """Fit and store the calibration on the reviewed photos (:func:`catreview.evaluate.store.fit_and_store`).

        Returns ``(report, stored calibration id)``.

        Raises:
            ValueError: too few reviewed photos (``CalibrationError``) or invalid stored predictions.
        """
        return fit_and_store(self.settings, self.registry)

    def routing(self) -> RoutingStats:
        """Photos routed to / past the VLM under the current threshold (:func:`catreview.query.photos.routing_stats`)."""
        return photos.routing_stats(self.engine, self.registry)

    def export(
        self, out_dir: Path, *, progress: Callable[[int, int], None] | None = None, **options: Any
    ) -> tuple[ExportSummary, Path]:
        """Export the reviews as a curated dataset into ``out_dir`` (checked against the active VLM's
        processor) and zip it; returns ``(summary, zip path)``. ``options`` are those of
        :func:`catreview.export.dataset.export_dataset` (seed, image_size, cap_per_breed, ...).

        Raises:
            catreview.export.dataset.ExportError: nothing could be exported; nothing was written.
            ValueError: bad options or an unknown VLM profile.
        """
        summary = export_dataset(
            self.engine,
            out_dir,
            processor=self.registry.base_model(),
            vocabulary=self.vocabulary,
            progress=progress,
            **options,
        )
        return summary, zip_export(summary.out_dir)

    def adapter_versions(self) -> list[dict[str, Any]]:
        """The active base model's adapter versions as table rows (:func:`catreview.adapters.versions.version_rows`)."""
        return version_rows(self.engine, self.registry.base_model())

    def promote(self, adapter_id: int) -> AdapterVersion:
        """Activate an adapter version by hand (promote or roll back; no gate).

        Raises:
            catreview.adapters.versions.AdapterError: no such version, or its files are gone.
        """
        return activate(self.engine, adapter_id)

    def no_adapter(self) -> None:
        """Deactivate every adapter of the active base model: the base model predicts alone."""
        deactivate(self.engine, self.registry.base_model())

    def compare_session(self) -> CompareSession:
        """A :class:`catreview.compare.session.CompareSession` on this app's models and database;
        it refuses to run while the background predictions hold the models."""
        return CompareSession(self.settings, self.registry, self.engine, self.vocabulary, busy=lambda: self.job.running)

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
            hit = cached_predictions(s, "reasoning", vlm.model_id, vlm.model_version, [image_id]).get(
                (image_id, candidates_key(candidates))
            )
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
