"""The schema of release 0.4 (commit 21d1755), exactly as its ``SQLModel.metadata.create_all`` made it.

Revision ID: 0001_release4
Revises: (none)

The tables are a frozen copy of that release's models (not imported from
:mod:`catreview.data.db`, which moves on), created with the same DDL ``create_all`` emits, so a
database made by release 0.4 and one made by this revision are the same schema (tested against a
dump of a real release-0.4 database, ``tests/data/release4.sql``).

A table that already exists is left alone: a database made before Alembic (release 0.4 or
older, no ``alembic_version``) runs this revision too, after
:func:`catreview.data.db.add_missing_columns` gave its old tables the columns they lacked, and
only the tables it never had are created. Downgrade drops every table (all rows are lost).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.schema import CreateIndex, CreateTable

revision: str = "0001_release4"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RELEASE4 = sa.MetaData()

sa.Table(
    "images",
    RELEASE4,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("path", sa.String(), nullable=False),
    sa.Column("size", sa.Integer(), nullable=False),
    sa.Column("width", sa.Integer(), nullable=True),
    sa.Column("height", sa.Integer(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_images_sha256", "sha256", unique=True),
)
sa.Table(
    "predictions",
    RELEASE4,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("model_id", sa.String(), nullable=False),
    sa.Column("model_version", sa.String(), nullable=False),
    sa.Column("input_key", sa.String(), nullable=False),
    sa.Column("payload_json", sa.Text(), nullable=False),
    sa.Column("seconds", sa.Float(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("image_id", "kind", "model_id", "model_version", "input_key", name="uq_prediction_key"),
    sa.Index("ix_predictions_image_id", "image_id"),
    sa.Index("ix_predictions_kind", "kind"),
)
sa.Table(
    "reviews",
    RELEASE4,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
    sa.Column("annotator", sa.String(), nullable=False),
    sa.Column("label", sa.String(), nullable=False),
    sa.Column("previous_label", sa.String(), nullable=True),
    sa.Column("note", sa.Text(), nullable=True),
    sa.Column("source", sa.String(), nullable=False),
    sa.Column("model_snapshot_json", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_reviews_image_id", "image_id"),
    sa.Index("ix_reviews_created_at", "created_at"),
)
sa.Table(
    "exports",
    RELEASE4,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("out_dir", sa.String(), nullable=False),
    sa.Column("content_hash", sa.String(), nullable=False),
    sa.Column("n_records", sa.Integer(), nullable=False),
    sa.Column("seed", sa.Integer(), nullable=False),
    sa.Column("options_json", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Table(
    "split_assignments",
    RELEASE4,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("split", sa.String(8), nullable=False),
    sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Table(
    "adapters",
    RELEASE4,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("base_model", sa.String(), nullable=False),
    sa.Column("path", sa.String(), nullable=False),
    sa.Column("export_hash", sa.String(), nullable=False),
    sa.Column("hyperparams_json", sa.Text(), nullable=True),
    sa.Column("metrics_json", sa.Text(), nullable=True),
    sa.Column("active", sa.Boolean(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Table(
    "training_runs",
    RELEASE4,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("base_model", sa.String(), nullable=False),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=True),
    sa.Column("run_dir", sa.String(), nullable=False),
    sa.Column("adapter_id", sa.Integer(), sa.ForeignKey("adapters.id"), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
)
sa.Table(
    "preferences",
    RELEASE4,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
    sa.Column("annotator", sa.String(), nullable=False),
    sa.Column("model_a", sa.String(), nullable=False),
    sa.Column("model_b", sa.String(), nullable=False),
    sa.Column("output_a", sa.Text(), nullable=False),
    sa.Column("output_b", sa.Text(), nullable=False),
    sa.Column("prompt", sa.Text(), nullable=False),
    sa.Column("choice", sa.String(4), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_preferences_image_id", "image_id"),
)
sa.Table(
    "calibrations",
    RELEASE4,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("stage1_version", sa.String(), nullable=False),
    sa.Column("vlm_version", sa.String(), nullable=False),
    sa.Column("temperature_stage1", sa.Float(), nullable=False),
    sa.Column("temperature_vlm", sa.Float(), nullable=False),
    sa.Column("weight", sa.Float(), nullable=False),
    sa.Column("n_reviews", sa.Integer(), nullable=False),
    sa.Column("temperature_fused", sa.Float(), nullable=False, server_default="1.0"),
    sa.Column("report_json", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


def upgrade() -> None:
    """Create the release-0.4 tables (and their indexes) that do not exist yet."""
    ctx = op.get_context()
    existing = set() if ctx.as_sql else set(sa.inspect(op.get_bind()).get_table_names())
    for table in RELEASE4.sorted_tables:
        if table.name in existing:
            continue
        op.execute(CreateTable(table))
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            op.execute(CreateIndex(index))


def downgrade() -> None:
    """Drop every table of the release (children first)."""
    for table in reversed(RELEASE4.sorted_tables):
        op.drop_table(table.name)
