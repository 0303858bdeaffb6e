"""The overlap round: a share of photos labelled by ``k`` annotators blind to each other, then
agreed or adjudicated.

An admin starts a round (:func:`start_round`) on a share of the photos that have no human
decision yet, chosen by their sha256 (a stable, seedless sample: bytes 8-16 read as a number in
[0, 1), independent of the ``random`` queue's key). While a photo's round is ``open`` a save is a
**vote** (:func:`cast_vote`, one per annotator; a later save by the same person changes it), and no
one sees another's vote. With ``k`` votes the photo is ``agreed`` (all equal: a review with source
``consensus`` records the label, so exports and training use it) or ``disputed``. A reviewer
settles a disputed photo (:func:`adjudicate`: a review with source ``adjudication``). The votes
stay in ``overlap_votes`` for the agreement figures (:mod:`catreview.evaluate.agreement`).

Every lookup is by primary key or on ``ix_overlap_items_status_image``; nothing reads a whole table
per click.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from catreview.data.db import IMPORT_SOURCE, ImageRecord, OverlapItem, OverlapVote, Review, utcnow
from catreview.data.labels import BreedVocabulary
from catreview.data.reviews import ReviewError, checked_decision, record_review

CONSENSUS_SOURCE = "consensus"
ADJUDICATION_SOURCE = "adjudication"
Status = Literal["open", "agreed", "disputed", "adjudicated"]


class OverlapError(ReviewError):
    """A vote or adjudication that cannot be recorded (no round on the photo, already settled)."""


def overlap_key(sha256: str) -> float:
    """The photo's place in [0, 1) for overlap sampling: bytes 8-16 of its sha256 (hex chars 16-32)."""
    return int(sha256[16:32], 16) / 2**64


@dataclass(frozen=True)
class VoteOutcome:
    """What a vote did: the photo's ``status`` after it, ``votes`` of ``k``, and the review written
    when the votes agreed (``None`` otherwise)."""

    status: Status
    votes: int
    k: int
    review: Review | None = None


def start_round(session: Session, share: float, k: int = 2, *, batch_size: int = 5000) -> int:
    """Put the ``share`` (0 < share <= 1) of decodable photos without a human decision whose
    :func:`overlap_key` is below ``share`` into the round (photos already in one are kept as
    they are); commits and returns how many were added. One pass over ``images`` in id order
    (an admin action, not a click).

    Raises:
        ValueError: ``share`` not in (0, 1] or ``k`` < 2.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], not {share}")
    if k < 2:
        raise ValueError(f"an overlap round needs k >= 2 annotators per photo, not {k}")
    added, last = 0, 0
    while True:
        rows = session.exec(
            select(ImageRecord.id, ImageRecord.sha256, ImageRecord.current_source)
            .where(col(ImageRecord.error).is_(None), col(ImageRecord.id) > last)
            .order_by(col(ImageRecord.id))
            .limit(batch_size)
        ).all()
        if not rows:
            break
        last = int(rows[-1][0] or 0)
        wanted = [
            int(i or 0) for i, sha, src in rows if (src is None or src == IMPORT_SOURCE) and overlap_key(sha) < share
        ]
        if wanted:
            have = set(session.exec(select(OverlapItem.image_id).where(col(OverlapItem.image_id).in_(wanted))))
            new = [OverlapItem(image_id=i, k=k) for i in wanted if i not in have]
            session.add_all(new)
            added += len(new)
    session.commit()
    return added


def item(session: Session, image_id: int) -> OverlapItem | None:
    """The photo's overlap row, or ``None`` when it is not in the round (a primary-key read)."""
    return session.get(OverlapItem, image_id)


def votes_of(session: Session, image_id: int) -> list[OverlapVote]:
    """The photo's votes, oldest first (for reviewers; annotators never see others' votes)."""
    q = select(OverlapVote).where(OverlapVote.image_id == image_id).order_by(col(OverlapVote.id))
    return list(session.exec(q))


def cast_vote(
    session: Session,
    image_id: int,
    label: str,
    annotator: str,
    *,
    vocabulary: BreedVocabulary,
    note: str | None = None,
) -> VoteOutcome:
    """Record ``annotator``'s blind vote on an ``open`` overlap photo and commit; with ``k`` votes,
    settle it (all equal: a ``consensus`` review by this annotator; else ``disputed``).

    Raises:
        OverlapError: the photo is not in the round, or is no longer open.
        catreview.data.reviews.ReviewError: empty annotator or unknown label.
    """
    annotator, canonical = checked_decision(annotator, label, vocabulary)
    # Lock the item row first (UPDATE ... RETURNING), so concurrent votes on one photo are serialised.
    locked = session.exec(
        update(OverlapItem)
        .where(col(OverlapItem.image_id) == image_id)
        .values(votes=OverlapItem.votes)
        .returning(col(OverlapItem.status), col(OverlapItem.k))
    ).first()
    if locked is None:
        session.rollback()
        raise OverlapError(f"photo {image_id} is not in the overlap round")
    status, k = locked
    if status != "open":
        session.rollback()
        raise OverlapError(f"photo {image_id} is {status} in the overlap round; a reviewer settles it")
    mine = session.exec(
        select(OverlapVote).where(OverlapVote.image_id == image_id, OverlapVote.annotator == annotator)
    ).first()
    if mine is None:
        session.add(OverlapVote(image_id=image_id, annotator=annotator, label=canonical, note=note))
    else:
        mine.label, mine.note, mine.created_at = canonical, note, utcnow()
        session.add(mine)
    session.flush()
    labels = list(session.exec(select(OverlapVote.label).where(OverlapVote.image_id == image_id)))
    row = session.get(OverlapItem, image_id)
    assert row is not None  # locked above
    row.votes = len(labels)
    if len(labels) < k:
        session.add(row)
        session.commit()
        return VoteOutcome("open", len(labels), k)
    if len(set(labels)) > 1:
        row.status = "disputed"
        session.add(row)
        session.commit()
        return VoteOutcome("disputed", len(labels), k)
    row.status = "agreed"
    session.add(row)
    session.flush()
    # One transaction with the vote: record_review chains after the photo's head (the imported
    # label, if any) and commits; the item row lock taken above keeps other votes out meanwhile.
    review = record_review(
        session,
        image_id,
        canonical,
        annotator,
        vocabulary=vocabulary,
        note=f"overlap round: {len(labels)} annotators agreed",
        source=CONSENSUS_SOURCE,
    )
    return VoteOutcome("agreed", len(labels), k, review)


def my_vote(session: Session, image_id: int, annotator: str) -> OverlapVote | None:
    """``annotator``'s vote on the photo, or ``None`` (the unique (image, annotator) key)."""
    q = select(OverlapVote).where(OverlapVote.image_id == image_id, OverlapVote.annotator == annotator)
    return session.exec(q).first()


def withdraw_vote(session: Session, image_id: int, annotator: str) -> OverlapVote:
    """Delete ``annotator``'s vote on a photo still ``open`` in the round (the Review tab's undo)
    and commit; returns the deleted vote.

    Raises:
        OverlapError: no such vote, or the photo is no longer open (settled votes stay).
    """
    locked = session.exec(
        update(OverlapItem)
        .where(col(OverlapItem.image_id) == image_id)
        .values(votes=OverlapItem.votes)
        .returning(col(OverlapItem.status))
    ).first()
    vote = my_vote(session, image_id, annotator)
    if locked is None or vote is None:
        session.rollback()
        raise OverlapError(f"{annotator} has no vote on photo {image_id} to withdraw")
    if locked[0] != "open":
        session.rollback()
        raise OverlapError(f"photo {image_id} is {locked[0]} in the overlap round: its votes are settled")
    session.delete(vote)
    row = session.get(OverlapItem, image_id)
    assert row is not None  # locked above
    row.votes = max(0, row.votes - 1)
    session.add(row)
    session.commit()
    return vote


def adjudicate(
    session: Session, image_id: int, label: str, reviewer: str, *, vocabulary: BreedVocabulary, note: str | None = None
) -> Review:
    """A reviewer's decision on a ``disputed`` photo: an ``adjudication`` review (the label exports
    and training use) and the photo marked ``adjudicated``, in one transaction.

    Raises:
        OverlapError: the photo is not disputed.
        catreview.data.reviews.ReviewError: unknown label.
    """
    # A compare-and-set on the item row: of two reviewers deciding at once, one moves it from
    # "disputed" and records the review; the other finds it adjudicated and is refused.
    moved = session.exec(
        update(OverlapItem)
        .where(col(OverlapItem.image_id) == image_id, col(OverlapItem.status) == "disputed")
        .values(status="adjudicated")
        .returning(col(OverlapItem.image_id))
    ).first()
    if moved is None:
        session.rollback()
        row = session.get(OverlapItem, image_id)
        state = "not in the overlap round" if row is None else row.status
        raise OverlapError(f"photo {image_id} is {state}; only disputed photos are adjudicated")
    return record_review(
        session,
        image_id,
        label,
        reviewer,
        vocabulary=vocabulary,
        note=note or "adjudicated",
        source=ADJUDICATION_SOURCE,
    )


def next_for(session: Session, annotator: str, after: int | None = None) -> int | None:
    """The next ``open`` overlap photo (by id, after ``after``, wrapping) that ``annotator`` has
    not voted on, or ``None``. Index ``ix_overlap_items_status_image`` plus the votes' unique
    (image, annotator) key."""
    voted = select(OverlapVote.image_id).where(
        OverlapVote.annotator == annotator, OverlapVote.image_id == OverlapItem.image_id
    )
    q = select(OverlapItem.image_id).where(OverlapItem.status == "open", ~voted.exists())
    ident = col(OverlapItem.image_id)
    if after is not None:
        found = session.exec(q.where(ident > after).order_by(ident).limit(1)).first()
        if found is not None:
            return int(found)
    found = session.exec(q.order_by(ident).limit(1)).first()
    return int(found) if found is not None else None


def disputed(session: Session, *, after: int | None = None, limit: int = 50) -> list[int]:
    """Ids of ``disputed`` photos (the adjudication queue), by id after ``after``."""
    q = select(OverlapItem.image_id).where(OverlapItem.status == "disputed")
    if after is not None:
        q = q.where(col(OverlapItem.image_id) > after)
    return [int(i) for i in session.exec(q.order_by(col(OverlapItem.image_id)).limit(limit))]


def round_votes(session: Session) -> tuple[list[tuple[int, str, str]], dict[int, str]]:
    """``([(image_id, annotator, label), ...], {image_id: final label})``: every vote of the round
    and the label each ``adjudicated`` photo ended with (its current label: a reviewer's decision,
    the reference for per-annotator accuracy; a consensus label is made of the votes themselves,
    so it is left out). Reads
    the round's rows (an admin report over the round's share of photos, not a per-click query)."""
    votes = [
        (int(i), str(a), str(lab))
        for i, a, lab in session.exec(
            select(OverlapVote.image_id, OverlapVote.annotator, OverlapVote.label).order_by(col(OverlapVote.id))
        )
    ]
    final = session.exec(
        select(OverlapItem.image_id, ImageRecord.current_label)
        .join(ImageRecord, col(ImageRecord.id) == col(OverlapItem.image_id))
        .where(col(OverlapItem.status) == "adjudicated")
    ).all()
    return votes, {int(i): str(lab) for i, lab in final if lab is not None}


def counts(session: Session) -> dict[str, int]:
    """Photos of the round by status (one grouped read of the status index)."""
    rows = session.exec(select(OverlapItem.status, func.count()).group_by(col(OverlapItem.status))).all()
    return {str(s): int(n) for s, n in rows}


__all__ = [
    "ADJUDICATION_SOURCE",
    "CONSENSUS_SOURCE",
    "OverlapError",
    "VoteOutcome",
    "adjudicate",
    "cast_vote",
    "counts",
    "disputed",
    "item",
    "next_for",
    "overlap_key",
    "round_votes",
    "start_round",
    "votes_of",
]
