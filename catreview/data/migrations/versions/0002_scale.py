"""Schema for scale: each photo's current review, the review chain, running totals.

Revision ID: 0002_scale
Revises: 0001_release4

What commit 5c54044 and the query layer after it (fb3297f) added to the models:

- ``images.current_review_id``/``current_label``: the photo's newest review (highest id, as
  release 0.4 read it), filled in here for every reviewed photo.
- ``reviews.replaces_review_id`` (unique): each review names the previous review of its photo
  in id order (``None`` for a photo's first); filled in here, so existing histories are chains.
  SQLite cannot add a unique constraint to a table, so the table is rebuilt
  (``batch_alter_table``; rows, indexes and the foreign key are copied).
- Partial indexes ``ix_images_decodable`` (``error IS NULL``), ``ix_images_failed``
  (``error IS NOT NULL``) and ``ix_images_unreviewed`` (``error IS NULL AND current_review_id IS
  NULL``), on SQLite and PostgreSQL alike.
- ``collection_counts``: its one row (id 1) holds the totals recounted from ``images``, as
  :func:`catreview.data.counts.recount` computes them.
- PostgreSQL only: a time column that an older sqlmodel made ``timestamp without time zone``
  becomes ``timestamp with time zone`` as the sqlmodel in use (0.0.50, ``UTCDateTime``) makes it, the
  stored values read as UTC (what catreview always wrote). Columns already with time zone are
  left alone.

Downgrade removes all of it except the time-zone change (the review chain, the denormalised
columns and the totals are derived data; no review is lost).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_scale"
down_revision: str | None = "0001_release4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARTIAL_INDEXES = {
    "ix_images_decodable": "error IS NULL",
    "ix_images_failed": "error IS NOT NULL",
    "ix_images_unreviewed": "error IS NULL AND current_review_id IS NULL",
}
TIME_COLUMNS = {
    "images": ["imported_at"],
    "predictions": ["created_at"],
    "reviews": ["created_at"],
    "exports": ["created_at"],
    "split_assignments": ["assigned_at"],
    "adapters": ["created_at"],
    "training_runs": ["started_at", "finished_at"],
    "preferences": ["created_at"],
    "calibrations": ["created_at"],
}
REPLACES_UNIQUE = "reviews_replaces_review_id_key"
"""The name PostgreSQL gives the unique constraint of ``replaces_review_id`` in ``create_all``."""


def _naive_time_columns() -> list[tuple[str, str]]:
    """``(table, column)`` of the PostgreSQL time columns without time zone (none elsewhere)."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return []
    inspector = sa.inspect(bind)
    found = []
    for table, names in TIME_COLUMNS.items():
        for col in inspector.get_columns(table):
            if col["name"] in names and isinstance(col["type"], sa.DateTime) and not col["type"].timezone:
                found.append((table, col["name"]))
    return found


def upgrade() -> None:
    for table, column in _naive_time_columns():
        op.alter_column(
            table,
            column,
            type_=sa.DateTime(timezone=True),
            existing_type=sa.DateTime(),
            postgresql_using=f"{column} AT TIME ZONE 'UTC'",
        )
    op.add_column("images", sa.Column("current_review_id", sa.Integer(), nullable=True))
    op.add_column("images", sa.Column("current_label", sa.String(), nullable=True))
    op.execute("UPDATE images SET current_review_id = (SELECT MAX(r.id) FROM reviews r WHERE r.image_id = images.id)")
    op.execute(
        "UPDATE images SET current_label = (SELECT r.label FROM reviews r WHERE r.id = images.current_review_id) "
        "WHERE current_review_id IS NOT NULL"
    )

    with op.batch_alter_table("reviews") as batch:
        batch.add_column(sa.Column("replaces_review_id", sa.Integer(), nullable=True))
        batch.create_unique_constraint(REPLACES_UNIQUE, ["replaces_review_id"])
    op.execute(
        "UPDATE reviews SET replaces_review_id = (SELECT MAX(p.id) FROM reviews p "
        "WHERE p.image_id = reviews.image_id AND p.id < reviews.id)"
    )

    for name, where in PARTIAL_INDEXES.items():
        op.create_index(name, "images", ["id"], sqlite_where=sa.text(where), postgresql_where=sa.text(where))

    op.create_table(
        "collection_counts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("photos", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("reviewed", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(
        "INSERT INTO collection_counts (id, photos, failed, reviewed) SELECT 1, "
        "(SELECT COUNT(*) FROM images WHERE error IS NULL), "
        "(SELECT COUNT(*) FROM images WHERE error IS NOT NULL), "
        "(SELECT COUNT(*) FROM images WHERE error IS NULL AND current_review_id IS NOT NULL)"
    )


def downgrade() -> None:
    op.drop_table("collection_counts")
    for name in PARTIAL_INDEXES:
        op.drop_index(name, table_name="images")
    with op.batch_alter_table("reviews") as batch:
        batch.drop_constraint(REPLACES_UNIQUE, type_="unique")
        batch.drop_column("replaces_review_id")
    op.drop_column("images", "current_label")
    op.drop_column("images", "current_review_id")
