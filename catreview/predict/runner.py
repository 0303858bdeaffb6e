"""Running both stages over imported photos and caching every output in the database.

Cache keys (table ``predictions``, constraint ``uq_prediction_key``): stage 1 by (image,
classifier id, checkpoint digest); VLM verdicts and reasoning by (image, VLM profile's model id,
``model_version`` = weights + adapter + prompt version, candidate list). Re-running, reopening a
photo or restarting recomputes nothing; changing any part of a key recomputes only what it changes.

Over the whole collection (:func:`run_predictions`) each pass first lists what is missing for the
current model versions, reading the tables in pages in id order (never every prediction row at
once), then computes it in batches: stage 1 through a ``torch.utils.data.DataLoader`` whose
workers decode and transform (:mod:`catreview.predict.loader`), the VLM verdicts and reasoning
texts batched likewise. Every batch is written (and committed) as soon as it is computed, with
``INSERT ... ON CONFLICT DO NOTHING`` (:func:`catreview.data.db.insert_ignoring_conflicts`), so a
stopped or killed run resumes where it stopped, and another process storing the same key (the app
and a CLI run, or two ``accelerate launch`` processes) is harmless: both computed the same output
and the first row stays.

Data parallel: a :class:`Shard` (under ``accelerate launch``, one per process: the ``predict``
command builds it from ``accelerate.PartialState``) restricts every pass to the photos whose id
falls in it, so each process computes and writes its own rows.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, and_, cast, func, or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from catreview.data.db import ImageRecord, Prediction, insert_ignoring_conflicts, stored_id, utcnow
from catreview.models.classifier import ClassifierNotTrainedError, Stage1Classifier
from catreview.predict.fusion import should_route_to_vlm
from catreview.predict.loader import PhotoBatch, PhotoItem, default_workers, photo_loader

Progress = Callable[[str, int, int], None]  # (stage, done, total)

#: The columns of the ``uq_prediction_key`` constraint (the cache key of a prediction row).
PREDICTION_KEY = ["image_id", "kind", "model_id", "model_version", "input_key"]
#: Rows read per query when listing what is missing (keyset pages by image id).
PAGE_SIZE = 2000
#: Fewest photos in a pass for which DataLoader workers start when their number is not given:
#: a spawned worker imports torch and timm first (seconds on a busy 2-core machine), which only
#: pays off over a few hundred photos (decoding one takes ~5-10 ms).
AUTO_WORKERS_MIN_PHOTOS = 512
#: Ids per ``IN (...)`` list (below SQLite's default limit of 32766 bound variables).
IN_CHUNK = 10_000


@dataclass
class PredictSummary:
    """Counts and timings of one prediction run (seconds are wall time of each pass)."""

    images: int = 0
    stage1_computed: int = 0
    stage1_cached: int = 0
    vlm_computed: int = 0
    vlm_cached: int = 0
    vlm_skipped: int = 0
    reasoning_computed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    #: Why stage 1 (and so the VLM, which needs its candidates) did not run, for people
    #: (``"No stage-1 model trained yet: ..."``); ``None`` when it ran.
    stage1_skipped: str | None = None
    stage1_seconds: float = 0.0
    vlm_seconds: float = 0.0
    reasoning_seconds: float = 0.0
    cancelled: bool = False
    #: Why the VLM passes did not run at all (``"VLM not trained yet: ..."``,
    #: :meth:`catreview.models.registry.ModelRegistry.untrained_reason`), else ``None``.
    vlm_not_run: str | None = None

    def lines(self) -> list[str]:
        if self.stage1_skipped is not None:
            return [f"{self.images} photos; {self.stage1_skipped}"]
        out = [
            f"{self.images} photos; stage 1: {self.stage1_computed} computed ({self.stage1_seconds:.1f} s), "
            f"{self.stage1_cached} cached",
            f"VLM: {self.vlm_computed} computed ({self.vlm_seconds:.1f} s), {self.vlm_cached} cached, "
            f"{self.vlm_skipped} skipped by routing",
        ]
        if self.vlm_not_run:
            out[1] = self.vlm_not_run
        if self.reasoning_computed:
            out.append(f"reasoning: {self.reasoning_computed} generated ({self.reasoning_seconds:.1f} s)")
        out += [f"  failed: {p}: {r}" for p, r in self.failed]
        if self.cancelled:
            out.append("cancelled before the end")
        return out


@dataclass(frozen=True)
class Shard:
    """The photos one of ``count`` processes predicts: those with ``id % count == index``.

    Sharding by id (not by position in a to-do list) gives every pass of a process the same
    photos, so its VLM pass finds the stage-1 rows its own stage-1 pass wrote.

    Raises:
        ValueError: ``count`` < 1 or ``index`` outside ``0..count-1``.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}: need count >= 1 and 0 <= index < count")

    def condition(self) -> ColumnElement[bool] | None:
        """The SQL condition on ``images.id`` (``None`` for a single shard)."""
        if self.count == 1:
            return None
        return col(ImageRecord.id) % self.count == self.index


def candidates_key(candidates: Sequence[str]) -> str:
    """The VLM cache's input key: the stage-1 candidate list as compact JSON."""
    return json.dumps(list(candidates), ensure_ascii=False, separators=(",", ":"))


def _chunks(ids: Sequence[int], size: int = IN_CHUNK) -> Iterator[list[int]]:
    for i in range(0, len(ids), size):
        yield list(ids[i : i + size])


def cached_predictions(
    session: Session, kind: str, model_id: str, model_version: str, image_ids: Iterable[int] | None = None
) -> dict[tuple[int, str], Prediction]:
    """``{(image_id, input_key): Prediction}`` for one model version (``image_ids``: only those
    photos, queried in chunks of :data:`IN_CHUNK`; ``None``: every photo, for small databases)."""
    q = select(Prediction).where(
        Prediction.kind == kind, Prediction.model_id == model_id, Prediction.model_version == model_version
    )
    if image_ids is None:
        return {(p.image_id, p.input_key): p for p in session.exec(q)}
    out = {}
    for chunk in _chunks(list(image_ids)):
        out.update({(p.image_id, p.input_key): p for p in session.exec(q.where(col(Prediction.image_id).in_(chunk)))})
    return out


def _stored_keys(
    session: Session, kind: str, model_id: str, model_version: str, image_ids: list[int]
) -> set[tuple[int, str]]:
    """``{(image_id, input_key)}`` of the stored rows of one model version for ``image_ids``
    (keys only, no payloads)."""
    q = select(Prediction.image_id, Prediction.input_key).where(
        Prediction.kind == kind, Prediction.model_id == model_id, Prediction.model_version == model_version
    )
    out: set[tuple[int, str]] = set()
    for chunk in _chunks(image_ids):
        out.update((i, k) for i, k in session.exec(q.where(col(Prediction.image_id).in_(chunk))))
    return out


def _row(
    image_id: int, kind: str, model_id: str, model_version: str, input_key: str, payload: Any, seconds: float
) -> dict[str, Any]:
    """The column values of one prediction row (for :func:`insert_predictions`)."""
    return {
        "image_id": image_id,
        "kind": kind,
        "model_id": model_id,
        "model_version": model_version,
        "input_key": input_key,
        "payload_json": json.dumps(payload, ensure_ascii=False),
        "seconds": seconds,
        "created_at": utcnow(),
    }


def insert_predictions(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert prediction rows (column-value mappings) and commit. A row whose key
    (:data:`PREDICTION_KEY`) is stored already, by this or another process, is skipped: both
    computed the same model output and the first stays.

    Raises:
        sqlalchemy.exc.IntegrityError: any other constraint failed (e.g. the photo does not
            exist); nothing of ``rows`` is stored then.
    """
    if not rows:
        return
    try:
        session.exec(insert_ignoring_conflicts(session, Prediction, PREDICTION_KEY), params=list(rows))
        session.commit()
    except Exception:
        session.rollback()
        raise


def store_predictions(session: Session, rows: Sequence[Prediction]) -> None:
    """:func:`insert_predictions` for :class:`Prediction` objects (their ``id`` is not used)."""
    insert_predictions(session, [r.model_dump(exclude={"id"}) for r in rows])


_store = store_predictions  # the earlier name (tests/test_pipeline.py)


def stage1_topk(pred: Prediction) -> list[tuple[str, float]]:
    """The stored top-k of a stage-1 prediction as (label, probability) pairs."""
    return _topk_of(pred.payload_json)


def _topk_of(payload_json: str) -> list[tuple[str, float]]:
    return [(lab, float(p)) for lab, p in json.loads(payload_json)["topk"]]


def _topk_length(session: Session) -> ColumnElement[int]:
    """SQL: the number of entries in a stage-1 row's ``topk`` (SQLite ``json_array_length(x,
    '$.topk')``; PostgreSQL ``json_array_length(CAST(x AS JSON) -> 'topk')``).

    Raises:
        ValueError: the database is neither SQLite nor PostgreSQL.
    """
    name = session.get_bind().dialect.name
    if name == "sqlite":
        return func.json_array_length(Prediction.payload_json, "$.topk")
    if name == "postgresql":
        return func.json_array_length(cast(Prediction.payload_json, JSON)["topk"])
    raise ValueError(f"database type {name!r} is not supported; use SQLite or PostgreSQL")


def _stage1_row_of_photo(clf: Stage1Classifier) -> ColumnElement[bool]:
    """Join condition: the photo's stage-1 row of ``clf``'s version (its ``uq_prediction_key``)."""
    return and_(
        col(Prediction.image_id) == col(ImageRecord.id),
        col(Prediction.kind) == "stage1",
        col(Prediction.model_id) == clf.model_id,
        col(Prediction.model_version) == clf.model_version,
        col(Prediction.input_key) == "",
    )


def _photos(shard: Shard, image_ids: Sequence[int] | None) -> list[ColumnElement[bool]]:
    """Conditions on ``images``: decodable, in ``shard``, among ``image_ids`` (when given)."""
    conds: list[ColumnElement[bool]] = [col(ImageRecord.error).is_(None)]
    if (c := shard.condition()) is not None:
        conds.append(c)
    if image_ids is not None:
        conds.append(col(ImageRecord.id).in_(list(image_ids)))
    return conds


def count_photos(session: Session, shard: Shard = Shard(), image_ids: Sequence[int] | None = None) -> int:
    """Decodable photos in ``shard`` (and ``image_ids``)."""
    return int(session.exec(select(func.count()).select_from(ImageRecord).where(*_photos(shard, image_ids))).one())


def stage1_todo(
    session: Session,
    clf: Stage1Classifier,
    *,
    top_k: int,
    shard: Shard = Shard(),
    image_ids: Sequence[int] | None = None,
    page_size: int = PAGE_SIZE,
) -> tuple[list[PhotoItem], dict[int, int]]:
    """Decodable photos (in ``shard``) lacking a current stage-1 row of ``clf``'s version, in id order.

    A row is current when its top-k has ``min(top_k, classes)`` entries; a row with another count
    (the setting changed) is stale: recomputed and overwritten in place. Read in keyset pages of
    ``page_size`` rows (a LEFT JOIN on the ``uq_prediction_key`` index per photo).

    Returns:
        ``(photos to compute, {image id: id of its stale row})``.
    """
    k = min(top_k, len(clf.labels))
    on = _stage1_row_of_photo(clf)
    missing = or_(col(Prediction.id).is_(None), _topk_length(session) != k)
    base = (
        select(ImageRecord.id, ImageRecord.path, Prediction.id)
        .outerjoin(Prediction, on)
        .where(*_photos(shard, image_ids), missing)
        .order_by(col(ImageRecord.id))
        .limit(page_size)
    )
    items: list[PhotoItem] = []
    stale: dict[int, int] = {}
    after = 0
    while True:
        page = list(session.exec(base.where(col(ImageRecord.id) > after)))
        for image_id, path, row_id in page:
            items.append(PhotoItem(int(image_id or 0), path))
            if row_id is not None:
                stale[int(image_id or 0)] = row_id
        if len(page) < page_size:
            break
        after = items[-1].image_id
    session.commit()  # end the read transaction before the writes
    return items, stale


def _stage1_pages(
    session: Session, clf: Stage1Classifier, shard: Shard, image_ids: Sequence[int] | None, page_size: int
) -> Iterator[list[tuple[PhotoItem, list[tuple[str, float]]]]]:
    """Decodable photos (in ``shard``) with a stage-1 row of ``clf``'s version, with their top-k, in
    keyset pages of ``page_size`` by id."""
    on = _stage1_row_of_photo(clf)
    base = (
        select(ImageRecord.id, ImageRecord.path, Prediction.payload_json)
        .join(Prediction, on)
        .where(*_photos(shard, image_ids))
        .order_by(col(ImageRecord.id))
        .limit(page_size)
    )
    after = 0
    while True:
        page = list(session.exec(base.where(col(ImageRecord.id) > after)))
        rows = [(PhotoItem(int(i or 0), path), _topk_of(payload)) for i, path, payload in page]
        yield rows
        if len(page) < page_size:
            return
        after = rows[-1][0].image_id


def _workers(requested: int | None, n_items: int, processes: int = 1) -> int:
    """DataLoader workers: ``requested`` when given; else :func:`default_workers` (shared among
    ``processes`` model processes) for passes of at least :data:`AUTO_WORKERS_MIN_PHOTOS` photos
    and 0 (decode here) for smaller ones."""
    if requested is not None:
        return requested
    return default_workers(processes) if n_items >= AUTO_WORKERS_MIN_PHOTOS else 0


def _batches(
    items: Sequence[PhotoItem],
    *,
    batch_size: int,
    num_workers: int | None,
    data_config: Mapping[str, Any] | None,
    summary: PredictSummary,
    stop: threading.Event | None,
) -> Iterator[tuple[int, PhotoBatch]]:
    """``(photos done so far, batch)`` from a :func:`photo_loader` over ``items``; failed decodes
    go to ``summary.failed``. Stops before the next batch when ``stop`` is set
    (``summary.cancelled``); the workers end with the iteration."""
    if not items:
        return
    if stop is not None and stop.is_set():
        summary.cancelled = True
        return
    loader = photo_loader(
        items,
        batch_size=batch_size,
        num_workers=_workers(num_workers, len(items)),
        data_config=data_config,
    )
    done = 0
    for batch in loader:
        if stop is not None and stop.is_set():
            summary.cancelled = True
            return
        done += len(batch.items) + len(batch.failed)
        summary.failed += [(item.path, reason) for item, reason in batch.failed]
        yield done, batch


#: Columns of a stale stage-1 row that a recomputation overwrites (its key stays).
_REFRESHED = ("payload_json", "seconds", "created_at")


def compute_stage1(
    session: Session,
    clf: Stage1Classifier,
    items: Sequence[PhotoItem],
    summary: PredictSummary,
    *,
    top_k: int,
    stale: Mapping[int, int] | None = None,
    num_workers: int | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    results: dict[int, list[tuple[str, float]]] | None = None,
) -> None:
    """Stage 1 for ``items``: DataLoader workers decode and transform, this process runs the model
    (``clf.forward_batch`` under ``torch.inference_mode``), each batch is stored and committed.

    Args:
        stale: ``{image id: row id}`` of outdated rows of the same key, overwritten in place.
        num_workers: DataLoader workers (``None``: :func:`_workers` decides).
        results: when given, filled with ``{image id: top-k}`` of the computed photos.

    ``summary``: ``stage1_computed``, ``stage1_seconds`` (wall time of the pass) and ``failed``
    (photos that no longer decode) are added to; ``progress("stage 1", done, len(items))`` per batch.
    """
    stale = stale or {}
    t_start = time.perf_counter()
    for done, batch in _batches(
        items,
        batch_size=clf.batch_size,
        num_workers=num_workers,
        data_config=clf.data_config,
        summary=summary,
        stop=stop,
    ):
        if batch.pixels is not None:
            t0 = time.perf_counter()
            topk = clf.topk_from_logits(clf.forward_batch(batch.pixels), top_k)
            per_photo = (time.perf_counter() - t0) / len(batch.items)
            new, changed = [], []
            for item, tk in zip(batch.items, topk):
                row = _row(item.image_id, "stage1", clf.model_id, clf.model_version, "", {"topk": tk}, per_photo)
                if item.image_id in stale:
                    changed.append({"id": stale[item.image_id]} | {k: row[k] for k in _REFRESHED})
                else:
                    new.append(row)
                if results is not None:
                    results[item.image_id] = tk
            if changed:  # ORM bulk UPDATE by primary key, committed with the inserts
                session.exec(update(Prediction), params=changed)
            if new:
                insert_predictions(session, new)
            else:
                session.commit()
            summary.stage1_computed += len(batch.items)
        if progress:
            progress("stage 1", done, len(items))
    summary.stage1_seconds += time.perf_counter() - t_start


def run_stage1(
    session: Session,
    clf: Stage1Classifier,
    images: Sequence[ImageRecord],
    summary: PredictSummary,
    *,
    top_k: int = 3,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    num_workers: int | None = 0,
) -> dict[int, list[tuple[str, float]]]:
    """Stage-1 top-k for the given ``images`` (cached rows reused, missing ones computed in
    batches by :func:`compute_stage1`; ``num_workers`` 0 by default: these are small sets).

    A cached row with another number of entries than ``top_k`` (capped at the number of
    classes; the setting changed) is recomputed and overwritten. Photos that no longer decode
    are missing from the result (and listed in ``summary.failed``).
    """
    cache = cached_predictions(session, "stage1", clf.model_id, clf.model_version, [stored_id(i) for i in images])
    k = min(top_k, len(clf.labels))
    out = {img_id: stage1_topk(p) for (img_id, _), p in cache.items() if len(p.payload["topk"]) == k}
    stale = {img_id: p.id for (img_id, _), p in cache.items() if img_id not in out and p.id is not None}
    summary.stage1_cached += len(out)
    todo = [PhotoItem(stored_id(i), i.path) for i in images if stored_id(i) not in out]
    compute_stage1(
        session,
        clf,
        todo,
        summary,
        top_k=k,
        stale=stale,
        num_workers=num_workers,
        progress=progress,
        stop=stop,
        results=out,
    )
    return out


def compute_vlm(
    session: Session,
    vlm: Any,
    todo: Sequence[tuple[PhotoItem, list[str]]],
    summary: PredictSummary,
    *,
    num_workers: int | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    results: dict[int, Prediction] | None = None,
) -> None:
    """VLM verdicts for ``(photo, stage-1 candidates)`` pairs: DataLoader workers decode,
    ``vlm.score_candidates`` scores ``vlm.profile.batch_size`` photos per prefill, each batch is
    stored and committed. ``results`` (when given) gets the new rows by image id;
    ``summary.vlm_computed``/``vlm_seconds``/``failed`` are added to."""
    t0 = time.perf_counter()
    for rows in _candidate_batches(
        vlm,
        todo,
        "vlm",
        lambda imgs, cands: [verdict_payload(v) for v in vlm.score_candidates(imgs, cands)],
        num_workers=num_workers,
        summary=summary,
        progress=progress,
        stop=stop,
    ):
        insert_predictions(session, rows)
        if results is not None:
            results.update({r["image_id"]: Prediction(**r) for r in rows})
        summary.vlm_computed += len(rows)
    summary.vlm_seconds += time.perf_counter() - t0


def _candidate_batches(
    vlm: Any,
    todo: Sequence[tuple[PhotoItem, list[str]]],
    kind: str,
    compute: Callable[[list[Any], list[list[str]]], list[Any]],
    *,
    num_workers: int | None,
    summary: PredictSummary,
    progress: Progress | None,
    stop: threading.Event | None,
) -> Iterator[list[dict[str, Any]]]:
    """The one loop of the VLM passes: DataLoader workers decode ``vlm.profile.batch_size``
    photos, ``compute(images, candidate lists)`` gives one payload per photo, and the rows of
    ``kind`` (keyed by the candidate list, seconds divided per photo) are yielded per batch."""
    candidates = {item.image_id: cands for item, cands in todo}
    label = {"vlm": "VLM"}.get(kind, kind)
    for done, batch in _batches(
        [item for item, _ in todo],
        batch_size=vlm.profile.batch_size,
        num_workers=num_workers,
        data_config=None,
        summary=summary,
        stop=stop,
    ):
        if batch.items:
            cands = [candidates[item.image_id] for item in batch.items]
            t0 = time.perf_counter()
            payloads = compute(batch.images, cands)
            per_photo = (time.perf_counter() - t0) / len(batch.items)
            yield [
                _row(item.image_id, kind, vlm.model_id, vlm.model_version, candidates_key(c), payload, per_photo)
                for item, c, payload in zip(batch.items, cands, payloads)
            ]
        if progress:
            progress(label, done, len(todo))


def run_vlm(
    session: Session,
    vlm: Any,
    images: Sequence[ImageRecord],
    topk: dict[int, list[tuple[str, float]]],
    summary: PredictSummary,
    *,
    routing_threshold: float | None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    num_workers: int | None = 0,
) -> dict[int, Prediction]:
    """VLM verdicts for the given ``images`` that stage 1 does not route past the VLM (cached
    where possible, the rest by :func:`compute_vlm`; ``num_workers`` 0 by default: small sets)."""
    routed = []
    for rec in images:
        if stored_id(rec) not in topk:
            continue
        if should_route_to_vlm(topk[stored_id(rec)][0][1], routing_threshold):
            routed.append(rec)
        else:
            summary.vlm_skipped += 1
    if not routed:
        return {}
    cache = cached_predictions(session, "vlm", vlm.model_id, vlm.model_version, [stored_id(i) for i in routed])
    out: dict[int, Prediction] = {}
    todo = []
    for rec in routed:
        cands = [lab for lab, _ in topk[stored_id(rec)]]
        hit = cache.get((stored_id(rec), candidates_key(cands)))
        if hit is not None:
            out[stored_id(rec)] = hit
        else:
            todo.append((PhotoItem(stored_id(rec), rec.path), cands))
    summary.vlm_cached += len(out)
    compute_vlm(session, vlm, todo, summary, num_workers=num_workers, progress=progress, stop=stop, results=out)
    return out


def verdict_payload(v: Any) -> dict[str, Any]:
    """JSON payload of a :class:`catreview.models.vlm.types.VLMVerdict`."""
    return {
        "candidates": list(v.candidates),
        "probabilities": [float(p) for p in v.probabilities],
        "scores": [float(s) for s in v.scores],
        "label": v.label,
        "confidence": float(v.confidence),
    }


def store_reasoning(
    session: Session, vlm: Any, image_id: int, candidates: Sequence[str], text: str, seconds: float
) -> None:
    """Cache a reasoning text (skipped if the same key was stored meanwhile, see :func:`insert_predictions`)."""
    row = _row(
        image_id, "reasoning", vlm.model_id, vlm.model_version, candidates_key(candidates), {"text": text}, seconds
    )
    insert_predictions(session, [row])


def compute_reasoning(
    session: Session,
    vlm: Any,
    todo: Sequence[tuple[PhotoItem, list[str]]],
    summary: PredictSummary,
    *,
    num_workers: int | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Generate (``vlm.reasoning_batch``: batched, left-padded) and store the reasoning texts of
    ``(photo, candidates)`` pairs, one committed batch at a time."""
    t0 = time.perf_counter()
    for rows in _candidate_batches(
        vlm,
        todo,
        "reasoning",
        lambda imgs, cands: [{"text": t} for t in vlm.reasoning_batch(imgs, cands)],
        num_workers=num_workers,
        summary=summary,
        progress=progress,
        stop=stop,
    ):
        insert_predictions(session, rows)
        summary.reasoning_computed += len(rows)
    summary.reasoning_seconds += time.perf_counter() - t0


def run_reasoning(
    session: Session,
    vlm: Any,
    images: Sequence[ImageRecord],
    topk: dict[int, list[tuple[str, float]]],
    summary: PredictSummary,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    num_workers: int | None = 0,
) -> None:
    """Generate and cache the reasoning texts of the given ``images`` that are not cached yet."""
    cands = {stored_id(rec): [lab for lab, _ in topk[stored_id(rec)]] for rec in images}
    have = _stored_keys(session, "reasoning", vlm.model_id, vlm.model_version, list(cands))
    todo = [
        (PhotoItem(stored_id(rec), rec.path), cands[stored_id(rec)])
        for rec in images
        if (stored_id(rec), candidates_key(cands[stored_id(rec)])) not in have
    ]
    compute_reasoning(session, vlm, todo, summary, num_workers=num_workers, progress=progress, stop=stop)


def vlm_todo(
    session: Session,
    clf: Stage1Classifier,
    vlm: Any,
    summary: PredictSummary,
    *,
    top_k: int,
    routing_threshold: float | None,
    shard: Shard = Shard(),
    image_ids: Sequence[int] | None = None,
    page_size: int = PAGE_SIZE,
) -> list[tuple[PhotoItem, list[str]]]:
    """Photos (in ``shard``) with a current stage-1 row that routing sends to the VLM and that
    lack a verdict of ``vlm``'s version for their candidate list, in id order, read in pages.
    Counts ``summary.vlm_skipped`` (routed past the VLM) and ``vlm_cached``."""
    k = min(top_k, len(clf.labels))
    todo = []
    for page in _stage1_pages(session, clf, shard, image_ids, page_size):
        routed = []
        for item, topk in page:
            if len(topk) != k:
                continue  # stale stage 1 (it failed to decode this run): no candidates yet
            if should_route_to_vlm(topk[0][1], routing_threshold):
                routed.append((item, [lab for lab, _ in topk]))
            else:
                summary.vlm_skipped += 1
        have = _stored_keys(session, "vlm", vlm.model_id, vlm.model_version, [i.image_id for i, _ in routed])
        for item, cands in routed:
            if (item.image_id, candidates_key(cands)) in have:
                summary.vlm_cached += 1
            else:
                todo.append((item, cands))
    session.commit()  # end the read transaction before the writes
    return todo


def reasoning_todo(
    session: Session,
    clf: Stage1Classifier,
    vlm: Any,
    *,
    top_k: int,
    shard: Shard = Shard(),
    image_ids: Sequence[int] | None = None,
    page_size: int = PAGE_SIZE,
) -> list[tuple[PhotoItem, list[str]]]:
    """Photos (in ``shard``) with a verdict of ``vlm``'s version for their current stage-1
    candidates and no reasoning text for them yet, in id order, read in pages."""
    k = min(top_k, len(clf.labels))
    todo = []
    for page in _stage1_pages(session, clf, shard, image_ids, page_size):
        cands = {item.image_id: (item, [lab for lab, _ in topk]) for item, topk in page if len(topk) == k}
        ids = list(cands)
        verdicts = _stored_keys(session, "vlm", vlm.model_id, vlm.model_version, ids)
        texts = _stored_keys(session, "reasoning", vlm.model_id, vlm.model_version, ids)
        for image_id, (item, c) in cands.items():
            key = (image_id, candidates_key(c))
            if key in verdicts and key not in texts:
                todo.append((item, c))
    session.commit()
    return todo


def run_predictions(
    engine: Engine,
    registry: Any,
    *,
    image_ids: Sequence[int] | None = None,
    vlm_name: str | None = None,
    reasoning: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    num_workers: int | None = None,
    shard: Shard = Shard(),
    page_size: int = PAGE_SIZE,
) -> PredictSummary:
    """Run stage 1, then the VLM, (then reasoning if asked) over the decodable photos.

    Each pass lists what is missing for the current model versions (:func:`stage1_todo`,
    :func:`vlm_todo`, :func:`reasoning_todo`) and computes only that, storing each batch as it
    is done, so a run that was stopped or killed resumes where it stopped.

    Args:
        registry: a :class:`catreview.models.registry.ModelRegistry`.
        image_ids: only these photos (``None``: all).
        vlm_name: VLM profile (default: the active one).
        reasoning: also generate the reasoning texts.
        progress: ``progress(stage, done, total)`` after every batch.
        stop: when set, the run ends before its next batch (``summary.cancelled``).
        num_workers: DataLoader decoding workers (``None``: CPUs / processes - 1, at most 16, for
            passes of at least :data:`AUTO_WORKERS_MIN_PHOTOS` photos, else none; 0: decode in
            this process).
        shard: this process's share of the photos (one per ``accelerate launch`` process).
        page_size: rows per query when listing what is missing.

    The VLM passes are skipped when the profile is not trained yet (a built-in FastVLM without
    an active adapter): ``summary.vlm_not_run`` says so.

    With the built-in stage-1 backbone and no trained head yet
    (:class:`~catreview.models.classifier.ClassifierNotTrainedError`), nothing is predicted:
    ``summary.stage1_skipped`` says so (the VLM needs stage 1's candidates).

    Raises:
        catreview.errors.CatreviewError: a model cannot be loaded (its own subclass).
    """
    summary = PredictSummary()
    try:
        clf = registry.classifier()
    except ClassifierNotTrainedError as exc:
        with Session(engine) as session:
            summary.images = count_photos(session, shard, image_ids)
        summary.stage1_skipped = str(exc)
        return summary
    # An untrained built-in VLM's verdicts would look like answers and mean nothing: it is not
    # even built or loaded (registry.untrained_reason builds nothing).
    untrained = registry.untrained_reason(vlm_name)
    vlm = registry.vlm(vlm_name) if untrained is None else None
    top_k = registry.settings.classifier.top_k
    with Session(engine) as session:
        summary.images = count_photos(session, shard, image_ids)
        todo, stale = stage1_todo(session, clf, top_k=top_k, shard=shard, image_ids=image_ids, page_size=page_size)
        summary.stage1_cached = summary.images - len(todo)
        compute_stage1(
            session,
            clf,
            todo,
            summary,
            top_k=top_k,
            stale=stale,
            num_workers=_workers(num_workers, len(todo), shard.count),
            progress=progress,
            stop=stop,
        )
        if summary.cancelled:
            return summary
        summary.vlm_not_run = untrained
        if vlm is None:
            return summary
        pairs = vlm_todo(
            session,
            clf,
            vlm,
            summary,
            top_k=top_k,
            routing_threshold=registry.settings.fusion.routing_threshold,
            shard=shard,
            image_ids=image_ids,
            page_size=page_size,
        )
        workers = _workers(num_workers, len(pairs), shard.count)
        compute_vlm(session, vlm, pairs, summary, num_workers=workers, progress=progress, stop=stop)
        if reasoning and not summary.cancelled:
            pairs = reasoning_todo(
                session, clf, vlm, top_k=top_k, shard=shard, image_ids=image_ids, page_size=page_size
            )
            workers = _workers(num_workers, len(pairs), shard.count)
            compute_reasoning(session, vlm, pairs, summary, num_workers=workers, progress=progress, stop=stop)
    return summary
