"""The review app's core, free of Gradio: what the UI shows and does, tested directly.

:class:`ReviewApp` owns the engine, the models (lazily), a background worker that imports
folders and runs predictions with visible progress, so the page is usable at once, and the
app's LoRA training rounds (:attr:`ReviewApp.train_jobs`).

Predictions follow the active versions: :meth:`ReviewApp.schedule_predictions` (called after an
adapter is promoted, rolled back or switched off, after a training round that activated a version,
and by whoever activates a stage-1 version) re-runs the cached predictions in the background for the
versions now active, the review queue first (the photo on screen and the next unreviewed ones, then
the other unreviewed photos, then the rest); a pass in progress for the old versions is cut short
after its current batch (what it stored is kept). The UI (:mod:`catreview.app.ui`) sits on
top of it; core modules never import it (:class:`~catreview.jobs.JobState` lives in
:mod:`catreview.jobs` and is re-exported here).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from catreview.adapters.versions import activate, deactivate, version_rows
from catreview.compare.session import CompareSession
from catreview.config import Settings
from catreview.data import audit, overlap
from catreview.data.audit import AuditAction
from catreview.data.counts import Totals
from catreview.data.db import (
    AdapterVersion,
    ImageRecord,
    OverlapItem,
    Review,
    active_adapter_version,
    get_image,
    make_engine,
)
from catreview.data.images import load_rgb
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.data.overlap import VoteOutcome
from catreview.data.phash import backfill_phashes
from catreview.data.reviews import HEAD, Head, ReviewError, record_review
from catreview.errors import CatreviewError
from catreview.evaluate import duplicates
from catreview.evaluate.calibration import CalibrationReport
from catreview.evaluate.duplicates import DuplicateGroup, DuplicateMember
from catreview.evaluate.label_errors import LabelIssueRanking, LabelIssuesUnavailable, rank_label_issues
from catreview.evaluate.report import EvaluationReport, active_versions, evaluation_report
from catreview.evaluate.store import fit_and_store
from catreview.export.archive import zip_export
from catreview.export.dataset import ExportSummary, export_dataset
from catreview.jobs import BackgroundJob, JobState
from catreview.models.classifier import ClassifierNotTrainedError
from catreview.models.registry import ModelRegistry
from catreview.predict.runner import (
    PredictSummary,
    cached_predictions,
    candidates_key,
    run_predictions,
    store_reasoning,
)
from catreview.query import history, photos, queues
from catreview.query.display import display_file
from catreview.query.history import Decision, HistoryEntry, UndoResult
from catreview.query.photos import PhotoView, RoutingStats, model_snapshot
from catreview.query.queues import QueueItem

if TYPE_CHECKING:
    from catreview.adapters.jobs import TrainJobs
    from catreview.adapters.rounds import RoundOutcome
    from catreview.adapters.train_config import TrainConfig
    from catreview.export.preferences import PreferenceExport

APP_ACTOR = "app"
"""The audit actor of what the app starts on its own (the cold start's first LoRA round)."""

__all__ = ["APP_ACTOR", "OVERLAP_QUEUE", "QUEUE_FIRST", "QUEUE_PAGE", "JobState", "ReviewApp", "Saved"]

OVERLAP_QUEUE = "overlap"
"""The Review tab's queue of the open overlap-round photos the caller has not voted on yet
(:func:`catreview.data.overlap.next_for`; per annotator, so not a ``photo_scores`` queue)."""

QUEUE_FIRST = 32
"""Unreviewed photos after the one on screen predicted first (what a reviewer sees next)."""
QUEUE_PAGE = 5000
"""Unreviewed photo ids per prediction call after those (an ``IN`` list well below SQLite's 32,766
bound variables)."""


def _add_summary(total: PredictSummary, part: PredictSummary, *, whole: bool) -> None:
    """Add the counts of one chunk's run to ``total``. The last chunk (every photo, ``whole``
    true) counts ``images`` and the cached rows; earlier chunks only add what they computed."""
    for name in ("stage1_computed", "vlm_computed", "vlm_skipped", "reasoning_computed"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    for name in ("stage1_seconds", "vlm_seconds", "reasoning_seconds"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.failed += part.failed
    total.cancelled = total.cancelled or part.cancelled
    total.vlm_not_run = total.vlm_not_run or part.vlm_not_run
    total.stage1_skipped = total.stage1_skipped or part.stage1_skipped
    if whole:
        total.images, total.stage1_cached, total.vlm_cached = part.images, part.stage1_cached, part.vlm_cached


@dataclass(frozen=True)
class Saved:
    """What :meth:`ReviewApp.save_decision` stored: a ``review`` (the photo's new current review),
    or, for a photo of an open overlap round, the annotator's blind ``vote`` (whose ``review`` is
    set once the round settled it by consensus)."""

    label: str
    review: Review | None = None
    vote: VoteOutcome | None = None
    previous_vote: str | None = None


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
        self._first_round_tried = False
        self._background = BackgroundJob("catreview-predict")
        # Prediction scheduling (schedule_predictions): requests not yet taken by the loop, whether
        # a loop (the background job) is taking them, the current pass's interrupt.
        self._schedule_lock = threading.Lock()
        self._pending: list[str] = []
        self._looping = False
        self._pass_stop = threading.Event()
        self._predict_enabled = True
        self._last_viewed: int | None = None
        self._train_jobs: TrainJobs | None = None
        self._train_jobs_lock = threading.Lock()
        # Versions activated by another process (watch_versions): the ids last predicted for.
        self._seen_versions: tuple[int | None, int | None] | None = None
        self._watch_stop = threading.Event()

    def check_models(self) -> None:
        """Load the stage-1 classifier and resolve the active VLM's version (its config, without
        the weights), so a wrong path or an uncached hub id fails at start with one clear
        message instead of on every photo later.

        Raises:
            catreview.models.classifier.ClassifierError: the classifier cannot be loaded.
            catreview.models.vlm.types.VLMError: the VLM's config is not found (missing folder, offline hub id).
        """
        try:
            self.registry.classifier()
        except ClassifierNotTrainedError:  # the built-in backbone before its first head: the app
            self.registry.stage1_backbone()  # starts and says so; the backbone itself must load
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

                jobs = TrainJobs(self.engine, self.settings, reconcile=False)
                jobs.on_registered.append(self._round_registered)
                jobs.reconcile()  # after the hook: a round that finished meanwhile is predicted too
                self._train_jobs = jobs
            return self._train_jobs

    @train_jobs.setter
    def train_jobs(self, jobs: TrainJobs) -> None:
        with self._train_jobs_lock:
            if self._round_registered not in jobs.on_registered:
                jobs.on_registered.append(self._round_registered)
            self._train_jobs = jobs

    def _round_registered(self, outcome: RoundOutcome) -> None:
        """:attr:`TrainJobs.on_registered` hook: a round that activated its version is predicted."""
        if outcome.activated:
            self.schedule_predictions(f"training round activated adapter #{outcome.adapter_id}")

    def _audit(self, actor: str, action: AuditAction, target: str = "", **detail: Any) -> None:
        """Append one audit row (:func:`catreview.data.audit.record`) for ``actor``."""
        with Session(self.engine) as s:
            audit.record(s, actor, action, target, **detail)

    def round_defaults(self) -> TrainConfig:
        """The base :class:`TrainConfig` of a round started from the app ("Retrain adapter", the
        cold start's first round): the CPU recipe
        :func:`catreview.adapters.train_config.builtin_first_round` when rounds adapt a built-in
        pretrained FastVLM (:attr:`catreview.config.Settings.builtin_pretrained_vlm`), else the
        :class:`TrainConfig` defaults (a user's LLaVA on a GPU)."""
        from catreview.adapters.train_config import TrainConfig, builtin_first_round

        return builtin_first_round() if self.settings.builtin_pretrained_vlm else TrainConfig()

    def start_round(self, config: TrainConfig | None = None, *, actor: str, base_model: str | None = None) -> int:
        """Start a LoRA round of ``base_model`` (default: the active profile's) with ``config``
        in a separate process (:meth:`catreview.adapters.jobs.TrainJobs.start`) and record who
        started it (audit ``train_start``, target ``run #N``); returns the run id.

        Raises:
            catreview.adapters.jobs.TrainingBusy: a round is already running (nothing recorded).
            catreview.errors.CatreviewError: too few reviews for a round, an unknown profile.
        """
        base = base_model or self.registry.base_model()
        run_id = self.train_jobs.start(base, config)
        self._audit(actor, AuditAction.TRAIN_START, f"run #{run_id}", stage="vlm", base_model=base)
        return run_id

    def cancel_round(self, *, actor: str) -> bool:
        """Stop the running LoRA round (its checkpoint is kept) and record who stopped it (audit
        ``train_cancel``); ``False`` (nothing recorded) when no round is running."""
        run = self.train_jobs.running()
        if run is None or run.id is None or not self.train_jobs.cancel(run.id):
            return False
        self._audit(actor, AuditAction.TRAIN_CANCEL, f"run #{run.id}", stage="vlm")
        return True

    def retrain_classifier(self, *, actor: str) -> bool:
        """Start a stage-1 head refit in the background (:class:`catreview.app.classifier_job.ClassifierJob`)
        and record who started it (audit ``train_start``, target ``classifier``); ``False``
        (nothing recorded) when a refit is already running."""
        from catreview.app.classifier_job import classifier_job

        if not classifier_job(self).start():
            return False
        self._audit(actor, AuditAction.TRAIN_START, "classifier", stage="classifier")
        return True

    # ------------------------------------------------------------------ background work
    @property
    def job(self) -> JobState:
        """Progress of the background import + predictions (read by the UI's timer)."""
        return self._background.state

    def start_background(
        self,
        folders: list[Path] | None = None,
        *,
        predict: bool = True,
        labels_csv: Path | None = None,
        labels_from_folders: bool = False,
    ) -> bool:
        """Import ``folders`` (if any; existing labels from ``labels_csv`` or the folder names
        become reviews), then (unless ``predict`` is false) predict every photo still lacking
        predictions, review queue first, in a daemon thread.

        Cold start with the built-in models (:meth:`_cold_start`): when stage 1 has no trained
        head yet and photos are reviewed, a head is fitted first; after the predictions, a first
        LoRA round of the built-in VLM is started when it is untrained.

        ``predict=False`` (``app.py --no-predict``) also turns :meth:`schedule_predictions` off.
        Returns ``False`` (and starts nothing) when a job is already running.
        """
        folders = list(folders or [])
        labels = (labels_csv, labels_from_folders)
        with self._schedule_lock:
            self._predict_enabled = predict
            claimed = predict and not self._looping
            if claimed:
                self._looping = True  # requests made while importing are taken by this job's loop
        started = self._background.start(lambda state, stop: self._work(folders, state, stop, claimed, labels))
        if not started and claimed:
            with self._schedule_lock:
                self._looping = False
        return started

    def schedule_predictions(self, reason: str) -> None:
        """Predict the versions that are active now, in the background: call it after activating
        a version (an adapter, a stage-1 head), rolling back or switching an adapter off.

        The photos go review queue first: the photo last shown, the next :data:`QUEUE_FIRST`
        unreviewed photos after it (wrapping around), then the other unreviewed photos in review
        order, then all the rest (cached outputs are reused, see
        :func:`catreview.predict.runner.run_predictions`). A pass already running is cut short after
        its current batch and the loop starts over for the new versions; during an import the
        request waits for the import. Nothing happens when the app was started with
        ``predict=False``. Never blocks on the predictions; ``reason`` goes into the job's log.
        """
        seen = self.active_version_ids()  # outside the lock: two indexed reads
        with self._schedule_lock:
            self._seen_versions = seen
            if not self._predict_enabled:
                return
            self._pending.append(reason)
            if self._looping:
                self._pass_stop.set()  # the running loop takes the request after its current batch
                return
            self._looping = True
        while not self._background.start(lambda state, stop: self._work([], state, stop, True)):
            # The previous run has left its loop and is returning (an instant): wait for it.
            self._background.wait(0.05)

    def _work(
        self,
        folders: list[Path],
        state: JobState,
        stop: threading.Event,
        predict: bool = True,
        labels: tuple[Path | None, bool] = (None, False),
    ) -> str:
        try:
            imported = self._import(folders, state, *labels)
            if not predict:
                return f"Imported {imported} folder(s); predictions not run (started with --no-predict)."
            self._cold_start(state, stop)
            message = self._predict_loop(state, stop)  # it releases the loop itself, under the lock
            if not stop.is_set():
                self._first_vlm_round(state)
            return message
        except BaseException:
            if predict:  # a bug: the job keeps the traceback; the next request starts a new loop
                with self._schedule_lock:
                    self._looping = False
            raise

    def _builtin_untrained(self) -> tuple[bool, bool]:
        """``(stage 1, VLM)``: whether each stage is a built-in pretrained model still untrained."""
        if self.settings.builtin_models != "pretrained":
            return False, False
        builtin_clf, builtin_vlm = self.settings.builtin_stages
        stage1 = builtin_clf and self.registry.stage1_untrained_reason() is not None
        return stage1, builtin_vlm and self.registry.untrained_reason() is not None

    def _cold_start(self, state: JobState, stop: threading.Event) -> None:
        """Fit the first stage-1 head of the built-in backbone on the reviews (features of every
        photo, then a balanced logistic regression: :func:`catreview.heads.refit.refit_classifier`),
        so that predictions can start. Nothing happens when stage 1 is configured or trained, or
        when no photo is reviewed (the Review tab then says that stage 1 is not trained yet)."""
        if not self._builtin_untrained()[0]:
            return
        from catreview.app.presenters.train import classifier_message
        from catreview.heads.refit import refit_classifier

        reviewed, _ = self.counts()
        if reviewed == 0:
            state.log.append("Stage 1 is not trained yet: review some photos, then press Train → Retrain classifier.")
            return
        state.stage = f"training stage 1: a breed head on the built-in backbone from {reviewed} reviews"
        try:
            result = refit_classifier(self.registry, self.engine, progress=state.progress, stop=stop)
        except CatreviewError as exc:  # too few reviewed breeds or photos: said, predictions wait for a head
            state.log.append(f"Stage 1 not trained: {exc}")
            return
        state.log.append(classifier_message(result))

    def _first_vlm_round(self, state: JobState) -> None:
        """Start the first LoRA round of the built-in VLM (a separate process, as "Retrain
        adapter" does) when it is untrained and stage 1 is trained; when the round's version
        passes the gate it is activated and predicted (:meth:`_round_registered`)."""
        stage1_untrained, vlm_untrained = self._builtin_untrained()
        if stage1_untrained or not vlm_untrained or self._first_round_tried or not self.settings.first_vlm_round:
            return
        self._first_round_tried = True  # once per app: a round the gate refused is not re-run unasked
        try:
            run_id = self.start_round(self.round_defaults(), actor=APP_ACTOR)
        except CatreviewError as exc:  # a round already running, too few reviews: said, not retried
            state.log.append(f"VLM round not started: {exc}")
            return
        state.log.append(f"Training the built-in VLM (first LoRA round, run #{run_id}): see the Train tab.")

    def _import(
        self, folders: list[Path], state: JobState, labels_csv: Path | None = None, from_folders: bool = False
    ) -> int:
        for folder in folders:
            state.stage = f"importing {folder}"
            try:  # unreadable files are listed in the summary; a folder that fails as a whole is logged
                summary = import_folder(
                    self.engine,
                    folder,
                    labels_csv=labels_csv,
                    labels_from_folders=from_folders,
                    vocabulary=self.vocabulary,
                    progress=lambda d, t: state.progress("import", d, t),
                )
            except (OSError, CatreviewError, BrokenProcessPool) as exc:  # gone, unlistable, a worker killed
                state.log.append(f"import of {folder} stopped (what was imported is kept): {exc}")
                continue
            state.log += summary.lines()
        return len(folders)

    def _predict_loop(self, state: JobState, stop: threading.Event) -> str:
        """Prediction passes until no request is pending (the first pass always runs)."""
        message = ""
        first = True
        while True:
            with self._schedule_lock:
                if stop.is_set() or (not first and not self._pending):
                    self._pending.clear()
                    self._looping = False  # from here on, a request starts a new job
                    return message or "Predictions stopped."
                reasons, self._pending = self._pending, []
                self._pass_stop = threading.Event()
                pass_stop = self._pass_stop
            first = False
            if reasons:
                state.log.append("predicting again: " + "; ".join(reasons))
            try:
                message = self._predict_pass(state, pass_stop)
            except CatreviewError as exc:  # a model that cannot load: said, and the loop goes on
                message = f"Predictions not run: {exc}"
                state.log.append(message)

    def _predict_pass(self, state: JobState, stop: threading.Event) -> str:
        """One pass over the photos in queue order (:meth:`schedule_predictions`)."""
        state.stage = "loading models"
        total = PredictSummary()
        for label, ids in self._queue_order():
            if stop.is_set():
                break

            def progress(stage: str, done: int, n: int, label: str = label) -> None:
                state.progress(f"{stage} ({label})", done, n)

            summary = run_predictions(self.engine, self.registry, image_ids=ids, progress=progress, stop=stop)
            _add_summary(total, summary, whole=ids is None)
            if summary.cancelled:
                break
        state.log += total.lines()
        if not stop.is_set():  # a pass cut short (app stopping, versions changed): the next one scores
            state.stage = "updating the review queues"
            state.log.append(f"review queues: {queues.refresh_scores(self.engine, self.registry)} photos scored")
            # the scores were rewritten for the active versions: rank the label errors again
            try:
                ranking = self.refresh_label_issues()
                state.log.append(ranking.summary())
            except (LabelIssuesUnavailable, ValueError) as exc:  # no head yet; labels cleanlab cannot rank
                state.log.append(f"likely label errors: not ranked ({exc})")
        if total.cancelled or stop.is_set():
            return "Predictions interrupted: " + "; ".join(total.lines()[:2])
        return "Predictions ready. " + "; ".join(total.lines()[:2])

    def _queue_order(self) -> Iterator[tuple[str, list[int] | None]]:
        """``(label, image ids)`` chunks in prediction order; the last chunk (``None``) is every
        photo. Each chunk is predicted in id order, so the order across chunks is the queue's: the
        photo on screen, the next unreviewed after it, those before it (wrapping around), the
        other unreviewed photos, the rest."""
        shown = self._last_viewed
        done: set[int] = set()
        if shown is not None:
            done.add(shown)
            yield "photo on screen", [shown]
        after = photos.page(self.engine, after=shown, limit=QUEUE_FIRST, unreviewed_only=True)
        wrapped = [i for i in photos.page(self.engine, limit=QUEUE_FIRST, unreviewed_only=True) if i not in after]
        for chunk in (after, wrapped[: QUEUE_FIRST - len(after)]):
            chunk = [i for i in chunk if i not in done]
            if chunk:
                done.update(chunk)
                yield "next photos", chunk
        last = None
        while True:
            page = photos.page(self.engine, after=last, limit=QUEUE_PAGE, unreviewed_only=True)
            if not page:
                break
            rest = [i for i in page if i not in done]
            if rest:
                yield "review queue", rest
            last = page[-1]
        yield "all photos", None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background job ends or ``timeout`` s pass; ``True`` when it has ended."""
        return self._background.wait(timeout)

    def stop(self) -> None:
        """Ask the background job to stop after its current batch (scheduled requests are dropped)."""
        self._watch_stop.set()
        with self._schedule_lock:
            self._pending.clear()
            self._background.stop()
            self._pass_stop.set()

    # ---- versions activated by another process (issue 12)
    def active_version_ids(self) -> tuple[int | None, int | None]:
        """``(stage-1 head version id, active VLM adapter version id)`` active in the database now
        (``None``: none active); two indexed reads of ``adapters``."""
        with Session(self.engine) as s:
            head = active_adapter_version(s, self.registry.stage1_backbone().base_model)
            adapter = active_adapter_version(s, self.registry.base_model())
        return (head.id if head else None, adapter.id if adapter else None)

    def watch_versions(self, interval_s: float = 5.0) -> threading.Thread:
        """Start a daemon thread that reads :meth:`active_version_ids` every ``interval_s``
        seconds (> 0) and calls :meth:`schedule_predictions` when they differ from those of the
        last check or schedule: a version promoted or rolled back by another process
        (``python -m catreview adapters ...``, another app on the same database). Ends with
        :meth:`stop`. A database error goes to the job log and the next check tries again.

        Raises:
            ValueError: ``interval_s`` is not positive.
        """
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        initial = self.active_version_ids()
        with self._schedule_lock:
            if self._seen_versions is None:
                self._seen_versions = initial

        def loop() -> None:
            while not self._watch_stop.wait(interval_s):
                try:
                    now = self.active_version_ids()
                except SQLAlchemyError as exc:  # the database is away for a moment: say so, check again later
                    self.job.log.append(f"checking the active versions failed ({type(exc).__name__}); retrying")
                    continue
                with self._schedule_lock:
                    changed = now != self._seen_versions
                if changed:
                    head, adapter = now
                    self.schedule_predictions(
                        f"active versions changed outside this app (stage-1 head #{head}, adapter #{adapter})"
                    )

        thread = threading.Thread(target=loop, name="catreview-watch-versions", daemon=True)
        thread.start()
        return thread

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
        view = photos.photo_view(self.engine, self.registry, image_id)
        self._last_viewed = image_id  # background predictions start from here
        return view

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
        blind: bool = False,
    ) -> Review:
        """Record a review (with the models' outputs at review time) and return it.

        Args:
            replaces: the review id the annotator was looking at (``None``: none); the default
                chains after the newest review (see :func:`catreview.data.reviews.record_review`).
            blind: the annotator chose with the model outputs hidden (stored on the review).

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
                blind=blind,
            )

    def overlap_item(self, image_id: int) -> OverlapItem | None:
        """The photo's row in the overlap round (``status`` open, agreed, disputed or
        adjudicated; ``k`` votes wanted), or ``None`` when it is not in one (a primary-key read)."""
        with Session(self.engine) as s:
            return s.get(OverlapItem, image_id)

    def review_label(self, review_id: int) -> str | None:
        """The label of review ``review_id`` (``None``: no such review; a primary-key read)."""
        with Session(self.engine) as s:
            row = s.get(Review, review_id)
            return None if row is None else row.label

    def save_decision(
        self,
        image_id: int,
        label: str,
        annotator: str,
        note: str | None = None,
        *,
        seen: int | Head | None = HEAD,
        blind: bool = False,
    ) -> Saved:
        """The Review tab's save: a blind vote when the photo is ``open`` in the overlap round
        (:func:`catreview.data.overlap.cast_vote`; annotators never see each other's votes),
        else a review replacing ``seen``, the review the annotator was shown (:meth:`review`).

        Raises:
            catreview.data.overlap.OverlapError: the photo is disputed (a reviewer adjudicates it).
            catreview.data.reviews.ReviewConflictError: someone reviewed the photo after ``seen``.
            catreview.data.reviews.ReviewError: as :meth:`review`; also an overlap vote refused.
        """
        item = self.overlap_item(image_id)
        if item is not None and item.status == "disputed":
            raise overlap.OverlapError(
                f"photo {image_id} is disputed in the overlap round: a reviewer adjudicates it (Team tab)"
            )
        if item is not None and item.status == "open":
            before = self.my_vote(image_id, annotator)
            with Session(self.engine) as s:
                vote = overlap.cast_vote(s, image_id, label, annotator, vocabulary=self.vocabulary, note=note)
            canonical = vote.review.label if vote.review is not None else self.vocabulary.canonical(label)
            return Saved(canonical, review=vote.review, vote=vote, previous_vote=before)
        review = self.review(image_id, label, annotator, note, replaces=seen, blind=blind)
        return Saved(review.label, review=review)

    def my_vote(self, image_id: int, annotator: str) -> str | None:
        """``annotator``'s overlap vote on the photo (its label), or ``None`` (a unique-key read)."""
        with Session(self.engine) as s:
            vote = overlap.my_vote(s, image_id, annotator)
            return None if vote is None else vote.label

    def withdraw_vote(self, image_id: int, annotator: str) -> str:
        """Withdraw ``annotator``'s vote on a photo still open in the round; returns its label.

        Raises:
            catreview.data.overlap.OverlapError: no such vote, or the photo is settled.
        """
        with Session(self.engine) as s:
            return overlap.withdraw_vote(s, image_id, annotator).label

    def next_for(self, kind: str, after: int | None, annotator: str) -> QueueItem | None:
        """The next photo of queue ``kind`` after ``after`` for ``annotator``: :data:`OVERLAP_QUEUE`
        serves the open overlap photos they have not voted on, any other kind is
        :meth:`next_in_queue`.

        Raises:
            ValueError: an unknown queue kind.
        """
        if kind != OVERLAP_QUEUE:
            return self.next_in_queue(kind, after)
        with Session(self.engine) as s:
            found = overlap.next_for(s, annotator, after)
        if found is None:
            return None
        return QueueItem(found, 0.0, "")  # the view says why (an open overlap photo)

    # ------------------------------------------------------------------ calibration, export, adapters
    def calibrate(self, *, actor: str) -> tuple[CalibrationReport, int | None]:
        """Fit and store the calibration on the reviewed photos (:func:`catreview.evaluate.store.fit_and_store`)
        and record who did (audit ``calibrate``, target ``calibration #N``).

        Returns ``(report, stored calibration id)``.

        Raises:
            ValueError: too few reviewed photos (``CalibrationError``) or invalid stored predictions
                (nothing recorded).
        """
        report, row_id = fit_and_store(self.settings, self.registry)
        self._audit(actor, AuditAction.CALIBRATE, f"calibration #{row_id}" if row_id is not None else "calibration")
        return report, row_id

    def routing(self) -> RoutingStats:
        """Photos routed to / past the VLM under the current threshold (:func:`catreview.query.photos.routing_stats`)."""
        return photos.routing_stats(self.engine, self.registry)

    def export(
        self, out_dir: Path, *, actor: str, progress: Callable[[int, int], None] | None = None, **options: Any
    ) -> tuple[ExportSummary, Path]:
        """Export the reviews as a curated dataset into ``out_dir`` (checked against the active VLM's
        processor), zip it and record who did (audit ``export``, target the folder's name);
        returns ``(summary, zip path)``. ``options`` are those of
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
        archive = zip_export(summary.out_dir)
        self._audit(actor, AuditAction.EXPORT, summary.out_dir.name, **summary.audit_detail())
        return summary, archive

    def export_preferences(self, path: Path, *, actor: str) -> PreferenceExport:
        """Write the Compare tab's blind preferences as DPO pairs (JSONL) to ``path``
        (:func:`catreview.export.preferences.export_preference_pairs`) and record who did
        (audit ``export``, target the file's name)."""
        from catreview.export.preferences import export_preference_pairs

        result = export_preference_pairs(self.engine, path)
        self._audit(actor, AuditAction.EXPORT, Path(path).name, kind="preferences", pairs=result.pairs)
        return result

    def adapter_versions(self) -> list[dict[str, Any]]:
        """The active base model's adapter versions as table rows (:func:`catreview.adapters.versions.version_rows`)."""
        return version_rows(self.engine, self.registry.base_model())

    def promote(self, adapter_id: int, *, actor: str) -> AdapterVersion:
        """Activate an adapter version by hand (no gate) and record who did: audit ``rollback``
        when it is older (a smaller id) than the version active before, else ``promote``; its
        predictions start in the background (:meth:`schedule_predictions`).

        Raises:
            catreview.adapters.versions.AdapterError: no such version, or its files are gone
                (nothing recorded).
        """
        with Session(self.engine) as s:
            row = s.get(AdapterVersion, adapter_id)
            before = active_adapter_version(s, row.base_model) if row is not None else None
        previous = before.id if before is not None else None
        row = activate(self.engine, adapter_id)
        action = AuditAction.ROLLBACK if previous is not None and adapter_id < previous else AuditAction.PROMOTE
        self._audit(actor, action, f"adapter #{row.id}", stage="vlm", base_model=row.base_model, previous=previous)
        self.schedule_predictions(f"adapter #{row.id} activated")
        return row

    def no_adapter(self, *, actor: str) -> None:
        """Deactivate every adapter of the active base model: the base model predicts alone
        (its missing predictions start in the background, :meth:`schedule_predictions`); records
        who did (audit ``no_version``)."""
        base = self.registry.base_model()
        with Session(self.engine) as s:
            before = active_adapter_version(s, base)
        deactivate(self.engine, base)
        previous = before.id if before is not None else None
        self._audit(actor, AuditAction.NO_VERSION, "no adapter", stage="vlm", base_model=base, previous=previous)
        self.schedule_predictions("no adapter")

    def evaluation(self) -> EvaluationReport:
        """Every stored model version scored on the held-out reviewed photos, the active versions
        marked (:func:`catreview.evaluate.report.evaluation_report`).

        Raises:
            ValueError: stored predictions that are not valid probabilities.
        """
        from catreview.heads.versions import stage1_training_hashes

        return evaluation_report(
            self.engine,
            self.settings,
            vocabulary=self.vocabulary,
            active=active_versions(self.registry),
            stage1_trained=stage1_training_hashes,
        )

    def compare_session(self) -> CompareSession:
        """A :class:`catreview.compare.session.CompareSession` on this app's models and database;
        it refuses to run while the background predictions hold the models."""
        return CompareSession(self.settings, self.registry, self.engine, self.vocabulary, busy=lambda: self.job.running)

    # ---- queues and verified counts (issue 13)
    def next_in_queue(self, kind: str, after: int | None = None) -> QueueItem | None:
        """The next photo without a human decision after photo ``after`` in queue ``kind``
        (wrapping), with its "why it is here" line, or ``None`` when the queue is empty
        (:func:`catreview.query.queues.next_in_queue`).

        Raises:
            ValueError: unknown ``kind`` (see :data:`catreview.query.queues.QUEUE_KINDS`).
        """
        return queues.next_in_queue(self.engine, kind, after)

    def queue_items(self, kind: str, limit: int, after: int | None = None) -> list[QueueItem]:
        """Up to ``limit`` photos of queue ``kind`` after photo ``after`` (:func:`catreview.query.queues.queue_items`).

        Raises:
            ValueError: unknown ``kind`` or ``limit`` out of 1..10000.
        """
        return queues.queue_items(self.engine, kind, limit=limit, after=after)

    def refresh_scores(self) -> int:
        """Rewrite the queue scores from the stored predictions of the active versions
        (:func:`catreview.query.queues.refresh_scores`); returns the rows written."""
        return queues.refresh_scores(self.engine, self.registry)

    def review_totals(self) -> Totals:
        """All running totals: decodable, failed, labelled (imported or human), human-verified
        (:func:`catreview.query.photos.review_totals`; one primary-key read)."""
        return photos.review_totals(self.engine)

    # ---- review tab: history, undo, jump (issue 13)
    def recent_decisions(self, annotator: str, limit: int = 10) -> list[Decision]:
        """The annotator's newest ``limit`` decisions, newest first (:func:`catreview.query.history.recent_decisions`).

        Raises:
            ValueError: ``limit`` < 1.
        """
        return history.recent_decisions(self.engine, annotator, limit)

    def undo_last(self, annotator: str) -> UndoResult:
        """Undo the annotator's last decision still in effect by a new review that restores the
        previous label (or no label) (:func:`catreview.query.history.undo_last`).

        Raises:
            catreview.data.reviews.ReviewError: no annotator, or nothing left to undo.
            catreview.data.reviews.ReviewConflictError: someone reviewed the photo meanwhile.
        """
        return history.undo_last(self.engine, annotator)

    def photo_history(self, image_id: int) -> list[HistoryEntry]:
        """Every review of the photo, oldest first (:func:`catreview.query.history.photo_history`)."""
        return history.photo_history(self.engine, image_id)

    def find_photo(self, text: str) -> int | None:
        """The photo id named by ``text`` (an id, ``#id``, a stored path or a file name), or ``None``
        (:func:`catreview.query.history.find_photo`)."""
        return history.find_photo(self.engine, text)

    # ---- grid and bulk (issue 13)
    @property
    def thumbs_dir(self) -> Path:
        """The folder of grid thumbnails (``data_dir/thumbs``, :mod:`catreview.query.thumbs`), served as static files."""
        return self.settings.data_dir / "thumbs"

    def grid_page(self, flt: Any, after: int | None = None, limit: int = 48) -> Any:
        """A page of the grid (:func:`catreview.query.grid.grid_page`; ``flt`` a
        :class:`~catreview.query.grid.GridFilter`).

        Raises:
            ValueError: a filter that cannot be served, or ``limit`` out of range.
        """
        from catreview.query.grid import grid_page

        return grid_page(self.engine, flt, after=after, limit=limit)

    def thumbnail(self, image_id: int, sha256: str, path: str) -> Path:
        """The cached thumbnail file of a grid photo (:func:`catreview.query.thumbs.thumbnail_file`).

        Raises:
            catreview.data.images.ImageDecodeError: the file is gone or cannot be decoded.
        """
        from catreview.query.thumbs import thumbnail_file

        return thumbnail_file(path, sha256, self.thumbs_dir)

    def bulk_review(
        self,
        image_ids: list[int],
        label: str,
        annotator: str,
        *,
        seen: dict[int, int | None] | None = None,
        note: str | None = None,
    ) -> list[Review]:
        """Give every photo in ``image_ids`` the label ``label``: one review each (source ``"grid"``,
        with the models' outputs at review time), one transaction per photo, in the given order.

        Args:
            seen: ``{image_id: review id the annotator saw}`` (:meth:`catreview.query.grid.GridPage.seen`);
                a photo whose newest review is another one by now is not saved but reported. Photos
                not in ``seen`` are chained after their newest review.

        Returns:
            The stored reviews, in ``image_ids`` order (duplicates ids are reviewed once).

        Raises:
            catreview.data.reviews.ReviewError: no annotator, an unknown label, or no photo given
                (nothing stored).
            catreview.query.grid.BulkReviewError: some photos were not saved (reviewed meanwhile,
                undecodable, unknown id); ``saved`` and ``failed`` say which, the others are stored.
        """
        from catreview.query.grid import BulkReviewError

        if not (annotator or "").strip():
            raise ReviewError("enter your annotator name before reviewing")
        if label not in self.vocabulary:
            raise ReviewError(f"unknown label {label!r}: pick one from the breed list")
        ids = list(dict.fromkeys(image_ids))
        if not ids:
            raise ReviewError("select at least one photo")
        seen = seen or {}
        saved: list[Review] = []
        failed: list[tuple[int, str]] = []
        for image_id in ids:
            try:
                snapshot = model_snapshot(photos.photo_view(self.engine, self.registry, image_id))
                with Session(self.engine) as s:
                    saved.append(
                        record_review(
                            s,
                            image_id,
                            label,
                            annotator,
                            vocabulary=self.vocabulary,
                            note=note,
                            source="grid",
                            model_snapshot=snapshot,
                            replaces=seen.get(image_id, HEAD),
                        )
                    )
            except ReviewError as exc:  # reviewed meanwhile (ReviewConflictError), undecodable, unknown id
                failed.append((image_id, str(exc)))
            except KeyError:  # the row went away between the view and the save
                failed.append((image_id, f"no photo with id {image_id}"))
        if failed:
            raise BulkReviewError(saved, failed)
        return saved

    # ---- label errors and duplicates (issue 13)
    def refresh_label_issues(self) -> LabelIssueRanking:
        """Rank every labelled photo by how likely its label is wrong (cleanlab on the active
        head's out-of-fold stage-1 probabilities, mixed with the VLM's) and store the flagged
        ones as the "likely label errors" queue (:func:`catreview.evaluate.label_errors.rank_label_issues`).

        Raises:
            catreview.evaluate.label_errors.LabelIssuesUnavailable: no stage-1 head trained yet.
        """
        return rank_label_issues(self.engine, self.registry, vocabulary=self.vocabulary)

    def duplicates_of(self, image_id: int) -> list[DuplicateMember]:
        """Other photos with the same or a near perceptual hash (:func:`catreview.evaluate.duplicates.duplicates_of`).

        Raises:
            ValueError: no photo with ``image_id``.
        """
        return duplicates.duplicates_of(self.engine, image_id)

    def duplicate_line(self, image_id: int) -> str:
        """The review view's duplicates line for the photo (``""`` when it has none;
        :func:`catreview.evaluate.duplicates.duplicate_line`), conflicts with its current label marked.

        Raises:
            ValueError: no photo with ``image_id``.
        """
        members = duplicates.duplicates_of(self.engine, image_id)
        if not members:
            return ""
        with Session(self.engine) as s:
            label = get_image(s, image_id).current_label
        return duplicates.duplicate_line(members, label)

    def backfill_phashes(self) -> tuple[int, list[tuple[str, str]]]:
        """Hash photos imported before perceptual hashes existed (:func:`catreview.data.phash.backfill_phashes`);
        returns ``(photos hashed, [(path, reason)] that no longer decode)``."""
        return backfill_phashes(self.engine)

    def conflicting_duplicates(self) -> list[DuplicateGroup]:
        """Duplicate groups whose photos carry different breed labels (:func:`catreview.evaluate.duplicates.conflicting_duplicates`)."""
        return duplicates.conflicting_duplicates(self.engine)

    # ------------------------------------------------------------------ reasoning
    def stream_reasoning(self, image_id: int, stop: threading.Event | None = None) -> Iterator[str]:
        """Yield the reasoning text as it grows; cached texts are yielded at once.

        Yields nothing when stage 1 has not run yet for this photo or routing skipped the VLM, and
        nothing (the VLM is neither loaded nor run) while the active VLM is an untrained built-in one.
        """
        v = self.view(image_id)
        if not v["stage1"] or (v["vlm"] or {}).get("skipped") or self.registry.untrained_reason() is not None:
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
