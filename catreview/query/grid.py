"""The grid for bulk work: keyset pages of decodable photos, filtered, every filter an indexed query.

:func:`grid_page` returns up to ``limit`` (48) photos after photo ``after`` that match a
:class:`GridFilter`: current label, predicted label (of the fused prediction, or of stage 1 or the
VLM), both at once (a confusion-matrix cell: current label x predicted label), or a review queue
(:data:`catreview.query.queues.QUEUE_KINDS`) in that queue's order. Predicted labels and queue keys
are the ``photo_scores`` rows of the active model versions
(:func:`catreview.query.queues.refresh_scores`); a photo without a row has no predicted label yet.

Which index serves which filter (SQLite and PostgreSQL; ``tests/test_grid.py`` checks SQLite's
``EXPLAIN QUERY PLAN``). Each page is one or two ``LIMIT`` queries walking one index from the keyset
position, never a sort of the table:

* no filter: ``ix_images_decodable`` (``images.id WHERE error IS NULL``);
* current label: ``ix_images_current_label`` (``images(current_label, id) WHERE error IS NULL``,
  revision 0003); :data:`UNLABELLED` (no label at all): ``ix_images_unreviewed`` /
  ``ix_images_unverified``;
* predicted label (alone or with a current label, i.e. a confusion cell): ``ix_photo_scores_fused_label``
  or ``ix_photo_scores_stage1_label`` (``(label, image_id)``), the current label checked on the
  image row (primary key); a cell whose current label has fewer photos than its prediction (each
  side counted up to :data:`CELL_PROBE`, two ``LIMIT`` ranges) walks ``ix_images_current_label``
  instead, the prediction checked on the score row (primary key); the VLM's label (no index of
  its own) is always filtered on the rows of the current-label index, so a VLM cell needs a
  current label;
* a queue: its partial index on ``photo_scores`` (``(key, image_id) WHERE open``) walked in queue
  order from the ``after`` photo's key (one primary-key read), other filters checked per row;
  from a position, two ``LIMIT`` ranges: the photos tied with that key past ``after``, then the
  later keys (not one row-value range ``(key, id) > (s, a)``, which SQLite serves with its leading
  column only, walking every tied photo: many share a zero disagreement or a class's rarity);
  ``"import"``: ``ix_images_unverified`` in id order.

Every id bound of a page is stated on both joined tables (``images.id`` and
``photo_scores.image_id``; in the outer join's ``ON`` clause where photos without a score row are
kept): PostgreSQL does not carry an inequality across a join, and its merge join would otherwise
walk the other table's primary key from the first row up to ``after`` (``tests/test_grid.py``
checks the rows each plan node reads on PostgreSQL).

A small confusion cell whose label and prediction are both common (both over
:data:`CELL_PROBE` photos) still walks the prediction's rows until its page is full or they end:
up to every photo of that prediction for a near-empty cell (a schema change would make it one range: ``current_label`` on
``photo_scores`` with a ``(fused_label, current_label, image_id)`` index).

Bulk assignment (:class:`BulkReviewError`) lives with the app's
:meth:`catreview.app.core.ReviewApp.bulk_review`: each selected photo gets its own review.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.sql import ColumnElement, Select
from sqlmodel import Session, col

from catreview.data.db import UNVERIFIED_WHERE, ImageRecord, PhotoScore, Review
from catreview.data.reviews import ReviewError
from catreview.query.queues import ORDERS, QUEUE_KINDS

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "PREDICTED_BY",
    "QUEUE_ORDER",
    "UNLABELLED",
    "BulkReviewError",
    "GridFilter",
    "GridItem",
    "GridPage",
    "grid_page",
]

DEFAULT_LIMIT = 48
"""Photos per grid page (the issue's 48: 6 rows of 8 thumbnails)."""
MAX_LIMIT = 500
"""Largest page :func:`grid_page` serves."""
UNLABELLED = "(no label)"
"""The current-label filter value of photos without any label (neither imported nor reviewed)."""
PREDICTED_BY = ("fused", "stage 1", "VLM")
"""Whose prediction the predicted-label filter reads (``photo_scores`` columns ``fused_label``,
``stage1_label``, ``vlm_label``); the names are the evaluation report's stages."""

QUEUE_ORDER: dict[str, tuple[str, bool]] = {kind: (o.column.key, o.descending) for kind, o in ORDERS.items()}
"""Queue kind -> (``photo_scores`` key column, highest first) of the queues served by
``photo_scores``' partial indexes: the orders of :data:`catreview.query.queues.ORDERS` (so the
grid and the Review tab's queue agree); ``"import"`` is import (id) order of the unverified photos."""


@dataclass(frozen=True)
class GridFilter:
    """What the grid shows; every field is optional (all ``None``: every decodable photo).

    Attributes:
        label: the current label (imported or reviewed; a class name, ``Not a cat``/``Unsure``,
            or :data:`UNLABELLED`).
        predicted: the predicted label of ``predicted_by`` (a class name, or ``"other"`` for a
            VLM / fused "none of the candidates").
        predicted_by: one of :data:`PREDICTED_BY` (default ``"fused"``).
        queue: a queue kind (:data:`catreview.query.queues.QUEUE_KINDS`): only photos open in
            that queue (no human decision yet), in its order (no wrapping: the last page ends).
    """

    label: str | None = None
    predicted: str | None = None
    predicted_by: str = "fused"
    queue: str | None = None

    def check(self) -> None:
        """Raise ``ValueError`` with a one-line reason when the filter cannot be served."""
        if self.predicted_by not in PREDICTED_BY:
            raise ValueError(f"unknown predictor {self.predicted_by!r}: use one of {', '.join(PREDICTED_BY)}")
        if self.queue is not None and self.queue not in QUEUE_KINDS:
            raise ValueError(f"unknown queue {self.queue!r}: use one of {', '.join(QUEUE_KINDS)}")
        if self.predicted is not None and self.predicted_by == "VLM" and self.label is None and self.queue is None:
            raise ValueError("filtering by the VLM's label needs a current label too (a confusion-matrix cell)")


@dataclass(frozen=True)
class GridItem:
    """One photo of a grid page.

    Attributes:
        image_id: the photo's id.
        sha256: content hash (names its thumbnail, :mod:`catreview.query.thumbs`).
        path: the stored file.
        current_label: the current label, ``None`` when it has none.
        current_review_id: the review behind it (the ``replaces`` of a bulk review made from this
            page, so a photo reviewed meanwhile is reported as a conflict), ``None`` when none.
        current_source: ``"import"`` for an imported label, else who decided (``"ui"``, ``"grid"``...).
        predicted: the predicted label of the filter's ``predicted_by`` (``None`` without a score row).
        predicted_prob: its probability in [0, 1], or ``None``.
    """

    image_id: int
    sha256: str
    path: str
    current_label: str | None
    current_review_id: int | None
    current_source: str | None
    predicted: str | None
    predicted_prob: float | None

    @property
    def caption(self) -> str:
        """``"#12 Persian → Exotic Shorthair 0.83"``: id, current label (or "no label"), prediction."""
        label = self.current_label or "no label"
        pred = (
            f" → {self.predicted} {self.predicted_prob:.2f}"
            if self.predicted and self.predicted_prob is not None
            else ""
        )
        return f"#{self.image_id} {label}{pred}"


@dataclass(frozen=True)
class GridPage:
    """A page of :func:`grid_page`: ``items`` in the filter's order; ``next_after`` is the
    ``after`` of the next page (``None`` on the last page)."""

    items: list[GridItem]
    next_after: int | None
    filter: GridFilter = field(default_factory=GridFilter)

    @property
    def ids(self) -> list[int]:
        """The photos' ids in page order."""
        return [i.image_id for i in self.items]

    def seen(self) -> dict[int, int | None]:
        """``{image_id: current_review_id}``: what a bulk review from this page replaces."""
        return {i.image_id: i.current_review_id for i in self.items}


class BulkReviewError(ReviewError):
    """Some photos of a bulk review were not saved (the others were, each its own review).

    Attributes:
        saved: the reviews that were stored.
        failed: ``(image_id, reason)`` of each photo that was not (a review made meanwhile by
            someone else, a photo that failed to decode, an unknown id).
    """

    def __init__(self, saved: Sequence[Review], failed: Sequence[tuple[int, str]]) -> None:
        self.saved = list(saved)
        self.failed = list(failed)
        first = self.failed[0][1] if self.failed else ""
        more = f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
        super().__init__(f"saved {len(self.saved)}, not saved {len(self.failed)}: {first}{more}")


def _predicted_column(by: str) -> Any:
    return {"fused": PhotoScore.fused_label, "stage 1": PhotoScore.stage1_label, "VLM": PhotoScore.vlm_label}[by]


def _predicted_prob(by: str) -> Any:
    return {"fused": PhotoScore.fused_prob, "stage 1": PhotoScore.stage1_prob, "VLM": PhotoScore.vlm_prob}[by]


CELL_PROBE = 1000
"""Rows counted (at most) on each side of a confusion cell to choose which index to walk."""


def _bounded_count(session: Session, ids: Select[Any]) -> int:
    """``min(CELL_PROBE, rows of ids)``: one ``LIMIT`` range of an index, never the whole table."""
    return int(session.execute(select(func.count()).select_from(ids.limit(CELL_PROBE).subquery())).scalar_one())


def _walk_label_side(session: Session, flt: GridFilter) -> bool:
    """Whether a confusion cell (current label x fused / stage-1 prediction) is served by walking
    ``ix_images_current_label`` (checking the prediction per row) rather than the prediction's
    index (checking the label per row): when fewer photos carry the label than the prediction,
    counted up to :data:`CELL_PROBE` on each side. A rare label inside a common prediction then
    walks the label's few rows instead of the whole prediction."""
    if flt.label is None or flt.label == UNLABELLED or flt.predicted is None:
        return False
    label_side = _bounded_count(
        session,
        select(col(ImageRecord.id)).where(
            col(ImageRecord.error).is_(None), col(ImageRecord.current_label) == flt.label
        ),
    )
    pred = _predicted_column(flt.predicted_by)
    return label_side < _bounded_count(session, select(col(PhotoScore.image_id)).where(pred == flt.predicted))


def _label_condition(label: str) -> ColumnElement[bool]:
    if label == UNLABELLED:
        return col(ImageRecord.current_review_id).is_(None)
    return col(ImageRecord.current_label) == label


def _columns(by: str) -> Select[Any]:
    return select(
        col(ImageRecord.id),
        col(ImageRecord.sha256),
        col(ImageRecord.path),
        col(ImageRecord.current_label),
        col(ImageRecord.current_review_id),
        col(ImageRecord.current_source),
        _predicted_column(by),
        _predicted_prob(by),
    )


def grid_page(engine: Engine, flt: GridFilter, *, after: int | None = None, limit: int = DEFAULT_LIMIT) -> GridPage:
    """One page of the grid (see the module docstring for the index each filter walks).

    Args:
        engine: the database.
        flt: the filter.
        after: the last photo of the previous page (:attr:`GridPage.next_after`); ``None``: the
            first page. In a queue, a photo that is no longer open restarts the queue.
        limit: photos per page, 1..:data:`MAX_LIMIT`.

    Returns:
        A :class:`GridPage` (empty when nothing matches).

    Raises:
        ValueError: ``limit`` out of range, or a filter that cannot be served (:meth:`GridFilter.check`).
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be in 1..{MAX_LIMIT}, got {limit}")
    flt.check()
    by = flt.predicted_by
    # Each id bound is stated on both joined tables: PostgreSQL does not carry an inequality across
    # the join, and a merge join would otherwise walk the other table's primary key from its first
    # row up to ``after`` (half the table on average; a photo without a score row stays, the bound
    # being in the outer join's ON clause).
    joined = col(PhotoScore.image_id) == col(ImageRecord.id)
    if after is not None and (flt.queue is None or flt.queue == "import"):
        joined = and_(joined, col(PhotoScore.image_id) > after)
    q = _columns(by).select_from(ImageRecord).outerjoin(PhotoScore, joined)
    head: list[Select[Any]] = []  # ranges served before ``q``, each its own LIMIT query, in page order
    with Session(engine) as session:
        if flt.queue is not None and flt.queue != "import":
            key_name, desc = QUEUE_ORDER[flt.queue]
            key = getattr(PhotoScore, key_name)
            base = (
                _columns(by).select_from(PhotoScore).join(ImageRecord, col(ImageRecord.id) == col(PhotoScore.image_id))
            )
            base = base.where(col(PhotoScore.open))
            if flt.queue == "label_errors":
                base = base.where(col(key).is_not(None))
            pos = None
            if after is not None:
                pos = session.execute(
                    select(key).where(col(PhotoScore.image_id) == after, col(PhotoScore.open))
                ).first()
            order = (col(key).desc(), col(PhotoScore.image_id).desc()) if desc else (col(key), col(PhotoScore.image_id))
            if pos is not None and pos[0] is not None:
                # two index ranges instead of the row value (key, id) < (s, a): SQLite serves that
                # with its leading column only and would walk every photo tied with ``after``'s key
                # (most photos share a zero disagreement or their class's rarity)
                ident, image = col(PhotoScore.image_id), col(ImageRecord.id)
                past = (ident < after, image < after) if desc else (ident > after, image > after)
                head = [base.where(col(key) == pos[0], *past).order_by(*order)]
                base = base.where(col(key) < pos[0] if desc else col(key) > pos[0])
            q = base.order_by(*order)
            id_col: Any = PhotoScore.image_id
        elif flt.predicted is not None and not (by == "VLM" or flt.queue == "import" or _walk_label_side(session, flt)):
            pred = _predicted_column(by)
            q = (
                _columns(by)
                .select_from(PhotoScore)
                .join(ImageRecord, col(ImageRecord.id) == col(PhotoScore.image_id))
                .where(pred == flt.predicted)
                .order_by(pred, col(PhotoScore.image_id))
            )
            id_col = PhotoScore.image_id
        else:
            if flt.queue == "import":
                q = q.where(text(UNVERIFIED_WHERE))
            elif flt.label is None or flt.label == UNLABELLED:
                q = q.where(col(ImageRecord.error).is_(None))
            else:  # matches ix_images_current_label's WHERE
                q = q.where(col(ImageRecord.error).is_(None), col(ImageRecord.current_label) == flt.label)
                q = q.order_by(col(ImageRecord.current_label))
            q = q.order_by(col(ImageRecord.id))
            id_col = ImageRecord.id
        if (flt.queue is None or flt.queue == "import") and after is not None:
            q = q.where(col(id_col) > after)
            if id_col is PhotoScore.image_id:
                q = q.where(col(ImageRecord.id) > after)
        conditions: list[ColumnElement[bool]] = []
        if flt.label is not None:
            conditions.append(_label_condition(flt.label))
        if flt.predicted is not None:
            conditions.append(_predicted_column(by) == flt.predicted)
        rows: list[Any] = []
        for part in [*head, q]:
            if conditions:
                part = part.where(and_(*conditions))
            rows += session.execute(part.limit(limit + 1 - len(rows))).all()
            if len(rows) > limit:
                break
    items = [
        GridItem(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], None if r[7] is None else float(r[7])) for r in rows
    ]
    more = len(items) > limit
    items = items[:limit]
    return GridPage(items, items[-1].image_id if more and items else None, flt)
