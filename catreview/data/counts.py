"""Running totals of the collection (decodable, failed and reviewed photos) in constant time.

Counting rows of a 127K-photo table on every click grows with the collection; the totals live in
one row of ``collection_counts`` instead, changed by :func:`bump` inside the transaction that
inserts or changes the rows they count (the importer, :func:`catreview.data.reviews.record_review`).
:func:`recount` computes them from the tables (one full scan), for migrations and checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from catreview.data.db import IMPORT_SOURCE, CollectionCounts, ImageRecord, insert_ignoring_conflicts


@dataclass(frozen=True)
class Totals:
    """Photo counts: ``photos`` decodable, ``failed`` to decode, ``reviewed`` decodable photos
    with a label (imported or a human decision), ``verified`` decodable photos whose current
    label is a human decision (all >= 0; ``verified <= reviewed <= photos``)."""

    photos: int
    failed: int
    reviewed: int
    verified: int = 0

    @property
    def imported(self) -> int:
        """Decodable photos whose current label is only imported (unverified)."""
        return self.reviewed - self.verified

    @property
    def unverified(self) -> int:
        """Decodable photos without a human decision (no label, or only an imported one)."""
        return self.photos - self.verified


def bump(session: Session, *, photos: int = 0, failed: int = 0, reviewed: int = 0, verified: int = 0) -> None:
    """Add to the totals in the session's open transaction (not committed here). The row is
    created at 0 first if it is missing."""
    if not (photos or failed or reviewed or verified):
        return
    change = (
        update(CollectionCounts)
        .where(col(CollectionCounts.id) == 1)
        .values(
            photos=CollectionCounts.photos + photos,
            failed=CollectionCounts.failed + failed,
            reviewed=CollectionCounts.reviewed + reviewed,
            verified=CollectionCounts.verified + verified,
        )
    )
    if session.exec(change).rowcount == 0:  # first use of this database: create the row, then add
        session.exec(insert_ignoring_conflicts(session, CollectionCounts, ["id"]).values(id=1))
        session.exec(change)


def totals(session: Session) -> Totals:
    """The stored totals (one primary-key read); zeros for an empty database."""
    row = session.get(CollectionCounts, 1)
    return Totals(row.photos, row.failed, row.reviewed, row.verified) if row is not None else Totals(0, 0, 0, 0)


def recount(session: Session) -> Totals:
    """The totals computed from ``images`` (a full scan; migrations and consistency checks)."""
    ok = ImageRecord.error.is_(None)  # type: ignore[union-attr]
    photos = session.exec(select(func.count()).select_from(ImageRecord).where(ok)).one()
    failed = session.exec(select(func.count()).select_from(ImageRecord).where(~ok)).one()
    reviewed = session.exec(
        select(func.count()).select_from(ImageRecord).where(ok, ImageRecord.current_review_id.is_not(None))  # type: ignore[union-attr]
    ).one()
    verified = session.exec(
        select(func.count())
        .select_from(ImageRecord)
        .where(
            ok,
            col(ImageRecord.current_review_id).is_not(None),
            col(ImageRecord.current_source) != IMPORT_SOURCE,
        )
    ).one()
    return Totals(int(photos), int(failed), int(reviewed), int(verified))


def store_recount(session: Session) -> Totals:
    """Replace the stored totals by :func:`recount` (not committed here)."""
    t = recount(session)
    session.exec(insert_ignoring_conflicts(session, CollectionCounts, ["id"]).values(id=1))
    session.exec(
        update(CollectionCounts)
        .where(CollectionCounts.id == 1)  # type: ignore[arg-type]
        .values(photos=t.photos, failed=t.failed, reviewed=t.reviewed, verified=t.verified)
    )
    return t
