"""Reviewed rows: the photos whose latest review names a breed, read from the database for export.

:func:`collect_reviewed_rows` reads plain columns (one query, ~10x faster than ORM objects at
127K rows) into :class:`ReviewedRow` values; :func:`parse_snapshot` decodes a review's stored
model snapshot.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session, col

from catreview.data.db import ImageRecord, Review
from catreview.data.labels import SPECIAL_LABELS, BreedVocabulary


@dataclass
class ReviewedRow:
    """A photo and its latest review, as exports need them.

    ``path`` is the photo's file (absolute, as imported); ``snapshot`` the decoded review
    ``model_snapshot_json`` (``{"stage1": [[label, prob], ...], "vlm": {label: prob} | None,
    "fused": {"label", "probability"}, "model_versions": {...}}``) or ``None``.
    """

    image_id: int | None
    sha256: str
    path: str
    label: str
    annotator: str
    source: str = "ui"
    note: str | None = None
    snapshot: dict[str, Any] | None = None
    snapshot_unreadable: bool = False  # the stored snapshot was not a JSON object (exported without it)


def parse_snapshot(snapshot_json: str | None) -> dict[str, Any] | None:
    """Decode a review's ``model_snapshot_json``; ``None`` when none was stored.

    Raises:
        ValueError: the stored text is not a JSON object (callers export the review without
            predictions and count it, see :func:`collect_reviewed_rows`).
    """
    if not snapshot_json:
        return None
    try:
        value = json.loads(snapshot_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"unreadable model snapshot: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"model snapshot is a {type(value).__name__}, not a JSON object")
    return value


def collect_reviewed_rows(
    session: Session, vocabulary: BreedVocabulary | None = None
) -> tuple[list[ReviewedRow], Counter[str]]:
    """Photos whose latest review names a breed, sorted by sha256, and what was skipped.

    Returns:
        ``(rows, skipped)``; ``skipped`` counts ``"Not a cat"``, ``"Unsure"``, ``"failed
        image"`` (a review on an image that failed to decode) and, when ``vocabulary`` is
        given, ``"unknown label"`` (a label the vocabulary no longer knows).
    """
    # Plain columns, not ORM objects: ~10x faster at 127K rows. Same "latest review = highest
    # id" rule as catreview.data.reviews.current_reviews.
    newest = (
        select(col(Review.image_id), func.max(col(Review.id)).label("rid")).group_by(col(Review.image_id)).subquery()
    )
    columns = (
        *(Review.image_id, Review.label, Review.annotator, Review.source, Review.note, Review.model_snapshot_json),
        *(ImageRecord.sha256, ImageRecord.path, ImageRecord.error),
    )
    stmt = (
        select(*(col(c) for c in columns))
        .join(newest, col(Review.id) == newest.c.rid)
        .outerjoin(ImageRecord, col(ImageRecord.id) == col(Review.image_id))
    )
    rows: list[ReviewedRow] = []
    skipped: Counter[str] = Counter()
    for image_id, label, annotator, source, note, snapshot_json, sha, path, error in session.execute(stmt):
        if label in SPECIAL_LABELS:
            skipped[label] += 1
        elif sha is None or error is not None:
            skipped["failed image"] += 1
        elif vocabulary is not None and label not in vocabulary:
            skipped["unknown label"] += 1
        else:
            try:
                snapshot, unreadable = parse_snapshot(snapshot_json), False
            except ValueError:  # exported without predictions; counted in the summary
                snapshot, unreadable = None, True
            rows.append(
                ReviewedRow(
                    image_id=image_id,
                    sha256=sha,
                    path=path,
                    label=vocabulary.canonical(label) if vocabulary is not None else label,
                    annotator=annotator,
                    source=source,
                    note=note,
                    snapshot=snapshot,
                    snapshot_unreadable=unreadable,
                )
            )
    rows.sort(key=lambda r: r.sha256)
    return rows, skipped


__all__ = ["ReviewedRow", "collect_reviewed_rows", "parse_snapshot"]
