"""Review queues: which photo without a human decision comes next, and why it is there.

Six orders (:data:`QUEUE_KINDS`): import order, then five served from ``photo_scores`` (one row
per decodable photo with stage-1 predictions for the active versions, written by
:func:`refresh_scores`): highest stage-1/VLM disagreement, lowest fused margin, likely label
errors (:mod:`catreview.evaluate.label_errors` writes them through :func:`store_label_issues`),
rarest predicted breed, and a stable random sample (for unbiased accuracy estimates).

Every call is keyset pagination on a partial index (``WHERE open``, the photos without a human
decision; ``ix_images_unverified`` for import order): the position of photo ``after`` is one
primary-key read, then one statement of ``LIMIT`` index ranges (after it, then from the start,
wrapping; import order: at most two ``LIMIT`` queries).
Nothing sorts the table per click, so the cost is the same at 127,000 photos as at 300.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    bindparam,
    delete,
    exists,
    literal,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.data.db import (
    IMPORT_SOURCE,
    UNVERIFIED_WHERE,
    ImageRecord,
    PhotoScore,
    utcnow,
)

if TYPE_CHECKING:
    from catreview.query.photos import PhotoView

QUEUE_KINDS: dict[str, str] = {
    "import": "Import order",
    "disagreement": "Stage 1 and VLM disagree most",
    "margin": "Lowest fused confidence (margin) first",
    "label_errors": "Likely label errors first",
    "rare": "Rare breeds first (predicted class frequency)",
    "random": "Random sample (unbiased accuracy estimate)",
}
"""Queue kind -> human title, in the order the Review tab offers them."""

MAX_LIMIT = 10_000
"""Most items one :func:`queue_items` call returns."""


@dataclass(frozen=True)
class QueueItem:
    """One photo of a queue: its id, the queue's score for it (the sort key: disagreement,
    margin, label-issue score, rarity or random key, each 0..1; the image id for import order)
    and ``reason``, the "why it is here" line shown to the reviewer."""

    image_id: int
    score: float
    reason: str


@dataclass(frozen=True)
class _Order:
    """A score-served queue: its ``photo_scores`` column and whether higher scores come first."""

    column: Any
    descending: bool


ORDERS: dict[str, _Order] = {
    "disagreement": _Order(col(PhotoScore.disagreement), True),
    "margin": _Order(col(PhotoScore.fused_margin), False),
    "label_errors": _Order(col(PhotoScore.label_issue), True),
    "rare": _Order(col(PhotoScore.rarity), True),
    "random": _Order(col(PhotoScore.random_key), False),
}


def _check(kind: str, limit: int) -> None:
    if kind not in QUEUE_KINDS:
        raise ValueError(f"unknown queue {kind!r}; choose one of: {', '.join(QUEUE_KINDS)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be in 1..{MAX_LIMIT}, not {limit}")


def queue_items(engine: Engine, kind: str, *, limit: int, after: int | None = None) -> list[QueueItem]:
    """Up to ``limit`` open photos (no human decision yet) of queue ``kind``, in its order,
    starting after photo ``after`` (``None``, or a photo not in the queue's table: from the
    start) and wrapping around to the start; each photo at most once.

    Score-served queues list only photos with a ``photo_scores`` row (stage 1 has run for the
    active versions; :func:`refresh_scores`); ``label_errors`` only those with a label-issue score.

    Raises:
        ValueError: unknown ``kind``, or ``limit`` not in 1..:data:`MAX_LIMIT`.
    """
    _check(kind, limit)
    with Session(engine) as s:
        if kind == "import":
            return _import_items(s, limit, after)
        return _score_items(s, ORDERS[kind], kind, limit, after)


def next_in_queue(engine: Engine, kind: str, after: int | None = None) -> QueueItem | None:
    """The next open photo after photo ``after`` in queue ``kind`` (wrapping), or ``None`` when
    the queue is empty (:func:`queue_items` with ``limit=1``; the photo ``after`` itself comes
    back when it is the only one left).

    Raises:
        ValueError: unknown ``kind``.
    """
    found = queue_items(engine, kind, limit=1, after=after)
    return found[0] if found else None


def _import_items(s: Session, limit: int, after: int | None) -> list[QueueItem]:
    """Import order over ``ix_images_unverified`` (photos without a human decision, by id)."""
    ident = col(ImageRecord.id)
    base = select(ImageRecord.id, ImageRecord.current_label).where(text(UNVERIFIED_WHERE))
    rows = list(s.exec(base.where(ident > after).order_by(ident).limit(limit))) if after is not None else []
    if len(rows) < limit:
        stop = [ident <= after] if after is not None and rows else []
        seen = {r[0] for r in rows}
        more = s.exec(base.where(*stop).order_by(ident).limit(limit - len(rows)))
        rows += [r for r in more if r[0] not in seen]
    return [
        QueueItem(
            int(i),
            float(i),
            f"import order: imported label {label}, not verified yet" if label else "import order: no label yet",
        )
        for i, label in rows
        if i is not None
    ]


@functools.cache
def _statement(kind: str, positioned: bool) -> Any:
    """The (cached) statement of a score-served queue (:func:`_score_items`); bound parameters
    ``lim`` and, when ``positioned``, ``score``/``at`` (the key of photo ``after``)."""
    order = ORDERS[kind]
    column, ident = order.column, col(PhotoScore.image_id)
    # the bare column: SQLAlchemy renders it "open = 1" on SQLite and "open" on PostgreSQL,
    # each exactly the partial indexes' condition (OPEN_WHERE), so both planners use them
    conds: list[ColumnElement[bool]] = [cast("ColumnElement[bool]", col(PhotoScore.open))]
    if kind == "label_errors":
        conds.append(column.is_not(None))
    desc = order.descending
    ordering = (column.desc(), ident.desc()) if desc else (column, ident)
    columns = list(PhotoScore.__table__.columns)  # type: ignore[attr-defined]
    lim = bindparam("lim", type_=Integer)

    def part(n: int, *where: Any) -> Any:
        q = sa_select(*columns, literal(n).label("part")).where(*conds, *where).order_by(*ordering).limit(lim)
        return sa_select(q.subquery())

    if not positioned:
        return part(0)
    score, at = bindparam("score", type_=Float), bindparam("at", type_=Integer)
    later = column < score if desc else column > score
    past = ident < at if desc else ident > at
    key, mark = tuple_(column, ident), tuple_(score, at)
    return union_all(part(0, column == score, past), part(1, later), part(2, key >= mark if desc else key <= mark))


def _score_items(s: Session, order: _Order, kind: str, limit: int, after: int | None) -> list[QueueItem]:
    """Keyset pages on ``(score, image_id)`` over the partial index of ``order.column``.

    One read of photo ``after``'s key (primary key), then one statement: the ``UNION ALL`` of
    three index ranges, each its own ``ORDER BY ... LIMIT`` -- the photos tied with ``after``'s
    score past it (``score = s AND image_id > after``), those with later scores, and from the
    start of the queue up to ``after`` (the wrap) -- merged here. Separate equality and range
    parts because SQLite serves a row-value range ``(score, id) > (s, a)`` with the leading
    column only, which would walk every tied row (many photos share a rarity or a zero
    disagreement).
    """
    column, ident = order.column, col(PhotoScore.image_id)
    pos = s.exec(select(column, ident).where(ident == after)).first() if after is not None else None
    if pos is None or pos[0] is None:
        stmt, params = _statement(kind, False), {"lim": limit}
    else:
        stmt, params = _statement(kind, True), {"lim": limit, "score": pos[0], "at": pos[1]}
    found = list(s.connection().execute(stmt, params).mappings())
    sign = -1.0 if order.descending else 1.0
    found.sort(key=lambda r: (r["part"], sign * r[column.key], sign * r["image_id"]))
    items: list[QueueItem] = []
    seen: set[int] = set()
    for r in found:
        if r["image_id"] in seen:
            continue
        seen.add(r["image_id"])
        row = PhotoScore(**{k: v for k, v in r.items() if k != "part"})
        items.append(QueueItem(row.image_id, float(r[column.key]), reason(kind, row)))
        if len(items) == limit:
            break
    return items


def reason(kind: str, row: PhotoScore) -> str:
    """The "why it is here" line of a photo in queue ``kind`` (probabilities to 2 decimals)."""
    if kind == "disagreement":
        if row.vlm_label is None or row.vlm_prob is None:
            return f"stage 1 {row.stage1_label} {row.stage1_prob:.2f}; the VLM did not run"
        if row.disagreement <= 0.0:
            return f"stage 1 and VLM agree: {row.stage1_label} {row.stage1_prob:.2f} / {row.vlm_prob:.2f}"
        return f"stage 1 {row.stage1_label} {row.stage1_prob:.2f} vs VLM {row.vlm_label} {row.vlm_prob:.2f}"
    if kind == "margin":
        second = row.fused_prob - row.fused_margin
        runner = f"{row.fused_runner_up} {second:.2f}" if row.fused_runner_up else "no other candidate"
        return f"lowest fused margin: {row.fused_label} {row.fused_prob:.2f} vs {runner}"
    if kind == "label_errors":
        if row.label_issue_reason:
            return row.label_issue_reason
        return f"label issue score {row.label_issue or 0.0:.2f}"
    if kind == "rare":
        return f"rare predicted breed: {row.fused_label} (rarity {row.rarity:.2f})"
    if kind == "random":
        return f"random sample (key {row.random_key:.3f}): fused {row.fused_label} {row.fused_prob:.2f}"
    raise ValueError(f"unknown queue {kind!r}; choose one of: {', '.join(QUEUE_KINDS)}")


# ---------------------------------------------------------------------------- writing the scores


def random_key(sha256: str) -> float:
    """A stable key in [0, 1) from a photo's sha256 (its first 52 bits): a uniform random order
    that is the same on every machine and every refresh."""
    return int(sha256[:13], 16) / float(1 << 52)


def score_row(view: PhotoView, models: str) -> dict[str, Any] | None:
    """The ``photo_scores`` values of one photo view (``rarity`` 0 and ``open`` from its newest
    review; :func:`refresh_scores` fills rarity), or ``None`` when the photo has no stage-1
    prediction or fused distribution (undecodable, not predicted yet).

    ``disagreement`` is 0 when the VLM did not run or chose stage 1's top-1, else the total
    variation distance between the two distributions over the candidates and "other"
    (stage 1's "other" = 1 minus its top-k mass): 0..1, high when both are confident and differ.
    """
    stage1, fused = view["stage1"], view["fused"]
    if not stage1 or fused is None:
        return None
    top = stage1[0]
    vlm = view["vlm"]
    vlm_label = vlm_prob = None
    disagreement = 0.0
    if vlm and not vlm.get("skipped") and "probabilities" in vlm:
        vlm_label, vlm_prob = vlm["label"], float(vlm["confidence"])
        if vlm_label != top["label"]:
            s1 = {e["label"]: e["probability"] for e in stage1}
            s1["other"] = s1.get("other", 0.0) + max(0.0, 1.0 - sum(e["probability"] for e in stage1))
            v = vlm["probabilities"]
            keys = set(s1) | set(v)
            disagreement = min(1.0, 0.5 * sum(abs(s1.get(k, 0.0) - v.get(k, 0.0)) for k in keys))
    ranked = sorted(fused["probabilities"].items(), key=lambda kv: (-kv[1], kv[0]))
    second = ranked[1] if len(ranked) > 1 else None
    review = view["review"]
    return {
        "image_id": view["id"],
        "open": review is None or review["source"] == IMPORT_SOURCE,
        "stage1_label": top["label"],
        "stage1_prob": float(top["probability"]),
        "vlm_label": vlm_label,
        "vlm_prob": vlm_prob,
        "fused_label": fused["label"],
        "fused_prob": float(fused["probability"]),
        "fused_margin": max(0.0, float(fused["probability"]) - (second[1] if second else 0.0)),
        "fused_runner_up": second[0] if second else None,
        "disagreement": float(disagreement),
        "rarity": 0.0,
        "random_key": random_key(view["sha256"]),
        "models": models,
    }


def rarity(count: int, scored: int) -> float:
    """``-log(count / scored) / log(scored)``: 0 for a class every scored photo is predicted as,
    1 for a class predicted once (the photo's information content, normalised to 0..1;
    0 when fewer than two photos are scored)."""
    if scored < 2 or count < 1:
        return 0.0
    return max(0.0, min(1.0, math.log(scored / count) / math.log(scored)))


def models_key(registry: Any, vlm_name: str | None = None) -> str:
    """The ``photo_scores.models`` value of the active versions: ``stage1 id@version | vlm id@version``."""
    from catreview.query.photos import _stage1

    clf, vlm = _stage1(registry), registry.vlm(vlm_name)
    return f"{clf.model_id}@{clf.model_version} | {vlm.model_id}@{vlm.model_version}"


def _upsert(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert or update ``rows`` (``label_issue``/``label_issue_reason`` are kept on update)."""
    name = session.get_bind().dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt: Any = sqlite_insert(PhotoScore)
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(PhotoScore)
    else:
        raise ValueError(f"database type {name!r} is not supported; use SQLite or PostgreSQL")
    now = utcnow()
    rows = [{**r, "updated_at": now} for r in rows]
    keep = {"image_id", "label_issue", "label_issue_reason"}
    stmt = stmt.on_conflict_do_update(
        index_elements=["image_id"], set_={c: stmt.excluded[c] for c in rows[0] if c not in keep}
    )
    session.connection().execute(stmt, rows)


def _sync_open(session: Session, image_ids: list[int]) -> None:
    """Set ``open`` of these rows from ``images`` (in the transaction that wrote them, so a
    review saved while the scores were computed is not undone)."""
    human = exists().where(
        col(ImageRecord.id) == col(PhotoScore.image_id),
        col(ImageRecord.current_review_id).is_not(None),
        col(ImageRecord.current_source) != IMPORT_SOURCE,
    )
    session.exec(update(PhotoScore).where(col(PhotoScore.image_id).in_(image_ids)).values(open=~human))


def refresh_scores(engine: Engine, registry: Any, *, batch_size: int = 1000, vlm_name: str | None = None) -> int:
    """(Re)write ``photo_scores`` from the stored predictions of the active versions: one row
    per decodable photo with a stage-1 prediction (views streamed ``batch_size`` at a time through
    :func:`catreview.query.photos.iter_views`, the same fusion the Review tab shows), then
    ``rarity`` from the fused label counts, then rows of other versions (or photos without
    predictions now) deleted. Label-issue scores of kept rows are kept. Each batch is its own
    transaction; background use (a pass over the collection).

    Returns:
        The number of rows written.

    Raises:
        ValueError: ``batch_size`` < 1, or a database other than SQLite/PostgreSQL.
    """
    from catreview.query.photos import iter_views  # the model code, only when scores are written

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    models = models_key(registry, vlm_name)
    labels: Counter[str] = Counter()
    written = 0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal written
        if not batch:
            return
        with Session(engine) as s:
            _upsert(s, batch)
            _sync_open(s, [r["image_id"] for r in batch])
            s.commit()
        written += len(batch)
        batch.clear()

    for view in iter_views(engine, registry, vlm_name=vlm_name, batch_size=batch_size):
        row = score_row(view, models)
        if row is None:
            continue
        labels[row["fused_label"]] += 1
        batch.append(row)
        if len(batch) >= batch_size:
            flush()
    flush()
    scored = sum(labels.values())
    with Session(engine) as s:
        s.exec(delete(PhotoScore).where(col(PhotoScore.models) != models))
        for label, n in labels.items():
            s.exec(
                update(PhotoScore)
                .where(col(PhotoScore.fused_label) == label, col(PhotoScore.models) == models)
                .values(rarity=rarity(n, scored))
            )
        s.commit()
    return written


def store_label_issues(session: Session, issues: Iterable[tuple[int, float, str]]) -> int:
    """Set ``label_issue`` (0..1, higher = the label is more likely wrong) and
    ``label_issue_reason`` of the photos in ``issues`` (``(image_id, score, reason)``), clear them
    on every other row, and commit. Photos without a ``photo_scores`` row are skipped.

    Returns:
        The number of rows given a score.

    Raises:
        ValueError: a score outside 0..1 (nothing is changed).
    """
    rows = [(int(i), float(score), str(why)) for i, score, why in issues]
    bad = [(i, sc) for i, sc, _ in rows if not 0.0 <= sc <= 1.0]
    if bad:
        raise ValueError(f"label-issue scores must be in 0..1; photo {bad[0][0]} has {bad[0][1]}")
    session.exec(
        update(PhotoScore)
        .where(col(PhotoScore.label_issue).is_not(None))
        .values(label_issue=None, label_issue_reason=None)
    )
    stored = 0
    for image_id, score, why in rows:
        stored += session.exec(
            update(PhotoScore)
            .where(col(PhotoScore.image_id) == image_id)
            .values(label_issue=score, label_issue_reason=why)
        ).rowcount
    session.commit()
    return stored


__all__ = [
    "QUEUE_KINDS",
    "QueueItem",
    "next_in_queue",
    "queue_items",
    "reason",
    "refresh_scores",
    "score_row",
    "store_label_issues",
]
