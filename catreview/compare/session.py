"""Two VLM profiles side by side: per photo, in aggregate over the reviewed photos, and blind.

No Gradio here: :mod:`catreview.app.ui.compare_tab` and ``python -m catreview compare``
(:mod:`catreview.cli.compare`) are thin layers over :class:`CompareSession`. Which photo a
request means (:meth:`CompareSession.pick_photo`), the refusal while the app's background
predictions hold the models (``busy``, :class:`~catreview.compare.errors.ModelsBusy`) and the
outcome of a blind choice (:meth:`CompareSession.try_record_preference`) are decided here, so the
tab only lays out and wires.

What is compared (two *profiles* of :attr:`Settings.vlm_profiles`, or two adapter versions of
one profile built by :func:`~catreview.compare.pairs.adapter_variant`):

* **Per photo** (:meth:`CompareSession.compare_photo`): stage-1 candidates, then for each side its
  verdict (probabilities over the candidates + ``"other"``), its streamed reasoning, latency and
  peak memory (:mod:`catreview.compare.memory`). Verdicts and reasoning go through the prediction
  cache of :mod:`catreview.predict.runner`, exactly like the rest of the tool: a cached output is
  shown at once with the latency measured when it was computed.
* **In aggregate** (:meth:`CompareSession.run_aggregate`, or
  :class:`catreview.app.compare_job.AggregateJob` in the background): the metrics of
  :mod:`catreview.compare.aggregate` over photos whose latest review is a breed. Routing is off:
  every reviewed photo gets both verdicts. The photos are read :data:`BATCH_SIZE` at a time
  (their rows, stage-1 and verdict predictions: one indexed query each per batch); between side
  A and side B only each photo's verdict label, confidence and seconds are kept.
* **Blind** (:func:`~catreview.compare.pairs.blind_swapped`, :meth:`CompareSession.record_preference`):
  the sides are shown as "Model 1"/"Model 2" in a per-photo order derived deterministically from
  ``(seed, image id, the two profile names)``; names, model ids, versions, latency and memory
  are left out of the blind display (:func:`catreview.app.presenters.compare.display_sides`)
  because each identifies a model. Choices are stored as described in :mod:`catreview.compare.blind`.

With ``one_at_a_time`` only the side being run is resident: every other VLM (the registry's and
this session's) is unloaded before a side loads.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.compare.aggregate import (
    CompareAggregate,
    PhotoOutcome,
    SideRun,
    aggregate_metrics,
    photo_outcomes,
    plural,
)
from catreview.compare.blind import CHOICES, BlindTrial, PreferenceResult, preference_refusal
from catreview.compare.errors import BUSY_PHOTO, CompareError, ModelsBusy
from catreview.compare.memory import MemoryMeter
from catreview.compare.pairs import PairChoice, adapter_variant, blind_swapped, default_pair
from catreview.compare.photo import PhotoComparison, PhotoPick, SideState
from catreview.config import Settings, VLMProfile
from catreview.data.db import ImageRecord, Preference, get_image
from catreview.data.labels import SPECIAL_LABELS, BreedVocabulary, is_breed
from catreview.models.vlm import prompts
from catreview.predict.runner import (
    PredictSummary,
    cached_predictions,
    candidates_key,
    run_stage1,
    run_vlm,
    stage1_topk,
    store_reasoning,
)

if TYPE_CHECKING:
    from catreview.models.registry import ModelRegistry
    from catreview.models.vlm.postclassifier import VLMPostClassifier

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: ``done`` of ``total`` items (photos) of ``stage``."""

BATCH_SIZE = 500
"""Photos per batch of an aggregate run (one query each for their rows and predictions)."""


class _Verdict(NamedTuple):
    """What an aggregate keeps of a side's verdict on a photo until the other side has run
    (the fields :func:`catreview.compare.aggregate.photo_outcomes` reads)."""

    payload: dict[str, Any]  # {"label", "confidence"}
    seconds: float


def _decodable() -> Any:
    return col(ImageRecord.error).is_(None)


def _breed_reviewed() -> Any:
    """Photos whose current review names a breed (the denormalised ``images.current_label``)."""
    return col(ImageRecord.current_review_id).is_not(None) & col(ImageRecord.current_label).not_in(SPECIAL_LABELS)


def _offset(progress: Progress | None, base: int, total: int) -> Progress | None:
    """``progress`` for one batch: the batch's own counts moved by ``base`` photos done before it, of ``total``."""
    if progress is None:
        return None
    report = progress
    return lambda stage, done, _total: report(stage, base + done, total)


def _batches(ids: Sequence[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), BATCH_SIZE):
        yield list(ids[start : start + BATCH_SIZE])


class CompareSession:
    """Everything the Compare tab and the CLI do, over one database and model registry.

    Models of configured profiles are the registry's instances (shared with the Review tab);
    adapter variants (:meth:`add_adapter_pair`) get their own. A lock lets one comparison run
    models at a time (per-photo or aggregate).

    Args:
        settings: the loaded settings (``compare_profiles``, ``classifier.top_k``).
        registry: the :class:`~catreview.models.registry.ModelRegistry`.
        engine: database engine.
        vocabulary: canonicalises verdict labels before they are compared with human labels.
        blind_seed: seed of :func:`~catreview.compare.pairs.blind_swapped`.
        busy: called before a run; ``True`` while another job (the app's background predictions)
            uses the models, and runs are then refused (:class:`~catreview.compare.errors.ModelsBusy`,
            :meth:`catreview.app.compare_job.AggregateJob.try_start`). ``None``: never busy (the CLI).
    """

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        engine: Engine,
        vocabulary: BreedVocabulary | None = None,
        *,
        blind_seed: int = 0,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.engine = engine
        self.vocabulary = vocabulary or BreedVocabulary.default()
        self.blind_seed = blind_seed
        self.busy: Callable[[], bool] = busy or (lambda: False)
        self.run_lock = threading.Lock()
        self._extra: dict[str, VLMProfile] = {}
        self._own: dict[str, VLMPostClassifier] = {}
        self._variant_base: dict[str, str] = {}  # adapter variant name -> its base profile's name
        self._trials: dict[str, BlindTrial] = {}
        self._lock = threading.Lock()

    # Profiles and models.

    def profiles(self) -> dict[str, VLMProfile]:
        """Configured profiles (registry order), then adapter variants added here."""
        return {**self.registry.profiles(), **self._extra}

    def default_pair(self) -> PairChoice:
        """:func:`catreview.compare.pairs.default_pair` over :meth:`profiles`."""
        return default_pair(self.settings.compare_profiles, list(self.profiles()))

    def add_adapter_pair(
        self, base_name: str, adapter_a: str | Path | None, adapter_b: str | Path | None
    ) -> tuple[str, str]:
        """Register two variants of profile ``base_name`` differing only by adapter folder.

        Returns:
            Their profile names (see :func:`catreview.compare.pairs.adapter_variant`).

        Raises:
            CompareError: unknown base profile, bad adapter folder, or both sides identical.
        """
        base = self.registry.profiles().get(base_name)
        if base is None:
            raise CompareError(f"no VLM profile named {base_name!r}; configured: {sorted(self.registry.profiles())}")
        (na, pa), (nb, pb) = adapter_variant(base_name, base, adapter_a), adapter_variant(base_name, base, adapter_b)
        if na == nb:
            raise CompareError("both sides would use the same adapter; choose two different adapter versions")
        with self._lock:
            self._extra[na], self._extra[nb] = pa, pb
            self._variant_base[na] = self._variant_base[nb] = base_name
        return na, nb

    def untrained_reason(self, name: str) -> str | None:
        """``None`` when profile ``name``'s verdicts mean something, else the plain line saying
        why not (:meth:`catreview.models.registry.ModelRegistry.untrained_reason`): a built-in
        pretrained FastVLM with no active adapter, or an adapter variant of one with no adapter
        (``"<base> (no adapter)"``), has a random image projector. Builds and loads nothing.

        Raises:
            catreview.models.registry.UnknownProfileError: no such profile.
        """
        if name not in self._extra:
            return self.registry.untrained_reason(name)
        base = self._variant_base[name]
        if self._extra[name].adapter is not None:
            return None
        if base in self.settings.vlm_profiles or self.settings.builtin_models == "random":
            return None  # a configured checkpoint (or the tiny demo model) without an adapter
        return (
            f"VLM not trained yet: {name!r} is the built-in profile {base!r} without an adapter, whose image "
            "projector is untrained, so its verdicts would mean nothing; choose a trained adapter version"
        )

    def check_trained(self, *names: str) -> None:
        """Refuse to compare a profile whose verdicts would mean nothing (:meth:`untrained_reason`).

        Raises:
            CompareError: ``"<reason>"`` for the first untrained one (unknown names too).
        """
        from catreview.models.registry import UnknownProfileError

        for name in names:
            try:
                reason = self.untrained_reason(name)
            except UnknownProfileError as exc:
                raise CompareError(f"no VLM profile named {name!r}; available: {list(self.profiles())}") from exc
            if reason is not None:
                raise CompareError(reason)

    def vlm(self, name: str) -> VLMPostClassifier:
        """The VLM of profile ``name`` (lazily loaded).

        Raises:
            CompareError: no such profile.
        """
        from catreview.models.vlm.postclassifier import VLMPostClassifier

        if name in self._extra:
            with self._lock:
                if name not in self._own:
                    self._own[name] = VLMPostClassifier(self._extra[name], name=name)
                return self._own[name]
        try:
            return self.registry.vlm(name)
        except KeyError as exc:
            raise CompareError(f"no VLM profile named {name!r}; available: {list(self.profiles())}") from exc

    def keep_only_resident(self, name: str) -> None:
        """Unload every VLM except ``name``'s: the registry's and this session's own."""
        self.registry.unload_vlms(keep=name)
        for other, vlm in list(self._own.items()):
            if other != name:
                vlm.unload()

    def _prepare_model(self, name: str, one_at_a_time: bool) -> tuple[VLMPostClassifier, float | None]:
        """The loaded VLM and its load time (``None`` when it was already loaded)."""
        vlm = self.vlm(name)
        if one_at_a_time:
            self.keep_only_resident(name)
        if vlm.loaded:
            return vlm, None
        t0 = time.perf_counter()
        vlm.load()
        return vlm, time.perf_counter() - t0

    # Photos.

    @staticmethod
    def _human_labels(session: Session) -> dict[int, str]:
        q = select(col(ImageRecord.id), col(ImageRecord.current_label)).where(_breed_reviewed())
        return {int(i): str(label) for i, label in session.exec(q) if i is not None}

    @staticmethod
    def _human_label(session: Session, image_id: int) -> str | None:
        label = session.exec(select(ImageRecord.current_label).where(ImageRecord.id == image_id)).first()
        return label if is_breed(label) else None

    def human_labels(self) -> dict[int, str]:
        """``{image id: breed}`` of photos whose latest review is a breed (one query on ``images``)."""
        with Session(self.engine) as s:
            return self._human_labels(s)

    @staticmethod
    def _photo_ids(session: Session) -> list[int]:
        q = select(col(ImageRecord.id)).where(_decodable()).order_by(col(ImageRecord.id))
        return [i for i in session.exec(q) if i is not None]

    def photo_ids(self) -> list[int]:
        """Ids of the decodable photos, in import order (the positions the tab steps through;
        the same list as :meth:`catreview.app.core.ReviewApp.image_ids`)."""
        with Session(self.engine) as s:
            return self._photo_ids(s)

    def reviewed_image_ids(self) -> list[int]:
        """Decodable photos whose latest review is a breed, by id."""
        with Session(self.engine) as s:
            q = select(col(ImageRecord.id)).where(_decodable(), _breed_reviewed()).order_by(col(ImageRecord.id))
            return [i for i in s.exec(q) if i is not None]

    @staticmethod
    def _count(session: Session, *where: Any) -> int:
        return int(session.exec(select(func.count()).select_from(ImageRecord).where(_decodable(), *where)).one())

    def _pick(self, session: Session, image_id: int) -> PhotoPick | None:
        """The pick of a decodable photo by id (its position: the decodable photos before it), or ``None``."""
        if session.exec(select(ImageRecord.id).where(ImageRecord.id == image_id, _decodable())).first() is None:
            return None
        return PhotoPick(self._count(session, col(ImageRecord.id) < image_id), image_id, self._count(session))

    def pick_photo(self, image_id: float | None, position: int | None = 0) -> PhotoPick:
        """The photo a request means: ``image_id`` when given (not ``None`` or 0), else the photo
        at ``position`` (clamped to the photo list; ``None`` counts as 0). Indexed queries (a
        count and an offset on the decodable photos), no list of all photos.

        Raises:
            CompareError: no photos yet (``"No photos yet."``), or no decodable photo with
                ``image_id`` (``"No photo with id 7."``).
        """
        with Session(self.engine) as s:
            if not image_id:
                total = self._count(s)
                if not total:
                    raise CompareError("No photos yet.")
                pos = max(0, min(int(position or 0), total - 1))
                q = select(ImageRecord.id).where(_decodable()).order_by(col(ImageRecord.id)).offset(pos).limit(1)
                return PhotoPick(pos, int(s.exec(q).one() or 0), total)
            pick = self._pick(s, int(image_id))
        if pick is None:
            raise CompareError(f"No photo with id {int(image_id)}.")
        return pick

    def typed_photo(self, image_id: float | None) -> PhotoPick:
        """The photo whose id was typed (no fallback to a position).

        Raises:
            CompareError: no id (``"Type a photo id first (ids run from 1 to 9)."``) or an
                unknown one (``"No photo with id 99 (ids run from 1 to 9)."``; "no photos are
                imported yet" instead of the range when there are none).
        """
        with Session(self.engine) as s:
            low, high = s.exec(select(func.min(ImageRecord.id), func.max(ImageRecord.id)).where(_decodable())).one()
            pick = self._pick(s, int(image_id)) if image_id is not None else None
        span = f"ids run from {low} to {high}" if low is not None else "no photos are imported yet"
        if image_id is None:
            raise CompareError(f"Type a photo id first ({span}).")
        if pick is None:
            raise CompareError(f"No photo with id {int(image_id)} ({span}).")
        return pick

    def first_reviewed_position(self) -> int:
        """Position (in :meth:`photo_ids`) of the first photo whose latest review is a breed;
        0 when none is."""
        with Session(self.engine) as s:
            first = s.exec(select(func.min(ImageRecord.id)).where(_decodable(), _breed_reviewed())).one()
            return self._count(s, col(ImageRecord.id) < first) if first is not None else 0

    def photo_notice(self, pick: PhotoPick) -> str:
        """Markdown under a photo before it is compared: where it is, its human label, what to do.

        E.g. ``"Photo 3 of 4 (id 7; 1 reviewed photo in all) · human label: **Sphynx**. Press
        **Compare this photo** to run both models on it."``
        """
        with Session(self.engine) as s:
            n = int(s.exec(select(func.count()).select_from(ImageRecord).where(_breed_reviewed())).one())
            label = self._human_label(s, pick.image_id)
        return (
            f"Photo {pick.position + 1} of {pick.total} (id {pick.image_id}; {plural(n, 'reviewed photo')} in all) · "
            + (f"human label: **{label}**" if label else "not reviewed yet")
            + ". Press **Compare this photo** to run both models on it."
        )

    def canonical(self, label: str) -> str:
        """``label`` as a canonical class name when the vocabulary knows it, else unchanged."""
        return self.vocabulary.canonical(label) if label != prompts.OTHER_LABEL and label in self.vocabulary else label

    def _stage1(self, session: Session, rec: ImageRecord) -> list[tuple[str, float]]:
        """Stage-1 top-k of one photo (cached or computed and stored)."""
        topk = run_stage1(
            session, self.registry.classifier(), [rec], PredictSummary(), top_k=self.settings.classifier.top_k
        )
        if rec.id not in topk:
            raise CompareError(f"stage 1 could not run on photo #{rec.id} ({rec.path})")
        return topk[rec.id]

    # Per photo.

    def compare_photo(
        self,
        image_id: int,
        name_a: str,
        name_b: str,
        *,
        blind: bool = False,
        one_at_a_time: bool = False,
        stop: threading.Event | None = None,
    ) -> Generator[PhotoComparison, None, None]:
        """Compare the two profiles on one photo, yielding the state after every change.

        Sides run one after the other (A then B; in blind mode in display order), so their
        latencies do not compete for the same cores. Cached verdicts and reasoning are reused;
        new ones are stored. Errors of one side (e.g. out of memory) are shown on that side.
        ``stop`` ends the running generation; a stopped reasoning is not stored.

        Raises:
            ModelsBusy: ``busy()`` is true (nothing is run; raised on the first ``next``).
            CompareError: unknown profile or photo, an untrained built-in profile
                (:meth:`check_trained`), or stage 1 failed on the photo.
        """
        if self.busy():
            raise ModelsBusy(BUSY_PHOTO)
        self.check_trained(name_a, name_b)
        stop = stop or threading.Event()
        with Session(self.engine) as s:
            try:
                rec = get_image(s, image_id)
            except KeyError as exc:
                raise CompareError(str(exc)) from exc
            if rec.error is not None:
                raise CompareError(f"photo #{image_id} could not be decoded: {rec.error}")
            topk = self._stage1(s, rec)
            human = self._human_label(s, image_id)
        candidates = [lab for lab, _ in topk]
        vlms = (self.vlm(name_a), self.vlm(name_b))
        comp = PhotoComparison(
            image_id=image_id,
            candidates=candidates,
            prompt=prompts.reasoning_text(prompts.with_other(candidates)),
            sides=(
                SideState(name_a, vlms[0].model_id, vlms[0].model_version),
                SideState(name_b, vlms[1].model_id, vlms[1].model_version),
            ),
            blind=blind,
            swapped=blind_swapped(image_id, name_a, name_b, self.blind_seed),
            one_at_a_time=one_at_a_time,
            human_label=human,
        )
        yield comp
        for side in comp.displayed():
            if stop.is_set():
                side.status = "stopped"
                continue
            yield from self._run_side(rec, topk, comp, side, one_at_a_time, stop)
        if comp.blind and comp.finished:
            comp.preference_refused = preference_refusal([(s.label, s.reasoning) for s in comp.displayed()])
            if comp.preference_refused is None:
                comp.trial_id = self._new_trial(comp)
        yield comp

    def _run_side(
        self,
        rec: ImageRecord,
        topk: list[tuple[str, float]],
        comp: PhotoComparison,
        side: SideState,
        one_at_a_time: bool,
        stop: threading.Event,
    ) -> Iterator[PhotoComparison]:
        """Verdict, then reasoning, of one side (cached where possible), under the run lock."""
        vlm = self.vlm(side.name)
        key = candidates_key(comp.candidates)
        if not self.run_lock.acquire(blocking=False):
            side.status = "waiting for another comparison to finish"
            yield comp
            self.run_lock.acquire()
        try:
            try:
                with Session(self.engine) as s:
                    ids = [comp.image_id]
                    verdict = cached_predictions(s, "vlm", vlm.model_id, vlm.model_version, ids).get((ids[0], key))
                    reasoning = cached_predictions(s, "reasoning", vlm.model_id, vlm.model_version, ids).get(
                        (ids[0], key)
                    )
                if verdict is not None:
                    side.verdict, side.verdict_seconds, side.verdict_cached = verdict.payload, verdict.seconds, True
                if reasoning is not None:
                    side.reasoning, side.reasoning_seconds, side.reasoning_cached = (
                        reasoning.payload["text"],
                        reasoning.seconds,
                        True,
                    )
                if verdict is None or reasoning is None:
                    side.status = "loading"
                    yield comp
                    vlm, side.load_seconds = self._prepare_model(side.name, one_at_a_time)
                    with MemoryMeter(vlm.device) as meter:
                        if verdict is None:
                            side.status = "scoring"
                            yield comp
                            side.verdict, side.verdict_seconds = self._score(rec, topk, vlm)
                        if reasoning is None:
                            side.status = "reasoning"
                            yield from self._stream(rec, comp, side, vlm, stop)
                    side.memory = meter.reading(vlm.model)
                side.status = "stopped" if stop.is_set() and not side.reasoning_cached else "done"
            except Exception as exc:  # one side's failure (OOM, bad adapter) is shown on that side and logged
                side.status, side.error = "error", f"{type(exc).__name__}: {exc}"
                log.exception("comparison side %r failed on photo %s", side.name, rec.id)
        finally:
            self.run_lock.release()
        yield comp

    def _score(
        self, rec: ImageRecord, topk: list[tuple[str, float]], vlm: VLMPostClassifier
    ) -> tuple[dict[str, Any], float]:
        """Verdict via :func:`catreview.predict.runner.run_vlm` (stored in the cache); ``(payload, s)``."""
        with Session(self.engine) as s:
            pred = run_vlm(s, vlm, [rec], {rec.id: topk}, PredictSummary(), routing_threshold=None)[rec.id]  # type: ignore[dict-item, index]
            return pred.payload, pred.seconds

    def _stream(
        self, rec: ImageRecord, comp: PhotoComparison, side: SideState, vlm: VLMPostClassifier, stop: threading.Event
    ) -> Iterator[PhotoComparison]:
        from catreview.data.images import load_rgb

        t0 = time.perf_counter()
        for text in vlm.stream_reasoning(load_rgb(rec.path), comp.candidates, stop_event=stop):
            side.reasoning = text
            yield comp
        side.reasoning_seconds = time.perf_counter() - t0
        if not stop.is_set():
            with Session(self.engine) as s:
                store_reasoning(s, vlm, comp.image_id, comp.candidates, side.reasoning, side.reasoning_seconds)

    # Blind preferences.

    def _new_trial(self, comp: PhotoComparison) -> str:
        first, second = comp.displayed()
        shown = ((first.label, first.reasoning), (second.label, second.reasoning))
        trial_id = uuid.uuid4().hex
        with self._lock:
            if len(self._trials) > 10_000:  # bounded: drop the oldest
                self._trials.pop(next(iter(self._trials)))
            self._trials[trial_id] = BlindTrial(comp.image_id, comp.prompt, shown)
        return trial_id

    def record_preference(self, trial_id: str, choice: str, annotator: str) -> Preference:
        """Store the annotator's choice for a finished blind comparison.

        Args:
            trial_id: :attr:`PhotoComparison.trial_id`.
            choice: ``"1"`` (Model 1 better), ``"2"``, or ``"tie"``.
            annotator: who chose (non-empty).

        Returns:
            The stored :class:`~catreview.data.db.Preference` (``model_a`` = shown as Model 1,
            ``choice`` a/b/tie).

        Raises:
            CompareError: unknown trial (none finished in blind mode), bad choice, no annotator,
                or a pair with nothing to choose between (:func:`catreview.compare.blind.preference_refusal`).
        """
        annotator = (annotator or "").strip()
        if not annotator:
            raise CompareError("enter your annotator name before choosing")
        if choice not in CHOICES:
            raise CompareError(f"choice must be one of {CHOICES}, not {choice!r}")
        trial = self._trials.get(trial_id or "")
        if trial is None:
            raise CompareError("no finished blind comparison to judge: tick 'Blind mode' and run the comparison first")
        refused = preference_refusal(trial.shown)
        if refused:
            raise CompareError(f"no preference recorded: {refused}")
        (model_1, out_1), (model_2, out_2) = trial.shown
        pref = Preference(
            image_id=trial.image_id,
            annotator=annotator,
            model_a=model_1,
            model_b=model_2,
            output_a=out_1,
            output_b=out_2,
            prompt=trial.prompt,
            choice={"1": "a", "2": "b", "tie": "tie"}[choice],
        )
        with Session(self.engine) as s:
            s.add(pref)
            s.commit()
            s.refresh(pref)
        return pref

    def try_record_preference(self, trial_id: str, choice: str, annotator: str) -> PreferenceResult:
        """:meth:`record_preference`, with a refusal returned instead of raised (what the tab's
        buttons and the ``compare_prefer`` API show: :meth:`~catreview.compare.blind.PreferenceResult.text`,
        :meth:`~catreview.compare.blind.PreferenceResult.api_text`)."""
        try:
            return PreferenceResult(preference=self.record_preference(trial_id, choice, annotator))
        except CompareError as exc:
            return PreferenceResult(error=str(exc))

    # Aggregate.

    @staticmethod
    def _images(session: Session, ids: Sequence[int]) -> list[ImageRecord]:
        """The rows of ``ids`` (one batch), by id, detached from ``session`` so that the commits
        of the prediction runner do not expire them (no reload per photo)."""
        rows = list(session.exec(select(ImageRecord).where(col(ImageRecord.id).in_(ids)).order_by(col(ImageRecord.id))))
        for row in rows:
            session.expunge(row)
        return rows

    def _cached_topk(self, session: Session, ids: Sequence[int]) -> dict[int, list[tuple[str, float]]]:
        """Stored stage-1 top-k of ``ids`` (those with the configured ``top_k``; nothing is computed)."""
        clf = self.registry.classifier()
        k = min(self.settings.classifier.top_k, len(clf.labels))
        cache = cached_predictions(session, "stage1", clf.model_id, clf.model_version, ids)
        return {i: stage1_topk(p) for (i, _), p in cache.items() if len(p.payload["topk"]) == k}

    @staticmethod
    def _missing_verdicts(
        session: Session,
        vlm: VLMPostClassifier,
        images: Sequence[ImageRecord],
        topk: dict[int, list[tuple[str, float]]],
    ) -> int:
        have = cached_predictions(session, "vlm", vlm.model_id, vlm.model_version, [i.id for i in images])  # type: ignore[misc]
        return sum(1 for r in images if r.id in topk and (r.id, candidates_key([c for c, _ in topk[r.id]])) not in have)

    def _stage1_pass(
        self, ids: Sequence[int], summary: PredictSummary, progress: Progress | None, stop: threading.Event | None
    ) -> None:
        """Stage 1 on every photo of ``ids`` (cached rows reused, missing ones computed and stored), a batch at a time."""
        done = 0
        for batch in _batches(ids):
            with Session(self.engine) as s:
                run_stage1(
                    s,
                    self.registry.classifier(),
                    self._images(s, batch),
                    summary,
                    top_k=self.settings.classifier.top_k,
                    progress=_offset(progress, done, len(ids)),
                    stop=stop,
                )
            done += len(batch)
            if progress:
                progress("stage 1", done, len(ids))

    def _aggregate_side(
        self,
        name: str,
        ids: Sequence[int],
        one_at_a_time: bool,
        progress: Progress | None,
        stop: threading.Event | None,
        on_batch: Callable[[list[ImageRecord], dict[int, list[tuple[str, float]]], dict[int, Any]], None],
    ) -> tuple[SideRun, bool]:
        """One side's verdicts on ``ids``, a batch at a time; ``on_batch(images, topk, verdicts)``
        sees each batch. The model is loaded (and its memory measured) only if a verdict is
        missing and the run is not stopped."""
        vlm = self.vlm(name)
        summary = PredictSummary()
        load_s = memory = None
        meter: MemoryMeter | None = None
        done = 0
        with ExitStack() as stack:
            for batch in _batches(ids):
                with Session(self.engine) as s:
                    images = self._images(s, batch)
                    topk = self._cached_topk(s, batch)
                    stopped = stop is not None and stop.is_set()
                    if meter is None and not stopped and self._missing_verdicts(s, vlm, images, topk):
                        vlm, load_s = self._prepare_model(name, one_at_a_time)
                        meter = stack.enter_context(MemoryMeter(vlm.device))
                    preds = run_vlm(
                        s,
                        vlm,
                        images,
                        topk,
                        summary,
                        routing_threshold=None,
                        progress=_offset(progress, done, len(ids)),
                        stop=stop,
                    )
                    on_batch(images, topk, preds)
                done += len(batch)
                if progress:
                    progress("", done, len(ids))
        if meter is not None:
            memory = meter.reading(vlm.model)
        run = SideRun(
            name,
            vlm.model_id,
            vlm.model_version,
            summary.vlm_computed,
            summary.vlm_cached,
            summary.vlm_seconds,
            load_s,
            memory,
        )
        return run, summary.cancelled

    def run_aggregate(
        self,
        name_a: str,
        name_b: str,
        *,
        one_at_a_time: bool = False,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> CompareAggregate:
        """Both profiles' verdicts on every reviewed photo (breed labels), and their metrics.

        Stage 1 and verdicts come from the prediction cache when present and are stored when
        computed, so a second run computes nothing. Stage 1 runs on every photo first, then side
        A, then side B, each :data:`BATCH_SIZE` photos at a time. ``progress(stage, done, total)``
        counts photos of the whole run and is called per batch; ``stop`` ends the computing after
        the current batch (metrics then cover the photos done, the others are listed as skipped,
        ``cancelled`` is set).

        Raises:
            CompareError: unknown profile, an untrained built-in profile (:meth:`check_trained`),
                or no reviewed photo has both verdicts.
        """
        self.check_trained(name_a, name_b)  # an untrained built-in profile is refused, not compared
        for n in (name_a, name_b):
            self.vlm(n)  # unknown names fail before any work
        with self.run_lock:
            with Session(self.engine) as s:
                q = (
                    select(col(ImageRecord.id), col(ImageRecord.sha256), col(ImageRecord.current_label))
                    .where(_decodable(), _breed_reviewed())
                    .order_by(col(ImageRecord.id))
                )
                photos = [(int(i), sha, str(label)) for i, sha, label in s.exec(q) if i is not None]
                photos, notes = self._leave_out_trained(s, photos, (name_a, name_b))
            if not photos:
                raise CompareError(
                    "no reviewed photos with a breed label yet: review some photos (or import labels) first"
                    + (f" ({' '.join(notes)})" if notes else "")
                )
            human = {i: label for i, _, label in photos}
            ids = [i for i, _, _ in photos]
            summary = PredictSummary()
            self._stage1_pass(ids, summary, progress, stop)

            def side_progress(tag: str) -> Progress | None:
                return (lambda _st, d, t: progress(f"VLM {tag}", d, t)) if progress else None

            verdicts_a: dict[int, _Verdict] = {}

            def keep_a(_images: list[ImageRecord], _topk: dict[int, Any], preds: dict[int, Any]) -> None:
                for i, p in preds.items():
                    verdicts_a[i] = _Verdict({k: p.payload[k] for k in ("label", "confidence")}, p.seconds)

            outcomes: list[PhotoOutcome] = []
            skipped: list[tuple[int, str]] = []

            def join_b(images: list[ImageRecord], topk: dict[int, Any], preds: dict[int, Any]) -> None:
                mine = {r.id: verdicts_a[r.id] for r in images if r.id in verdicts_a}
                got, missed = photo_outcomes(images, human, topk, mine, preds, self.canonical)
                outcomes.extend(got)
                skipped.extend(missed)

            run_a, cancel_a = self._aggregate_side(
                name_a, ids, one_at_a_time, side_progress(f"A ({name_a})"), stop, keep_a
            )
            run_b, cancel_b = self._aggregate_side(
                name_b, ids, one_at_a_time, side_progress(f"B ({name_b})"), stop, join_b
            )
        cancelled = summary.cancelled or cancel_a or cancel_b
        return CompareAggregate(run_a, run_b, outcomes, aggregate_metrics(outcomes), skipped, cancelled, notes)

    def _leave_out_trained(
        self, session: Session, photos: list[tuple[int, str, str]], names: Sequence[str]
    ) -> tuple[list[tuple[int, str, str]], list[str]]:
        """``photos`` (``(id, sha256, label)``) without those either side's adapter was trained on
        (:func:`catreview.adapters.versions.training_photo_hashes`), and notes saying what was left out."""
        from catreview.adapters.versions import training_photo_hashes

        trained: set[str] = set()
        notes = []
        for name in names:
            adapter = self.vlm(name).profile.adapter
            hashes = training_photo_hashes(session, adapter)
            if hashes is None:
                notes.append(
                    f"{name}: adapter {adapter} is not a version of this database; the photos it was "
                    "trained on cannot be left out, so its numbers may be optimistic."
                )
            else:
                trained |= hashes
        kept = [p for p in photos if p[1] not in trained]
        if len(kept) < len(photos):
            notes.insert(
                0,
                f"Left out {plural(len(photos) - len(kept), 'reviewed photo')} of the train split an adapter "
                "was trained on (not a fair test of it).",
            )
        return kept, notes


__all__ = ["CompareSession", "Progress"]
