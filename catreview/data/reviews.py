"""Human reviews: append-only decisions; an image's current label is its latest review."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from catreview.data.db import ImageRecord, Review, get_image
from catreview.data.labels import BreedVocabulary
from catreview.errors import CatreviewError


class ReviewError(CatreviewError, ValueError):
    """A review that cannot be recorded (unknown label, missing annotator, failed image)."""


def latest_review(session: Session, image_id: int) -> Review | None:
    """The newest review of an image (highest id), or ``None``."""
    return session.exec(
        select(Review).where(Review.image_id == image_id).order_by(Review.id.desc())  # type: ignore[union-attr]
    ).first()


def current_reviews(session: Session) -> dict[int, Review]:
    """``{image_id: latest Review}`` for every reviewed image, in one query."""
    newest = select(Review.image_id, func.max(Review.id).label("rid")).group_by(col(Review.image_id)).subquery()
    rows = session.exec(select(Review).join(newest, Review.id == newest.c.rid)).all()  # type: ignore[arg-type]
    return {r.image_id: r for r in rows}


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
    commit: bool = True,
) -> Review:
    """Append a review. ``label`` is canonicalised through ``vocabulary`` (aliases accepted).

    Raises:
        ReviewError: empty annotator, unknown label, or an image that failed to decode.
        KeyError: no image with ``image_id``.
    """
    annotator = (annotator or "").strip()
    if not annotator:
        raise ReviewError("enter your annotator name before reviewing")
    image: ImageRecord = get_image(session, image_id)
    if image.error is not None:
        raise ReviewError(f"image {image.path} could not be decoded ({image.error}); it cannot be labelled")
    if label not in vocabulary:
        raise ReviewError(f"unknown label {label!r}: pick one from the breed list")
    canonical = vocabulary.canonical(label)
    prev = latest_review(session, image_id)
    review = Review(
        image_id=image_id,
        annotator=annotator,
        label=canonical,
        previous_label=prev.label if prev else None,
        note=(note or None),
        source=source,
        model_snapshot_json=json.dumps(model_snapshot, ensure_ascii=False) if model_snapshot else None,
    )
    session.add(review)
    if commit:
        session.commit()
        session.refresh(review)
    return review


def review_counts(session: Session) -> tuple[int, int]:
    """``(reviewed, total)`` over images that decoded."""
    total = session.exec(select(func.count()).select_from(ImageRecord).where(ImageRecord.error.is_(None))).one()  # type: ignore[union-attr]
    reviewed = session.exec(select(func.count(func.distinct(Review.image_id)))).one()
    return int(reviewed), int(total)
