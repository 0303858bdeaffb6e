"""Review queues, imported labels as unverified, blind reviews, perceptual hashes (issue 13).

Revision ID: 0003_review_queues
Revises: 0002_scale

What the models gained:

- ``images.current_source``: the ``source`` of the photo's newest review (``"import"`` = an
  imported, unverified label), filled in here from each photo's current review.
- ``images.phash`` (16 hex characters, indexed ``ix_images_phash``): the perceptual hash, empty
  here (computed by a backfill).
- Partial index ``ix_images_current_label`` on ``images(current_label, id)`` where ``error IS
  NULL``: the grid's current-label filter.
- Partial index ``ix_images_unverified`` on ``images(id)`` where ``error IS NULL AND
  (current_review_id IS NULL OR current_source = 'import')``: the next photo without a human decision.
- ``reviews.blind`` (false for every existing review) and index ``ix_reviews_annotator_id`` on
  ``reviews(annotator, id)``.
- ``collection_counts.verified``: decodable photos whose current label is a human decision,
  recounted here as :func:`catreview.data.counts.recount` computes it.
- Table ``photo_scores`` (the review-queue keys per photo), empty here: the app and
  ``python -m catreview predict`` fill it from the stored predictions. Partial indexes ``WHERE
  open`` (SQLite ``open = 1``: how SQLAlchemy renders the condition there) on SQLite and
  PostgreSQL alike, plus two plain label indexes.

Downgrade removes all of it (derived data only; no review is lost, a review's ``blind`` flag is).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_review_queues"
down_revision: str | None = "0002_scale"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNVERIFIED_WHERE = "error IS NULL AND (current_review_id IS NULL OR current_source = 'import')"
OPEN_WHERE = {"sqlite": "open = 1", "postgresql": "open"}
OPEN_INDEXES = {
    "ix_photo_scores_disagreement": ["disagreement", "image_id"],
    "ix_photo_scores_margin": ["fused_margin", "image_id"],
    "ix_photo_scores_rarity": ["rarity", "image_id"],
    "ix_photo_scores_random": ["random_key", "image_id"],
    "ix_photo_scores_label_issue": ["label_issue", "image_id"],
}
PLAIN_INDEXES = {
    "ix_photo_scores_fused_label": ["fused_label", "image_id"],
    "ix_photo_scores_stage1_label": ["stage1_label", "image_id"],
}


def upgrade() -> None:
    op.add_column("images", sa.Column("current_source", sa.String(), nullable=True))
    op.add_column("images", sa.Column("phash", sa.String(length=16), nullable=True))
    op.execute(
        "UPDATE images SET current_source = (SELECT r.source FROM reviews r WHERE r.id = images.current_review_id) "
        "WHERE current_review_id IS NOT NULL"
    )
    op.create_index("ix_images_phash", "images", ["phash"])
    op.create_index(
        "ix_images_current_label",
        "images",
        ["current_label", "id"],
        sqlite_where=sa.text("error IS NULL"),
        postgresql_where=sa.text("error IS NULL"),
    )
    op.create_index(
        "ix_images_unverified",
        "images",
        ["id"],
        sqlite_where=sa.text(UNVERIFIED_WHERE),
        postgresql_where=sa.text(UNVERIFIED_WHERE),
    )

    op.add_column("reviews", sa.Column("blind", sa.Boolean(), nullable=False, server_default=sa.text("false")))
    op.create_index("ix_reviews_annotator_id", "reviews", ["annotator", "id"])

    op.add_column("collection_counts", sa.Column("verified", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE collection_counts SET verified = (SELECT COUNT(*) FROM images WHERE error IS NULL "
        "AND current_review_id IS NOT NULL AND current_source <> 'import')"
    )

    op.create_table(
        "photo_scores",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("open", sa.Boolean(), nullable=False),
        sa.Column("stage1_label", sa.String(), nullable=False),
        sa.Column("stage1_prob", sa.Float(), nullable=False),
        sa.Column("vlm_label", sa.String(), nullable=True),
        sa.Column("vlm_prob", sa.Float(), nullable=True),
        sa.Column("fused_label", sa.String(), nullable=False),
        sa.Column("fused_prob", sa.Float(), nullable=False),
        sa.Column("fused_margin", sa.Float(), nullable=False),
        sa.Column("fused_runner_up", sa.String(), nullable=True),
        sa.Column("disagreement", sa.Float(), nullable=False),
        sa.Column("rarity", sa.Float(), nullable=False),
        sa.Column("label_issue", sa.Float(), nullable=True),
        sa.Column("label_issue_reason", sa.Text(), nullable=True),
        sa.Column("random_key", sa.Float(), nullable=False),
        sa.Column("models", sa.String(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"]),
        sa.PrimaryKeyConstraint("image_id"),
    )
    for name, columns in OPEN_INDEXES.items():
        op.create_index(
            name,
            "photo_scores",
            columns,
            sqlite_where=sa.text(OPEN_WHERE["sqlite"]),
            postgresql_where=sa.text(OPEN_WHERE["postgresql"]),
        )
    for name, columns in PLAIN_INDEXES.items():
        op.create_index(name, "photo_scores", columns)


def downgrade() -> None:
    # plain DROP COLUMN (SQLite >= 3.35 has it natively): a batch rebuild of ``images`` would fail
    # its foreign keys; each dropped column's indexes go first
    op.drop_table("photo_scores")  # drops its indexes
    op.drop_column("collection_counts", "verified")
    op.drop_index("ix_reviews_annotator_id", table_name="reviews")
    op.drop_column("reviews", "blind")
    op.drop_index("ix_images_unverified", table_name="images")
    op.drop_index("ix_images_phash", table_name="images")
    op.drop_index("ix_images_current_label", table_name="images")
    op.drop_column("images", "phash")
    op.drop_column("images", "current_source")
