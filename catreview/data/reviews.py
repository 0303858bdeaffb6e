"""Human reviews: append-only decisions chained per photo; an image's current label is its newest review.

Writing a review is a compare-and-set on the image row: the review names the review it replaces
(``replaces_review_id``, unique) and the image's ``current_review_id`` moves from that review to
the new one only if it still points there, all in one transaction. Two concurrent saves of one
photo therefore never fork the history: the second one sees that the head moved and is either
chained after the first (default) or refused with :class:`ReviewConflictError` (when the caller
says which review it was looking at). The first statement of the transaction is that conditional
``UPDATE``, so SQLite takes its write lock (waiting up to the busy timeout) before the review's
time is read, and PostgreSQL locks the photo's row: times never decrease along a chain.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import bindparam, insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from catreview.data import counts
from catreview.data.db import IMPORT_SOURCE, ImageRecord, PhotoScore, Review, utcnow
from catreview.data.labels import BreedVocabulary
from catreview.errors import CatreviewError


class ReviewError(CatreviewError, ValueError):
    """A review that cannot be recorded (unknown label, missing annotator, failed image)."""


class ReviewConflictError(ReviewError):
    """Someone else reviewed the photo after the review the caller was looking at.

    Attributes:
        current: the photo's newest review now.
    """

    def __init__(self, image_id: int, current: Review | None) -> None:
        self.current = current
        if current is None:
            msg = f"photo {image_id} changed while you were saving; reload it and decide again"
        else:
            when = current.created_at.strftime("%Y-%m-%d %H:%M:%S")
            msg = (
                f"photo {image_id} was reviewed meanwhile: {current.annotator} chose {current.label!r} "
                f"at {when} UTC; reload it and decide again"
            )
        super().__init__(msg)


class Head:
    """The type of :data:`HEAD` (a marker, not a review id)."""


HEAD: Final = Head()
"""``replaces=HEAD``: chain the new review after whatever the photo's newest review is."""

MAX_ATTEMPTS = 8
"""Retries of a compare-and-set that lost a race (each loss means another save landed)."""


def latest_review(session: Session, image_id: int) -> Review | None:
    """The photo's newest review (through ``images.current_review_id``: one primary-key read), or ``None``."""
    head = session.exec(select(ImageRecord.current_review_id).where(ImageRecord.id == image_id)).first()
    return session.get(Review, head) if head is not None else None


def current_reviews(session: Session) -> dict[int, Review]:
    """``{image_id: newest Review}`` for every reviewed image, in one query (whole-collection
    reads only: calibration fits, exports; see :func:`iter_current_reviews` to stream)."""
    return {r.image_id: r for r in iter_current_reviews(session)}


def iter_current_reviews(session: Session, *, batch_size: int = 1000) -> Iterator[Review]:
    """Each reviewed photo's newest review, by image id, fetched ``batch_size`` rows at a time."""
    q = (
        select(Review)
        .join(ImageRecord, col(ImageRecord.current_review_id) == col(Review.id))
        .order_by(col(Review.image_id))
        .execution_options(yield_per=batch_size)
    )
    yield from session.exec(q)


def history(session: Session, image_id: int) -> list[Review]:
    """Every review of one photo, oldest first (indexed by ``image_id``)."""
    return list(session.exec(select(Review).where(Review.image_id == image_id).order_by(col(Review.id))))


def _aware_utc(t: datetime) -> datetime:
    """``t`` as an aware UTC time (SQLite hands stored times back naive, in UTC)."""
    return t.astimezone(UTC) if t.tzinfo is not None else t.replace(tzinfo=UTC)


def append_review(
    session: Session,
    image_id: int,
    label: str,
    annotator: str,
    *,
    replaces: int | None,
    note: str | None = None,
    source: str = "ui",
    model_snapshot: dict[str, Any] | None = None,
    blind: bool = False,
) -> Review | None:
    """Append a review of ``image_id`` that replaces review ``replaces`` (``None``: the photo's
    first), in the session's transaction, not committed. ``label`` must already be canonical.

    The same transaction moves the image's current label and source, the running totals
    (``reviewed`` for a first review, ``verified`` when the photo gains or loses a human decision)
    and the photo's ``photo_scores.open`` flag (one primary-key update, when it changes).

    Returns:
        The new review, flushed (it has an id), or ``None`` when the photo's newest review is no
        longer ``replaces`` (nothing was written; roll back or carry on with other photos).
    """
    cond = (
        col(ImageRecord.current_review_id).is_(None)
        if replaces is None
        else col(ImageRecord.current_review_id) == replaces
    )
    moved = session.exec(
        update(ImageRecord)
        .where(col(ImageRecord.id) == image_id, cond)
        .values(current_label=label, current_source=source)
    ).rowcount
    if moved != 1:
        return None
    prev = session.get(Review, replaces) if replaces is not None else None
    now = utcnow()
    if prev is not None and _aware_utc(prev.created_at) > now:
        now = _aware_utc(prev.created_at)  # a clock step back never reorders a chain
    review = Review(
        image_id=image_id,
        annotator=annotator,
        label=label,
        previous_label=prev.label if prev is not None else None,
        replaces_review_id=replaces,
        note=(note or None),
        source=source,
        model_snapshot_json=json.dumps(model_snapshot, ensure_ascii=False) if model_snapshot else None,
        created_at=now,
        blind=blind,
    )
    session.add(review)
    session.flush()
    session.exec(update(ImageRecord).where(col(ImageRecord.id) == image_id).values(current_review_id=review.id))
    verified = int(is_human(source)) - int(prev is not None and is_human(prev.source))
    counts.bump(session, reviewed=int(replaces is None), verified=verified)
    if verified:
        _set_open(session, [image_id], open_=verified < 0)
    return review


def is_human(source: str | None) -> bool:
    """Whether a review ``source`` is a human decision (anything but :data:`IMPORT_SOURCE`)."""
    return source is not None and source != IMPORT_SOURCE


def _set_open(session: Session, image_ids: list[int], *, open_: bool) -> None:
    """Set ``photo_scores.open`` of these photos (rows that do not exist are left absent)."""
    session.exec(update(PhotoScore).where(col(PhotoScore.image_id).in_(image_ids)).values(open=open_))


def append_first_reviews(session: Session, labels: dict[int, str], annotator: str, *, source: str) -> dict[int, int]:
    """Append the first review of many photos (``{image id: canonical label}``) in the session's
    transaction, not committed, in a few statements whatever their number.

    The same compare-and-set as :func:`append_review` with ``replaces=None``: a photo is claimed
    only while its ``current_review_id`` is still ``NULL`` (one ``UPDATE ... RETURNING`` per label,
    which also takes SQLite's write lock / PostgreSQL's row locks), then the reviews are inserted
    (bulk ``INSERT ... RETURNING``), the photos pointed at them (label and source), the reviewed
    (and, for a human ``source``, verified) totals bumped and, for a human source, the photos'
    ``photo_scores.open`` cleared.

    Returns:
        ``{image_id: new review id}``; a photo left out was reviewed already (or meanwhile), or
        does not exist: nothing was written for it.
    """
    if not labels:
        return {}
    conn = session.connection()
    by_label: dict[str, list[int]] = {}
    for image_id, label in labels.items():
        by_label.setdefault(label, []).append(image_id)
    claimed: set[int] = set()
    for label, ids in by_label.items():
        claim = (
            update(ImageRecord)
            .where(col(ImageRecord.id).in_(ids), col(ImageRecord.current_review_id).is_(None))
            .values(current_label=label, current_source=source)
            .returning(col(ImageRecord.id))
        )
        claimed.update(i for i in conn.execute(claim).scalars() if i is not None)
    if not claimed:
        return {}
    now = utcnow()
    rows = [
        {
            "image_id": image_id,
            "annotator": annotator,
            "label": label,
            "previous_label": None,
            "replaces_review_id": None,
            "note": None,
            "source": source,
            "model_snapshot_json": None,
            "created_at": now,
        }
        for image_id, label in labels.items()
        if image_id in claimed
    ]
    inserted = conn.execute(insert(Review).returning(col(Review.id), col(Review.image_id)), rows)
    made = {int(image_id): int(rid) for rid, image_id in inserted if rid is not None}
    point = (
        update(ImageRecord)
        .where(col(ImageRecord.id) == bindparam("b_image"))
        .values(current_review_id=bindparam("b_review"))
    )
    conn.execute(point, [{"b_image": i, "b_review": r} for i, r in made.items()])
    human = is_human(source)
    counts.bump(session, reviewed=len(made), verified=len(made) if human else 0)
    if human:
        _set_open(session, sorted(made), open_=False)
    return made


def checked_decision(annotator: str | None, label: str, vocabulary: BreedVocabulary) -> tuple[str, str]:
    """``(annotator stripped, canonical label)`` of a decision about to be stored.

    Raises:
        ReviewError: empty annotator, or a label not in ``vocabulary`` (aliases accepted).
    """
    annotator = (annotator or "").strip()
    if not annotator:
        raise ReviewError("enter your annotator name before reviewing")
    if label not in vocabulary:
        raise ReviewError(f"unknown label {label!r}: pick one from the breed list")
    return annotator, vocabulary.canonical(label)


def record_review(
    session: Session,
    image_id: int,
    label: str,
    annotator: str,
    *,
    vocabulary: BreedVocabulary,
    note: str | None = None,
    source: str = "ui",
    model_snapshot: dict[str, Any] | None = None,
    replaces: int | Head | None = HEAD,
    blind: bool = False,
) -> Review:
    """Append a review and commit it. ``label`` is canonicalised through ``vocabulary`` (aliases accepted).

    Args:
        source: ``"ui"`` (default) or another human source; :data:`IMPORT_SOURCE` marks an
            imported, unverified label.
        blind: the annotator chose without seeing the model outputs.
        replaces: the review id the caller was looking at (``None``: it saw no review). The
            default :data:`HEAD` chains after the newest review, whatever it is.

    Raises:
        ReviewError: empty annotator, unknown label, or an image that failed to decode.
        ReviewConflictError: ``replaces`` was given and the photo's newest review is another one.
        KeyError: no image with ``image_id``.
    """
    annotator, canonical = checked_decision(annotator, label, vocabulary)
    for _ in range(MAX_ATTEMPTS):
        head = _locked_head(session, image_id, canonical) if isinstance(replaces, Head) else _head(session, image_id)
        if not isinstance(replaces, Head) and head != replaces:
            raise ReviewConflictError(image_id, session.get(Review, head) if head is not None else None)
        try:
            review = append_review(
                session,
                image_id,
                canonical,
                annotator,
                replaces=head,
                note=note,
                source=source,
                model_snapshot=model_snapshot,
                blind=blind,
            )
        except IntegrityError:  # another transaction appended after ``head`` first (unique replaces_review_id)
            review = None
        if review is not None:
            session.commit()
            session.refresh(review)
            return review
        session.rollback()
    raise ReviewConflictError(image_id, latest_review(session, image_id))


def _head(session: Session, image_id: int) -> int | None:
    """The photo's newest review id, read without a lock (the compare-and-set checks it again)."""
    row = session.exec(
        select(ImageRecord.current_review_id, ImageRecord.error, ImageRecord.path).where(ImageRecord.id == image_id)
    ).first()
    if row is None:
        raise KeyError(f"no image with id {image_id}")
    head, error, path = row
    if error is not None:
        raise ReviewError(f"image {path} could not be decoded ({error}); it cannot be labelled")
    return head


def _locked_head(session: Session, image_id: int, label: str) -> int | None:
    """The photo's newest review id, read by an ``UPDATE ... RETURNING`` that first locks the row
    (PostgreSQL row lock, SQLite write lock) until the transaction ends, so the compare-and-set that
    follows cannot lose a race however many annotators save the photo at once."""
    head = session.exec(
        update(ImageRecord)
        .where(col(ImageRecord.id) == image_id, col(ImageRecord.error).is_(None))
        .values(current_label=label)
        .returning(col(ImageRecord.current_review_id))
    ).first()
    if head is None:
        session.rollback()
        _head(session, image_id)  # raises KeyError or ReviewError with the reason
        raise ReviewConflictError(image_id, None)  # it failed to decode, then was re-imported meanwhile
    return head[0]


def review_counts(session: Session) -> tuple[int, int]:
    """``(reviewed, total)`` over images that decoded (the stored running totals: constant time).
    ``reviewed`` counts imported labels too; :func:`catreview.data.counts.totals` has ``verified``."""
    t = counts.totals(session)
    return t.reviewed, t.photos
