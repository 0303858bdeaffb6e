"""What the app and the CLI show for a photo, and which photo comes next.

The one place that answers the per-click questions: a photo's view (stored predictions + the
current blend + the latest review, as a :class:`PhotoView`), the photo before/after in review
order, the next photo without a human decision, a page of the list, counts and the photos that failed to
decode. Every per-click answer is a fixed number of indexed queries (primary key, the
prediction key's unique index, the partial indexes on ``images``, the stored running totals), so
it costs the same at 127,000 photos as at 300; whole-collection reads (:func:`iter_views`,
:func:`routing_stats`) stream in batches. The UI
(:class:`catreview.app.core.ReviewApp`), the CLI (``predictions --json``) and calibration read
photos only through here.

The fused distribution is derived, not stored: it is recomputed from the cached stage-1 and VLM
outputs with the current :class:`Blend` (the fitted calibration for these model versions when
one exists, else the configured weight and temperature 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypedDict

from sqlalchemy import and_, func, or_, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.data.counts import Totals, totals
from catreview.data.db import UNVERIFIED_WHERE, CalibrationRecord, ImageRecord, Prediction, Review, stored_id
from catreview.data.reviews import ReviewError, review_counts
from catreview.models.classifier import ClassifierNotTrainedError
from catreview.predict.fusion import fuse, should_route_to_vlm, top_label
from catreview.predict.runner import candidates_key, stage1_topk
from catreview.predict.temperature import scale_probabilities


class Stage1Entry(TypedDict):
    """One of stage 1's top-k: a breed and its probability in [0, 1]."""

    label: str
    probability: float


class VLMView(TypedDict, total=False):
    """The VLM's verdict on a photo's candidates, or ``{"skipped": True, "reason"}`` when routing
    skipped it. ``probabilities`` maps each candidate and ``"other"`` to [0, 1] (they sum to 1);
    ``reasoning`` is null until generated."""

    skipped: bool
    reason: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    reasoning: str | None
    model_version: str


class FusedView(TypedDict):
    """The blended prediction: top label, its probability, the whole distribution and where the
    blend came from (``"config"`` or ``"calibration #N"``)."""

    label: str
    probability: float
    probabilities: dict[str, float]
    blend: str


class ReviewView(TypedDict):
    """A photo's latest review; ``id`` its review id (what a save names as the review it
    replaces), ``time`` ISO 8601 (UTC)."""

    id: int
    label: str
    annotator: str
    time: str
    previous_label: str | None
    note: str | None
    source: str


class PhotoView(TypedDict):
    """One photo as shown by the UI and printed by ``predictions --json`` (one JSON object).

    ``stage1``/``vlm``/``fused``/``review`` are ``None`` until that part exists (no prediction
    yet, no review); ``error`` is the decode failure of a photo that could not be read.
    """

    id: int
    path: str
    sha256: str
    error: str | None
    stage1: list[Stage1Entry] | None
    stage1_model_version: str | None
    vlm: VLMView | None
    fused: FusedView | None
    review: ReviewView | None


@dataclass(frozen=True)
class Blend:
    """How the two stages are combined: the VLM's ``weight`` in [0, 1], per-stage temperatures
    and the temperature of the pooled distribution (all > 0; 1 = unchanged). ``source`` says
    where the values came from."""

    weight: float
    temperature_stage1: float = 1.0
    temperature_vlm: float = 1.0
    routing_threshold: float | None = None
    source: str = "config"
    temperature_fused: float = 1.0


def current_blend(session: Session, settings: Any, stage1_version: str, vlm_version: str) -> Blend:
    """The newest fitted calibration for this model-version pair, else the configured weight."""
    rec = session.exec(
        select(CalibrationRecord)
        .where(CalibrationRecord.stage1_version == stage1_version, CalibrationRecord.vlm_version == vlm_version)
        .order_by(CalibrationRecord.id.desc())  # type: ignore[union-attr]
    ).first()
    thr = settings.fusion.routing_threshold
    if rec is None:
        return Blend(settings.fusion.weight, routing_threshold=thr)
    return Blend(
        rec.weight,
        rec.temperature_stage1,
        rec.temperature_vlm,
        thr,
        source=f"calibration #{rec.id}",
        temperature_fused=rec.temperature_fused,
    )


def vlm_probs(payload: dict[str, Any]) -> dict[str, float]:
    """``{candidate or 'other': probability}`` of a stored VLM payload."""
    return {c: float(p) for c, p in zip(payload["candidates"], payload["probabilities"])}


def fuse_view(topk: list[tuple[str, float]], vlm: dict[str, float] | None, blend: Blend) -> dict[str, float]:
    """Temperature-scale both stages, blend (:func:`catreview.predict.fusion.fuse`), then scale the pool
    by ``blend.temperature_fused`` (see :func:`catreview.evaluate.calibration.calibrate`)."""
    s1 = scale_probabilities(dict(topk), blend.temperature_stage1)
    v = scale_probabilities(vlm, blend.temperature_vlm) if vlm is not None else None
    fused = fuse(s1, v, blend.weight)
    return fused if blend.temperature_fused == 1.0 else scale_probabilities(fused, blend.temperature_fused)


def image_view(
    image: ImageRecord,
    stage1: Prediction | None,
    vlm: Prediction | None,
    reasoning: Prediction | None,
    review: Review | None,
    blend: Blend,
) -> PhotoView:
    """One photo as a JSON-ready :class:`PhotoView` (the ``predictions --json`` line format).

    Keys: ``id, path, sha256, error`` (str or null), ``stage1`` (list of ``{label,
    probability}``, top-k, or null), ``stage1_model_version`` (str or null), ``vlm`` (``{label, confidence, probabilities: {candidate:
    p}, reasoning, model_version}``, ``{"skipped": true, ...}`` when routing skipped it, or
    null when not computed yet), ``fused`` (``{label, probability, probabilities}`` or null),
    ``review`` (latest: ``{label, annotator, time, previous_label, note}`` or null).
    """
    topk = stage1_topk(stage1) if stage1 is not None else None
    vlm_view: VLMView | None
    vlm_p = None
    if topk and not should_route_to_vlm(topk[0][1], blend.routing_threshold):
        reason = f"stage-1 top-1 probability {topk[0][1]:.3f} > routing threshold {blend.routing_threshold}"
        vlm_view = {"skipped": True, "reason": reason}
    elif vlm is not None:
        payload = vlm.payload
        vlm_p = vlm_probs(payload)
        vlm_view = {
            "skipped": False,
            "label": payload["label"],
            "confidence": payload["confidence"],
            "probabilities": vlm_p,
            "reasoning": reasoning.payload["text"] if reasoning is not None else None,
            "model_version": vlm.model_version,
        }
    else:
        vlm_view = None
    fused_view: FusedView | None = None
    if topk:
        fused = fuse_view(topk, vlm_p, blend)
        lab = top_label(fused)
        fused_view = {"label": lab, "probability": fused[lab], "probabilities": fused, "blend": blend.source}
    review_view: ReviewView | None = None
    if review is not None:
        review_view = {
            "id": int(review.id or 0),  # stored rows always have an id
            "label": review.label,
            "annotator": review.annotator,
            "time": review.created_at.isoformat(),
            "previous_label": review.previous_label,
            "note": review.note,
            "source": review.source,
        }
    return {
        "id": image.id,  # type: ignore[typeddict-item]  # stored rows always have an id
        "path": image.path,
        "sha256": image.sha256,
        "error": image.error,
        "stage1": [{"label": lab, "probability": p} for lab, p in topk] if topk else None,
        "stage1_model_version": stage1.model_version if stage1 is not None else None,
        "vlm": vlm_view,
        "fused": fused_view,
        "review": review_view,
    }


BATCH_SIZE = 500
"""Photos per query when views are streamed (one query each for images, predictions and reviews)."""


def _views_of(session: Session, images: list[ImageRecord], clf: Any, vlm: Any, blend: Blend) -> Iterator[PhotoView]:
    """Views of a batch of image rows: one indexed query for their predictions, one for their reviews."""
    if not images:
        return
    ids = [stored_id(img) for img in images]

    q = select(Prediction).where(
        col(Prediction.image_id).in_(ids),
        or_(
            and_(
                col(Prediction.kind) == "stage1",
                col(Prediction.model_id) == clf.model_id,
                col(Prediction.model_version) == clf.model_version,
            ),
            and_(
                col(Prediction.kind).in_(("vlm", "reasoning")),
                col(Prediction.model_id) == vlm.model_id,
                col(Prediction.model_version) == vlm.model_version,
            ),
        ),
    )
    s1: dict[int, Prediction] = {}
    verdicts: dict[tuple[int, str], Prediction] = {}
    reasons: dict[tuple[int, str], Prediction] = {}
    for p in session.exec(q):
        if p.kind == "stage1":
            s1[p.image_id] = p
        else:
            (verdicts if p.kind == "vlm" else reasons)[(p.image_id, p.input_key)] = p
    review_ids = [img.current_review_id for img in images if img.current_review_id is not None]
    reviews = (
        {r.image_id: r for r in session.exec(select(Review).where(col(Review.id).in_(review_ids)))}
        if review_ids
        else {}
    )
    for img, iid in zip(images, ids):
        p1 = s1.get(iid)
        key = candidates_key([lab for lab, _ in stage1_topk(p1)]) if p1 else ""
        yield image_view(img, p1, verdicts.get((iid, key)), reasons.get((iid, key)), reviews.get(iid), blend)


def iter_views(
    engine: Engine,
    registry: Any,
    *,
    vlm_name: str | None = None,
    image_ids: Iterable[int] | None = None,
    batch_size: int = BATCH_SIZE,
) -> Iterator[PhotoView]:
    """Views of all imported photos (failed ones included, with their error) by image id, or of
    ``image_ids`` (in id order; unknown ids are left out), streamed ``batch_size`` photos at a
    time: memory stays flat and each batch costs a fixed number of indexed queries."""
    clf = _stage1(registry)
    vlm = registry.vlm(vlm_name)
    with Session(engine) as session:
        blend = current_blend(session, registry.settings, clf.model_version, vlm.model_version)
        if image_ids is not None:
            wanted = sorted(set(image_ids))
            for i in range(0, len(wanted), batch_size):
                chunk = wanted[i : i + batch_size]
                q = select(ImageRecord).where(col(ImageRecord.id).in_(chunk)).order_by(col(ImageRecord.id))
                yield from _views_of(session, list(session.exec(q)), clf, vlm, blend)
            return
        last = 0
        while True:  # keyset pagination: WHERE id > last ORDER BY id LIMIT batch
            q = select(ImageRecord).where(col(ImageRecord.id) > last).order_by(col(ImageRecord.id)).limit(batch_size)
            batch = list(session.exec(q))
            if not batch:
                return
            yield from _views_of(session, batch, clf, vlm, blend)
            last = stored_id(batch[-1])


@dataclass(frozen=True)
class _NoModel:
    """Stands in for a stage-1 model that is not trained yet: it matches no stored prediction."""

    model_id: str = ""
    model_version: str = ""


def _stage1(registry: Any) -> Any:
    """``registry.classifier()``, or :class:`_NoModel` while the built-in backbone has no head
    (the view then has no stage-1 predictions; the Review tab says why)."""
    try:
        return registry.classifier()
    except ClassifierNotTrainedError:
        return _NoModel()


def photo_view(engine: Engine, registry: Any, image_id: int, *, vlm_name: str | None = None) -> PhotoView:
    """The :class:`PhotoView` of one photo: a primary-key read, one read of its predictions on the
    prediction key's index and the current review by id (cost independent of the collection size).

    Raises:
        catreview.data.reviews.ReviewError: no photo with ``image_id``.
    """
    clf = _stage1(registry)
    vlm = registry.vlm(vlm_name)
    with Session(engine) as session:
        img = session.get(ImageRecord, image_id)
        if img is None:
            raise ReviewError(f"no photo with id {image_id}")
        blend = current_blend(session, registry.settings, clf.model_version, vlm.model_version)
        return next(_views_of(session, [img], clf, vlm, blend))


def _decodable() -> Any:
    return col(ImageRecord.error).is_(None)


def first_photo(engine: Engine) -> int | None:
    """Id of the first decodable photo in review order (import order), or ``None`` if there is none."""
    with Session(engine) as s:
        return s.exec(select(ImageRecord.id).where(_decodable()).order_by(col(ImageRecord.id)).limit(1)).first()


def neighbour(engine: Engine, image_id: int | None, step: int) -> int | None:
    """The decodable photo ``step`` (+1 next, -1 previous) from ``image_id`` in review order.
    Past either end it stays at the last/first photo; ``image_id`` ``None`` gives the first photo;
    ``None`` when there are no photos. One or two indexed ``LIMIT 1`` queries.

    Raises:
        ValueError: ``step`` is not +1 or -1.
    """
    if step not in (1, -1):
        raise ValueError(f"step must be +1 or -1, not {step}")
    if image_id is None:
        return first_photo(engine)
    ident = col(ImageRecord.id)
    ok = select(ImageRecord.id).where(_decodable())
    with Session(engine) as s:
        if step > 0:
            found = s.exec(ok.where(ident > image_id).order_by(ident).limit(1)).first()
            edge = ok.order_by(ident.desc())
        else:
            found = s.exec(ok.where(ident < image_id).order_by(ident.desc()).limit(1)).first()
            edge = ok.order_by(ident)
        return found if found is not None else s.exec(edge.limit(1)).first()


def _unverified() -> Any:
    """Decodable and without a human decision (no label, or only an imported one): the condition
    of the partial index ``ix_images_unverified``, as literal SQL so that SQLite's planner matches
    it (a bound ``'import'`` would not)."""
    return text(UNVERIFIED_WHERE)


def next_unreviewed(engine: Engine, after: int | None = None) -> int | None:
    """Id of the first decodable photo without a human decision (no label, or only an imported,
    unverified one) after photo ``after`` (``None``: from the start), wrapping around to the
    start; ``None`` when every photo has a human decision. At most two ``LIMIT 1`` queries on the
    partial index ``ix_images_unverified``."""
    ident = col(ImageRecord.id)
    open_ = select(ImageRecord.id).where(_unverified())
    with Session(engine) as s:
        if after is not None:
            found = s.exec(open_.where(ident > after).order_by(ident).limit(1)).first()
            if found is not None:
                return found
        return s.exec(open_.order_by(ident).limit(1)).first()


def page(engine: Engine, *, after: int | None = None, limit: int = 100, unreviewed_only: bool = False) -> list[int]:
    """Ids of up to ``limit`` decodable photos after photo ``after`` in review order (keyset
    pagination: pass the last id of one page to get the next); ``unreviewed_only``: only photos
    without a human decision (as :func:`next_unreviewed`, index ``ix_images_unverified``).

    Raises:
        ValueError: ``limit`` is not in 1..10000.
    """
    if not 1 <= limit <= 10_000:
        raise ValueError(f"limit must be in 1..10000, not {limit}")
    ident = col(ImageRecord.id)
    q = select(ImageRecord.id).where(_unverified() if unreviewed_only else _decodable())
    if after is not None:
        q = q.where(ident > after)
    with Session(engine) as s:
        return [int(i) for i in s.exec(q.order_by(ident).limit(limit)) if i is not None]


def failed_images(engine: Engine, *, limit: int = 1000) -> list[tuple[str, str]]:
    """``(path, reason)`` of up to ``limit`` photos that could not be decoded, oldest first
    (served by the partial index ``ix_images_failed``)."""
    with Session(engine) as s:
        q = (
            select(ImageRecord.path, ImageRecord.error)
            .where(col(ImageRecord.error).is_not(None))
            .order_by(col(ImageRecord.id))
            .limit(limit)
        )
        return [(path, error or "") for path, error in s.exec(q)]


def counts(engine: Engine) -> tuple[int, int]:
    """``(reviewed, total)`` over photos that decoded (stored running totals: one primary-key read).
    ``reviewed`` counts imported labels too (what trains the stages); :func:`review_totals` also
    says how many of them a person verified."""
    with Session(engine) as s:
        return review_counts(s)


def review_totals(engine: Engine) -> Totals:
    """Every running total (:class:`catreview.data.counts.Totals`: decodable, failed, labelled,
    human-verified; ``.imported`` and ``.unverified`` derived), one primary-key read."""
    with Session(engine) as s:
        return totals(s)


def model_snapshot(view: PhotoView) -> dict[str, Any]:
    """What the models said about a photo, stored with each review (for exports and audits)."""
    vlm: VLMView = view.get("vlm") or {}
    fused = view.get("fused")
    return {
        "stage1": [[d["label"], d["probability"]] for d in (view.get("stage1") or [])],
        "vlm": vlm.get("probabilities"),
        "fused": {"label": fused["label"], "probability": fused["probability"]} if fused else None,
        "model_versions": {"stage1": view.get("stage1_model_version"), "vlm": vlm.get("model_version")},
    }


@dataclass(frozen=True)
class RoutingStats:
    """How many photos went to the VLM under the current routing threshold, and the VLM time
    that skipping saved (skipped photos x mean measured VLM seconds per photo)."""

    photos: int
    to_vlm: int
    skipped: int
    mean_vlm_seconds: float
    threshold: float | None

    @property
    def saved_seconds(self) -> float:
        """VLM seconds that routing saved (skipped photos x mean measured seconds per photo)."""
        return self.skipped * self.mean_vlm_seconds


def routing_stats(engine: Engine, registry: Any, *, vlm_name: str | None = None) -> RoutingStats:
    """Count photos routed to / past the VLM for the current models and threshold (stage-1 rows
    streamed in batches; the mean VLM time is one SQL ``AVG``)."""
    clf, vlm = registry.classifier(), registry.vlm(vlm_name)
    thr = registry.settings.fusion.routing_threshold
    photos_n = skipped = 0
    with Session(engine) as session:
        q = (
            select(Prediction)
            .where(
                Prediction.kind == "stage1",
                Prediction.model_id == clf.model_id,
                Prediction.model_version == clf.model_version,
            )
            .execution_options(yield_per=BATCH_SIZE)
        )
        for p in session.exec(q):
            photos_n += 1
            skipped += not should_route_to_vlm(stage1_topk(p)[0][1], thr)
        mean = session.exec(
            select(func.avg(Prediction.seconds)).where(
                Prediction.kind == "vlm",
                Prediction.model_id == vlm.model_id,
                Prediction.model_version == vlm.model_version,
            )
        ).one()
    return RoutingStats(photos_n, photos_n - skipped, skipped, float(mean or 0.0), thr)
