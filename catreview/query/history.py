"""An annotator's recent decisions, undo, a photo's review history and jumping to a photo.

Undo keeps the history append-only: undoing review ``R`` appends a *new* review that replaces
``R`` (the same compare-and-set as every review, :func:`catreview.data.reviews.append_review`):

- ``R`` replaced an earlier review ``P``: the new review restores ``P``'s label. Its source is
  :data:`UNDO_SOURCE` (a human decision again), or :data:`~catreview.data.db.IMPORT_SOURCE` when
  ``P`` was an imported label, so the photo is unverified again and back in the review queues.
- ``R`` was the photo's first review (no imported label): there is no label to restore, so the
  undo row (source :data:`UNDO_SOURCE`, label :data:`NO_DECISION`, ``previous_label`` = ``R``'s
  label) replaces ``R`` in the chain and the photo's current review, label and source are
  cleared: the photo is unreviewed again (counts and ``photo_scores.open`` follow in the same
  transaction). Its next review starts a new chain (``replaces_review_id`` NULL).

"The annotator's last decision" is their newest review with a human source other than
:data:`UNDO_SOURCE` that is still its photo's current review: decisions already undone, or
changed since by someone else, are skipped (pressing undo again goes one decision further back).
Every query here is indexed: ``reviews(annotator, id)`` (``ix_reviews_annotator_id``), primary
keys, ``reviews.image_id``; :func:`find_photo` by file name is the exception (see there).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePath

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.data import counts
from catreview.data.db import IMPORT_SOURCE, ImageRecord, PhotoScore, Review, utcnow
from catreview.data.reviews import ReviewConflictError, ReviewError, append_review, history, is_human

UNDO_SOURCE = "undo"
"""``Review.source`` of a review written by :func:`undo_last` (a human action)."""

NO_DECISION = "(no decision)"
"""``Review.label`` of an undo row that took a photo back to no label at all (it is never a
photo's current review, so no label reader sees it)."""

DEFAULT_LIMIT = 10
"""Recent decisions listed beside the photo."""


@dataclass(frozen=True)
class Decision:
    """One of an annotator's reviews, as listed beside the photo.

    ``time`` is ISO 8601 UTC to the second; ``current``: the review is still the photo's current
    one (false once undone or changed by anyone since); ``file_name`` is the photo's base name.
    """

    review_id: int
    image_id: int
    file_name: str
    label: str
    previous_label: str | None
    time: str
    current: bool
    blind: bool


@dataclass(frozen=True)
class HistoryEntry:
    """One review of a photo (oldest first in :func:`photo_history`); ``time`` ISO 8601 UTC."""

    review_id: int
    label: str
    previous_label: str | None
    annotator: str
    source: str
    time: str
    note: str | None
    blind: bool


@dataclass(frozen=True)
class UndoResult:
    """What :func:`undo_last` did: the undone review and the photo's label now (``None``: no
    label, the photo is unreviewed again) with its source (``None`` likewise)."""

    image_id: int
    undone_review_id: int
    undone_label: str
    restored_label: str | None
    restored_source: str | None
    review_id: int


def _aware_utc(t: datetime) -> datetime:
    """``t`` as an aware UTC time (SQLite hands stored times back naive, in UTC)."""
    return t.astimezone(UTC) if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _time(review: Review) -> str:
    return review.created_at.strftime("%Y-%m-%d %H:%M:%S")


def _decisions_query(annotator: str):
    """The annotator's own decisions (human sources, no undo rows), newest first."""
    return (
        select(Review, ImageRecord.path, ImageRecord.current_review_id)
        .join(ImageRecord, col(ImageRecord.id) == col(Review.image_id))
        .where(
            col(Review.annotator) == annotator,
            col(Review.source).not_in([UNDO_SOURCE, IMPORT_SOURCE]),
        )
        .order_by(col(Review.id).desc())
    )


def recent_decisions(engine: Engine, annotator: str, limit: int = DEFAULT_LIMIT) -> list[Decision]:
    """The annotator's newest ``limit`` decisions (reviews they made, undo rows left out), newest
    first; an empty annotator name gives ``[]``. One query on ``reviews(annotator, id)`` joined to
    ``images`` by primary key.

    Raises:
        ValueError: ``limit`` < 1.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    annotator = (annotator or "").strip()
    if not annotator:
        return []
    with Session(engine) as s:
        rows = s.exec(_decisions_query(annotator).limit(limit)).all()
    return [
        Decision(
            review_id=int(r.id or 0),
            image_id=r.image_id,
            file_name=PurePath(path).name,
            label=r.label,
            previous_label=r.previous_label,
            time=_time(r),
            current=head == r.id,
            blind=bool(r.blind),
        )
        for r, path, head in rows
    ]


def photo_history(engine: Engine, image_id: int) -> list[HistoryEntry]:
    """Every review of photo ``image_id``, oldest first (undo rows included), on the
    ``reviews.image_id`` index; ``[]`` for a photo without reviews or an unknown id."""
    with Session(engine) as s:
        return [
            HistoryEntry(
                review_id=int(r.id or 0),
                label=r.label,
                previous_label=r.previous_label,
                annotator=r.annotator,
                source=r.source,
                time=_time(r),
                note=r.note,
                blind=bool(r.blind),
            )
            for r in history(s, image_id)
        ]


def undo_last(engine: Engine, annotator: str) -> UndoResult:
    """Undo the annotator's last decision still in effect by appending a review (module docstring).

    Raises:
        ReviewError: no annotator name, or nothing of theirs left to undo.
        ReviewConflictError: the photo was reviewed by someone else while undoing (nothing written).
    """
    annotator = (annotator or "").strip()
    if not annotator:
        raise ReviewError("enter your annotator name before undoing")
    with Session(engine) as s:
        q = (
            select(Review)
            .join(ImageRecord, col(ImageRecord.current_review_id) == col(Review.id))
            .where(
                col(Review.annotator) == annotator,
                col(Review.source).not_in([UNDO_SOURCE, IMPORT_SOURCE]),
            )
            .order_by(col(Review.id).desc())
            .limit(1)
        )
        target = s.exec(q).first()
        if target is None or target.id is None:
            raise ReviewError(f"nothing to undo: {annotator} has no decision still in effect")
        image_id, undone_id, undone_label = target.image_id, target.id, target.label
        note = f"undo of review #{undone_id} by {annotator}"
        if target.replaces_review_id is not None:
            prev = s.get(Review, target.replaces_review_id)
            assert prev is not None  # replaces_review_id references a stored review
            source = IMPORT_SOURCE if prev.source == IMPORT_SOURCE else UNDO_SOURCE
            row = append_review(s, image_id, prev.label, annotator, replaces=undone_id, note=note, source=source)
            if row is None or row.id is None:
                s.rollback()
                raise ReviewConflictError(image_id, None)
            s.commit()
            return UndoResult(image_id, undone_id, undone_label, prev.label, source, row.id)
        row_id = _clear_first_review(s, target, annotator, note)
        s.commit()
        return UndoResult(image_id, undone_id, undone_label, None, None, row_id)


def _clear_first_review(session: Session, target: Review, annotator: str, note: str) -> int:
    """Append the undo row of a photo's first review and clear the photo's current review
    (compare-and-set on ``current_review_id``), in the session's transaction (not committed)."""
    moved = session.exec(
        update(ImageRecord)
        .where(col(ImageRecord.id) == target.image_id, col(ImageRecord.current_review_id) == target.id)
        .values(current_review_id=None, current_label=None, current_source=None)
    ).rowcount
    if moved != 1:
        session.rollback()
        raise ReviewConflictError(target.image_id, None)
    row = Review(
        image_id=target.image_id,
        annotator=annotator,
        label=NO_DECISION,
        previous_label=target.label,
        replaces_review_id=target.id,
        note=note,
        source=UNDO_SOURCE,
        created_at=max(utcnow(), _aware_utc(target.created_at)),  # times never decrease along a chain
    )
    session.add(row)
    session.flush()
    counts.bump(session, reviewed=-1, verified=-int(is_human(target.source)))
    session.exec(update(PhotoScore).where(col(PhotoScore.image_id) == target.image_id).values(open=True))
    assert row.id is not None  # flushed
    return row.id


def find_photo(engine: Engine, text: str) -> int | None:
    """The photo named by ``text``: an id (``"12"`` or ``"#12"``), an absolute path as stored, or a
    file name (the lowest id among photos whose path ends with ``/<name>``); ``None`` when none.

    Ids and full paths are primary-key / exact lookups; a bare file name is matched with a
    suffix ``LIKE`` (no index serves it: one scan of ``images``, about 50 ms at 127K photos),
    which is acceptable for an explicit jump, never done per click.
    """
    text = (text or "").strip()
    if not text:
        return None
    digits = text.removeprefix("#")
    with Session(engine) as s:
        if digits.isdigit():
            found = s.get(ImageRecord, int(digits))
            if found is not None:
                return found.id
        exact = s.exec(select(ImageRecord.id).where(col(ImageRecord.path) == text).limit(1)).first()
        if exact is not None:
            return exact
        name = PurePath(text).name
        escaped = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return s.exec(
            select(ImageRecord.id)
            .where(col(ImageRecord.path).like(f"%/{escaped}", escape="\\"))
            .order_by(col(ImageRecord.id))
            .limit(1)
        ).first()
