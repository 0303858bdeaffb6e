"""Running both stages over imported photos and caching every output in the database.

Cache keys (table ``predictions``): stage 1 by (image, classifier id, checkpoint digest); VLM
verdicts and reasoning by (image, VLM profile's model id, ``model_version`` = weights + adapter +
prompt version, candidate list). Re-running, reopening a photo or restarting recomputes nothing;
changing any part of a key recomputes only what it changes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from catreview.data.db import ImageRecord, Prediction, stored_id
from catreview.data.images import ImageDecodeError, load_rgb
from catreview.models.classifier import Stage1Classifier
from catreview.predict.fusion import should_route_to_vlm

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class PredictSummary:
    """Counts and timings of one prediction run (seconds are wall time)."""

    images: int = 0
    stage1_computed: int = 0
    stage1_cached: int = 0
    vlm_computed: int = 0
    vlm_cached: int = 0
    vlm_skipped: int = 0
    reasoning_computed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    stage1_seconds: float = 0.0
    vlm_seconds: float = 0.0
    reasoning_seconds: float = 0.0
    cancelled: bool = False

    def lines(self) -> list[str]:
        out = [
            f"{self.images} photos; stage 1: {self.stage1_computed} computed ({self.stage1_seconds:.1f} s), "
            f"{self.stage1_cached} cached",
            f"VLM: {self.vlm_computed} computed ({self.vlm_seconds:.1f} s), {self.vlm_cached} cached, "
            f"{self.vlm_skipped} skipped by routing",
        ]
        if self.reasoning_computed:
            out.append(f"reasoning: {self.reasoning_computed} generated ({self.reasoning_seconds:.1f} s)")
        out += [f"  failed: {p}: {r}" for p, r in self.failed]
        if self.cancelled:
            out.append("cancelled before the end")
        return out


def candidates_key(candidates: Sequence[str]) -> str:
    """The VLM cache's input key: the stage-1 candidate list as compact JSON."""
    return json.dumps(list(candidates), ensure_ascii=False, separators=(",", ":"))


def cached_predictions(
    session: Session, kind: str, model_id: str, model_version: str, image_ids: Iterable[int] | None = None
) -> dict[tuple[int, str], Prediction]:
    """``{(image_id, input_key): Prediction}`` for one model version."""
    q = select(Prediction).where(
        Prediction.kind == kind, Prediction.model_id == model_id, Prediction.model_version == model_version
    )
    if image_ids is not None:
        q = q.where(Prediction.image_id.in_(list(image_ids)))  # type: ignore[attr-defined]
    return {(p.image_id, p.input_key): p for p in session.exec(q)}


def _store(session: Session, rows: list[Prediction]) -> None:
    """Insert prediction rows. A row whose key (``uq_prediction_key``) another process stored
    meanwhile (the app and a CLI ``predict`` on one database) is skipped: both computed the same
    model output, and the first stays. Any other integrity error is raised.
    """
    session.add_all(rows)
    try:
        session.commit()
        return
    except IntegrityError:
        session.rollback()
    for row in rows:  # one by one, to keep the rows that are not duplicates
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            kind, model_id, version, key = row.kind, row.model_id, row.model_version, row.input_key
            if (row.image_id, key) not in cached_predictions(session, kind, model_id, version, [row.image_id]):
                raise


def _replace(session: Session, rows: list[Prediction], stale: dict[int, Prediction]) -> None:
    """Store freshly computed ``rows``: overwrite the payload of the ``stale`` row of the same
    photo (already loaded, same key), insert the others with :func:`_store`."""
    new = []
    for row in rows:
        old = stale.get(row.image_id)
        if old is None:
            new.append(row)
        else:
            old.payload_json, old.seconds, old.created_at = row.payload_json, row.seconds, row.created_at
            session.add(old)
    session.commit()
    _store(session, new)


def _load_batch(images: Sequence[ImageRecord], summary: PredictSummary) -> list[tuple[ImageRecord, Any]]:
    out = []
    for rec in images:
        try:
            out.append((rec, load_rgb(rec.path)))
        except ImageDecodeError as exc:  # file changed or vanished since import
            summary.failed.append((rec.path, str(exc)))
    return out


def _batches(
    todo: Sequence[ImageRecord], size: int, summary: PredictSummary, stop: threading.Event | None
) -> Iterator[tuple[int, list[tuple[ImageRecord, Any]]]]:
    """Yield ``(done_so_far, [(record, PIL image), ...])`` batches of ``size``, decoding each
    batch just in time; stops early (``summary.cancelled``) when ``stop`` is set."""
    for start in range(0, len(todo), size):
        if stop is not None and stop.is_set():
            summary.cancelled = True
            return
        yield min(start + size, len(todo)), _load_batch(todo[start : start + size], summary)


def stage1_topk(pred: Prediction) -> list[tuple[str, float]]:
    """The stored top-k of a stage-1 prediction as (label, probability) pairs."""
    return [(lab, float(p)) for lab, p in pred.payload["topk"]]


def run_stage1(
    session: Session,
    clf: Stage1Classifier,
    images: Sequence[ImageRecord],
    summary: PredictSummary,
    *,
    top_k: int = 3,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> dict[int, list[tuple[str, float]]]:
    """Stage-1 top-k for ``images`` (cached rows reused, missing ones computed in batches).

    A cached row with another number of entries than ``top_k`` (capped at the number of
    classes; the setting changed) is recomputed and overwritten.
    """
    cache = cached_predictions(session, "stage1", clf.model_id, clf.model_version, [stored_id(i) for i in images])
    k = min(top_k, len(clf.labels))
    out = {img_id: stage1_topk(p) for (img_id, _), p in cache.items() if len(p.payload["topk"]) == k}
    stale = {img_id: p for (img_id, _), p in cache.items() if img_id not in out}
    summary.stage1_cached += len(out)
    todo = [i for i in images if stored_id(i) not in out]
    for done, loaded in _batches(todo, clf.batch_size, summary, stop):
        t0 = time.perf_counter()
        results = clf.topk([im for _, im in loaded], k=top_k)
        dt = time.perf_counter() - t0
        rows = []
        for (rec, _), topk in zip(loaded, results):
            out[stored_id(rec)] = topk
            rows.append(
                Prediction(
                    image_id=stored_id(rec),
                    kind="stage1",
                    model_id=clf.model_id,
                    model_version=clf.model_version,
                    payload_json=json.dumps({"topk": topk}),
                    seconds=dt / max(len(loaded), 1),
                )
            )
        _replace(session, rows, stale)
        summary.stage1_computed += len(rows)
        summary.stage1_seconds += dt
        if progress:
            progress("stage 1", done, len(todo))
    return out


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
) -> dict[int, Prediction]:
    """VLM verdicts for photos that stage 1 does not route past the VLM (cached where possible)."""
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
        key = candidates_key([lab for lab, _ in topk[stored_id(rec)]])
        if (stored_id(rec), key) in cache:
            out[stored_id(rec)] = cache[(stored_id(rec), key)]
        else:
            todo.append(rec)
    summary.vlm_cached += len(out)
    for done, loaded in _batches(todo, vlm.profile.batch_size, summary, stop):
        cands = [[lab for lab, _ in topk[stored_id(rec)]] for rec, _ in loaded]
        t0 = time.perf_counter()
        verdicts = vlm.score_candidates([im for _, im in loaded], cands)
        dt = time.perf_counter() - t0
        rows = []
        for (rec, _), cand, v in zip(loaded, cands, verdicts):
            row = Prediction(
                image_id=stored_id(rec),
                kind="vlm",
                model_id=vlm.model_id,
                model_version=vlm.model_version,
                input_key=candidates_key(cand),
                payload_json=json.dumps(verdict_payload(v)),
                seconds=dt / max(len(loaded), 1),
            )
            rows.append(row)
            out[stored_id(rec)] = row
        _store(session, rows)
        summary.vlm_computed += len(rows)
        summary.vlm_seconds += dt
        if progress:
            progress("VLM", done, len(todo))
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
    """Cache a reasoning text (skipped if the same key was stored meanwhile, see :func:`_store`)."""
    key = candidates_key(candidates)
    if cached_predictions(session, "reasoning", vlm.model_id, vlm.model_version, [image_id]).get((image_id, key)):
        return
    _store(
        session,
        [
            Prediction(
                image_id=image_id,
                kind="reasoning",
                model_id=vlm.model_id,
                model_version=vlm.model_version,
                input_key=key,
                payload_json=json.dumps({"text": text}, ensure_ascii=False),
                seconds=seconds,
            )
        ],
    )


def run_reasoning(
    session: Session,
    vlm: Any,
    images: Sequence[ImageRecord],
    topk: dict[int, list[tuple[str, float]]],
    summary: PredictSummary,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Generate (batched, left-padded) and cache the reasoning texts that are not cached yet."""
    cands = {stored_id(rec): [lab for lab, _ in topk[stored_id(rec)]] for rec in images}
    cache = cached_predictions(session, "reasoning", vlm.model_id, vlm.model_version, list(cands))
    todo = [rec for rec in images if (stored_id(rec), candidates_key(cands[stored_id(rec)])) not in cache]
    for done, loaded in _batches(todo, vlm.profile.batch_size, summary, stop):
        t0 = time.perf_counter()
        texts = vlm.reasoning_batch([im for _, im in loaded], [cands[stored_id(rec)] for rec, _ in loaded])
        dt = time.perf_counter() - t0
        _store(
            session,
            [
                Prediction(
                    image_id=stored_id(rec),
                    kind="reasoning",
                    model_id=vlm.model_id,
                    model_version=vlm.model_version,
                    input_key=candidates_key(cands[stored_id(rec)]),
                    payload_json=json.dumps({"text": text}, ensure_ascii=False),
                    seconds=dt / max(len(loaded), 1),
                )
                for (rec, _), text in zip(loaded, texts)
            ],
        )
        summary.reasoning_computed += len(loaded)
        summary.reasoning_seconds += dt
        if progress:
            progress("reasoning", done, len(todo))


def run_predictions(
    engine: Engine,
    registry: Any,
    *,
    image_ids: Sequence[int] | None = None,
    vlm_name: str | None = None,
    reasoning: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> PredictSummary:
    """Run stage 1, then the VLM, (then reasoning if asked) over decodable images.

    ``registry`` is a :class:`catreview.models.registry.ModelRegistry`. ``stop`` cancels between batches.
    """
    summary = PredictSummary()
    clf = registry.classifier()
    vlm = registry.vlm(vlm_name)
    with Session(engine) as session:
        q = select(ImageRecord).where(col(ImageRecord.error).is_(None)).order_by(col(ImageRecord.id))
        if image_ids is not None:
            q = q.where(col(ImageRecord.id).in_(list(image_ids)))
        images = list(session.exec(q))
        summary.images = len(images)
        topk = run_stage1(
            session, clf, images, summary, top_k=registry.settings.classifier.top_k, progress=progress, stop=stop
        )
        verdicts = run_vlm(
            session,
            vlm,
            images,
            topk,
            summary,
            routing_threshold=registry.settings.fusion.routing_threshold,
            progress=progress,
            stop=stop,
        )
        if reasoning:
            run_reasoning(
                session,
                vlm,
                [rec for rec in images if stored_id(rec) in verdicts],
                topk,
                summary,
                progress=progress,
                stop=stop,
            )
    return summary
