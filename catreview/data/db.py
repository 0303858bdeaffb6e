"""Database schema (SQLModel) and engine. SQLite by default (WAL mode); any SQLAlchemy URL works
(``postgresql+psycopg://...`` for a shared server).

Tables and their rules:

- ``images``: one row per photo *content* (sha256); failed decodes are rows too, with ``error``.
- ``predictions``: one row per (image, kind, model id, model version, input key). A new model
  version adds rows and never overwrites history; the row for a key is the cache.
- ``reviews``: append-only human decisions. Each review names the review it replaces
  (``replaces_review_id``, unique: the history of a photo is a chain that cannot fork); the
  image row keeps its current review id and label (denormalised, written in the same
  transaction), so "the current label of photo X" and "the next unreviewed photo" are indexed
  lookups at any collection size.
- ``collection_counts``: one row of running totals (decodable, failed, reviewed and verified
  photos), kept in the same transactions as the rows they count.
- ``photo_scores``: one row per decodable photo with stage-1 predictions for the active versions
  (fused prediction, margin, stage-1/VLM disagreement, rarity, label-issue score), the keys of
  the review queues (:mod:`catreview.query.queues`); ``open`` kept in step by the review writers.
- ``exports``, ``split_assignments``: curated dataset versions and each photo's sticky split.
- ``adapters``, ``training_runs``: LoRA adapter versions and the rounds that made them.
- ``preferences``: blind A/B choices between two VLM outputs.
- ``calibrations``: fitted temperatures and fusion weight per model-version pair.
- ``users``, ``audit_events``: accounts with roles (argon2 password hashes) and the append-only
  trail of training rounds, promotions, exports and user changes.
- ``overlap_items``, ``overlap_votes``: the overlap round (photos labelled blind by ``k``
  annotators, then agreed or adjudicated) and its votes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Index, Text, UniqueConstraint, event, inspect, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DatabaseError, NoSuchModuleError
from sqlmodel import Field, Session, SQLModel, create_engine, select


def utcnow() -> datetime:
    """Timezone-aware current UTC time (stored as naive UTC by SQLite)."""
    return datetime.now(UTC)


IMPORT_SOURCE = "import"
"""``Review.source`` of a label that came with the photos (``--labels``/``--labels-from-folders``,
an export's JSONL): an imported, unverified label. Every other source is a human decision."""

UNVERIFIED_WHERE = "error IS NULL AND (current_review_id IS NULL OR current_source = 'import')"
"""SQL condition of a decodable photo without a human decision (the ``ix_images_unverified`` index)."""


class ImageRecord(SQLModel, table=True):
    """A photo, identified by the sha256 of its bytes. ``path`` is absolute, as last imported.

    ``current_review_id``/``current_label``/``current_source`` mirror the photo's newest review
    (``None`` while unlabelled; source ``"import"`` = an imported, unverified label, anything else
    a human decision); only the review writers of :mod:`catreview.data.reviews` write them, in the
    transaction that appends the review. Partial indexes serve the review order (decodable photos
    by id), the list of photos that failed to decode, the next unlabelled photo and the next
    unverified one (unlabelled or only an imported label). ``phash`` is the 64-bit perceptual
    hash as 16 hex characters (``str(imagehash.phash(img))``), ``None`` until computed.
    """

    __tablename__ = "images"
    __table_args__ = (
        Index(
            "ix_images_decodable",
            "id",
            sqlite_where=text("error IS NULL"),
            postgresql_where=text("error IS NULL"),
        ),
        Index(
            "ix_images_failed",
            "id",
            sqlite_where=text("error IS NOT NULL"),
            postgresql_where=text("error IS NOT NULL"),
        ),
        Index(
            "ix_images_unreviewed",
            "id",
            sqlite_where=text("error IS NULL AND current_review_id IS NULL"),
            postgresql_where=text("error IS NULL AND current_review_id IS NULL"),
        ),
        Index(
            "ix_images_unverified",
            "id",
            sqlite_where=text(UNVERIFIED_WHERE),
            postgresql_where=text(UNVERIFIED_WHERE),
        ),
        Index(  # the grid's "current label" filter: a rare breed's page without a scan
            "ix_images_current_label",
            "current_label",
            "id",
            sqlite_where=text("error IS NULL"),
            postgresql_where=text("error IS NULL"),
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(index=True, unique=True, max_length=64)
    path: str
    size: int = Field(description="file size in bytes")
    width: int | None = None
    height: int | None = None
    error: str | None = Field(default=None, sa_column=Column(Text))
    imported_at: datetime = Field(default_factory=utcnow)
    current_review_id: int | None = None
    current_label: str | None = None
    current_source: str | None = None
    phash: str | None = Field(default=None, max_length=16, index=True)

    @property
    def ok(self) -> bool:
        return self.error is None


class Prediction(SQLModel, table=True):
    """A cached model output. ``kind`` is ``"stage1"``, ``"vlm"`` or ``"reasoning"``.

    ``input_key`` identifies inputs beyond the image (for the VLM: the candidate list).
    ``payload`` is JSON: stage1 ``{"topk": [[label, prob], ...]}``; vlm ``{"candidates",
    "probabilities", "scores", "label", "confidence"}``; reasoning ``{"text"}``.
    ``seconds`` is the wall time the model spent on this photo (batched work is divided).
    """

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("image_id", "kind", "model_id", "model_version", "input_key", name="uq_prediction_key"),
    )
    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="images.id", index=True)
    kind: str = Field(index=True, max_length=16)
    model_id: str
    model_version: str
    input_key: str = ""
    payload_json: str = Field(sa_column=Column(Text, nullable=False))
    seconds: float = 0.0
    created_at: datetime = Field(default_factory=utcnow)

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.payload_json)


class Review(SQLModel, table=True):
    """One human decision (append-only). ``label`` is a class name or a special label
    (``Not a cat``/``Unsure``); ``previous_label`` is the image's label before this review
    (``None`` for the first) and ``replaces_review_id`` the review it replaced (``None`` for the
    first; unique, so two reviews can never replace the same one). ``model_snapshot_json``
    records what the models said then. ``created_at`` never decreases along a photo's chain.
    ``blind``: the annotator chose without seeing the model outputs (blind mode). The index on
    ``(annotator, id)`` serves an annotator's recent decisions."""

    __tablename__ = "reviews"
    __table_args__ = (Index("ix_reviews_annotator_id", "annotator", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="images.id", index=True)
    annotator: str
    label: str
    previous_label: str | None = None
    replaces_review_id: int | None = Field(default=None, unique=True)
    note: str | None = Field(default=None, sa_column=Column(Text))
    source: str = "ui"
    model_snapshot_json: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow, index=True)
    blind: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})


class CollectionCounts(SQLModel, table=True):
    """Running totals over ``images`` (a single row, ``id`` 1): decodable photos, photos that
    failed to decode, decodable photos with a label (imported or human: ``reviewed``) and those
    whose current label is a human decision (``verified``). Every writer that changes one of them
    updates this row in the same transaction (:mod:`catreview.data.counts`)."""

    __tablename__ = "collection_counts"
    id: int = Field(default=1, primary_key=True)
    photos: int = 0
    failed: int = 0
    reviewed: int = 0
    verified: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


OPEN_WHERE = {"sqlite": "open = 1", "postgresql": "open"}
"""Per dialect, the condition of the partial queue indexes of ``photo_scores`` (written the way
SQLAlchemy renders ``where(PhotoScore.open)`` there, so the planners match it)."""


def _open_index(name: str, *columns: str) -> Index:
    return Index(
        name, *columns, sqlite_where=text(OPEN_WHERE["sqlite"]), postgresql_where=text(OPEN_WHERE["postgresql"])
    )


class PhotoScore(SQLModel, table=True):
    """The review-queue keys of one decodable photo, computed from the stored predictions of the
    active model versions (:func:`catreview.query.queues.refresh_scores`).

    ``open`` is true while the photo has no human decision (kept in step by the review writers).
    Probabilities are 0..1: ``stage1_*`` the stage-1 top-1, ``vlm_*`` the VLM's choice (``None``
    when it did not run), ``fused_*`` the fused top-1; ``fused_margin`` = top-1 minus top-2 fused
    probability and ``fused_runner_up`` the top-2 label (``None`` with one label); ``disagreement`` 0..1 (0 when the stages agree or the VLM did not run);
    ``rarity`` higher = rarer predicted class (0..1); ``label_issue`` 0..1, higher = the current
    label is more likely wrong (:mod:`catreview.evaluate.label_errors`); ``random_key`` 0..1,
    stable, from the photo's sha256; ``models`` the stage-1/VLM versions the row was computed for.
    """

    __tablename__ = "photo_scores"
    __table_args__ = (
        _open_index("ix_photo_scores_disagreement", "disagreement", "image_id"),
        _open_index("ix_photo_scores_margin", "fused_margin", "image_id"),
        _open_index("ix_photo_scores_rarity", "rarity", "image_id"),
        _open_index("ix_photo_scores_random", "random_key", "image_id"),
        _open_index("ix_photo_scores_label_issue", "label_issue", "image_id"),
        Index("ix_photo_scores_fused_label", "fused_label", "image_id"),
        Index("ix_photo_scores_stage1_label", "stage1_label", "image_id"),
    )
    image_id: int = Field(primary_key=True, foreign_key="images.id")
    open: bool = True
    stage1_label: str
    stage1_prob: float
    vlm_label: str | None = None
    vlm_prob: float | None = None
    fused_label: str
    fused_prob: float
    fused_margin: float
    fused_runner_up: str | None = None
    disagreement: float = 0.0
    rarity: float = 0.0
    label_issue: float | None = None
    label_issue_reason: str | None = Field(default=None, sa_column=Column(Text))
    random_key: float
    models: str
    updated_at: datetime = Field(default_factory=utcnow)


class ExportRecord(SQLModel, table=True):
    """A curated dataset export (one version per export)."""

    __tablename__ = "exports"
    id: int | None = Field(default=None, primary_key=True)
    out_dir: str
    content_hash: str
    n_records: int
    seed: int
    options_json: str = Field(default="{}", sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


class SplitAssignment(SQLModel, table=True):
    """Sticky train/val/test split of a photo (by content hash) across exports."""

    __tablename__ = "split_assignments"
    sha256: str = Field(primary_key=True, max_length=64)
    split: str = Field(max_length=8)
    assigned_at: datetime = Field(default_factory=utcnow)


class AdapterVersion(SQLModel, table=True):
    """A LoRA adapter produced by a training round. At most one per base model is active."""

    __tablename__ = "adapters"
    id: int | None = Field(default=None, primary_key=True)
    base_model: str
    path: str
    export_hash: str
    hyperparams_json: str = Field(default="{}", sa_column=Column(Text))
    metrics_json: str = Field(default="{}", sa_column=Column(Text))
    active: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class TrainingRun(SQLModel, table=True):
    """A LoRA round: ``status`` is running, succeeded, failed or cancelled."""

    __tablename__ = "training_runs"
    id: int | None = Field(default=None, primary_key=True)
    base_model: str
    status: str = "running"
    pid: int | None = None
    run_dir: str
    adapter_id: int | None = Field(default=None, foreign_key="adapters.id")
    error: str | None = Field(default=None, sa_column=Column(Text))
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class Preference(SQLModel, table=True):
    """A blind choice between two VLM outputs for one photo. ``choice`` is a, b or tie."""

    __tablename__ = "preferences"
    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="images.id", index=True)
    annotator: str
    model_a: str
    model_b: str
    output_a: str = Field(sa_column=Column(Text, nullable=False))
    output_b: str = Field(sa_column=Column(Text, nullable=False))
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    choice: str = Field(max_length=4)
    created_at: datetime = Field(default_factory=utcnow)


class CalibrationRecord(SQLModel, table=True):
    """Fitted temperatures (per stage, and of the pooled distribution) and fusion weight for one
    (classifier, VLM) version pair."""

    __tablename__ = "calibrations"
    id: int | None = Field(default=None, primary_key=True)
    stage1_version: str
    vlm_version: str
    temperature_stage1: float
    temperature_vlm: float
    weight: float
    n_reviews: int
    temperature_fused: float = Field(default=1.0, sa_column_kwargs={"server_default": "1.0"})
    report_json: str = Field(default="{}", sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


class UserAccount(SQLModel, table=True):
    """A person who logs in (:mod:`catreview.data.accounts`): a unique ``name``, a ``role``
    (``annotator``/``reviewer``/``admin``), an argon2id ``password_hash``; ``disabled`` users
    cannot log in (kept, so their reviews still name them)."""

    __tablename__ = "users"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)
    role: str = Field(max_length=16)
    password_hash: str = Field(sa_column=Column(Text, nullable=False))
    disabled: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class AuditEvent(SQLModel, table=True):
    """One administrative action (append-only; :mod:`catreview.data.audit`): who (``actor``),
    what (``action``, e.g. ``promote``), on what (``target``, e.g. ``adapter #3``), details
    as JSON, when."""

    __tablename__ = "audit_events"
    id: int | None = Field(default=None, primary_key=True)
    actor: str = Field(max_length=64)
    action: str = Field(index=True, max_length=32)
    target: str = ""
    detail_json: str = Field(default="{}", sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow, index=True)


class OverlapItem(SQLModel, table=True):
    """A photo of the overlap round (:mod:`catreview.data.overlap`): ``k`` annotators vote on it
    blind to each other; ``votes`` so far; ``status`` ``open`` (fewer than ``k`` votes),
    ``agreed`` (``k`` equal votes: recorded as a consensus review), ``disputed`` (waiting for a
    reviewer) or ``adjudicated``."""

    __tablename__ = "overlap_items"
    __table_args__ = (Index("ix_overlap_items_status_image", "status", "image_id"),)
    image_id: int = Field(primary_key=True, foreign_key="images.id")
    k: int
    votes: int = 0
    status: str = Field(default="open", max_length=12)
    created_at: datetime = Field(default_factory=utcnow)


class OverlapVote(SQLModel, table=True):
    """One annotator's blind label for an overlap photo (one per annotator and photo)."""

    __tablename__ = "overlap_votes"
    __table_args__ = (UniqueConstraint("image_id", "annotator", name="uq_overlap_votes_image_annotator"),)
    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="images.id", index=True)
    annotator: str = Field(max_length=64)
    label: str
    note: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    """Create an engine and bring the database's schema up to date. For SQLite: the folder is
    created, WAL mode, foreign keys on, a 10 s busy timeout so the app and a CLI can share one file.

    The schema is migrated by :func:`catreview.data.migrate.upgrade` (Alembic, one process at a
    time under a lock; a fresh database gets every revision, a pre-Alembic one its missing
    columns and then the revisions after release 0.4).

    Raises:
        ValueError: the URL cannot be parsed, names an unknown database type or a driver that is
            not installed, the database cannot be opened, or it was made by a newer catreview.
    """
    from catreview.data.migrate import upgrade  # migrate imports this module

    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError
        raise ValueError(f"invalid database URL {url!r}: {exc}") from exc
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, **kwargs)
    except NoSuchModuleError:
        raise ValueError(
            f"unknown database type {parsed.drivername!r} in {url!r}; use sqlite:///path/to/file.db "
            "or postgresql+psycopg://user@host/dbname"
        ) from None
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"the driver for {parsed.drivername!r} is not installed (missing module {exc.name!r}); "
            "for PostgreSQL: pip install 'psycopg[binary]' and use postgresql+psycopg://..."
        ) from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        upgrade(engine)
    except DatabaseError as exc:  # cannot open (OperationalError), or not a database file
        raise ValueError(
            f"cannot open the database {engine.url.render_as_string(hide_password=True)}: {exc.orig}"
        ) from None
    except OSError as exc:  # the SQLite migration lock file cannot be created next to the database
        raise ValueError(f"cannot open the database {engine.url.render_as_string(hide_password=True)}: {exc}") from None
    return engine


ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (("calibrations", "temperature_fused", "FLOAT NOT NULL DEFAULT 1.0"),)
"""Columns that releases before Alembic added to existing tables: ``(table, column, SQL type and
default)``. Such a database is brought to the release-0.4 schema by :func:`add_missing_columns`
before the migrations run; later schema changes are Alembic revisions
(``catreview/data/migrations/versions``), never entries here."""


def add_missing_columns(bind: Engine | Connection) -> list[str]:
    """Add the :data:`ADDED_COLUMNS` an older database lacks (``ALTER TABLE ... ADD COLUMN``,
    valid in SQLite and PostgreSQL). Existing rows get the default; nothing else is touched; a
    table the database does not have is skipped (the first migration creates it whole).

    Args:
        bind: an engine (each column added in its own transaction) or a connection (added in
            its open transaction, not committed here).

    Returns:
        ``"table.column"`` of each column added (empty when the schema is current).
    """
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            return add_missing_columns(conn)
    added = []
    tables = set(inspect(bind).get_table_names())
    for table, column, ddl in ADDED_COLUMNS:
        if table in tables and column not in {c["name"] for c in inspect(bind).get_columns(table)}:
            bind.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))
            added.append(f"{table}.{column}")
    return added


def redact_url(url: str | URL) -> str:
    """A database URL without its password (and without ``password``/``token`` query keys)."""
    u = make_url(str(url)) if not isinstance(url, URL) else url
    query = {k: v for k, v in u.query.items() if not any(s in k.lower() for s in ("password", "secret", "token"))}
    # URL.set(password=None) would keep the password ("None" means unchanged there)
    return u._replace(password=None).set(query=query).render_as_string(hide_password=False)


def stored_id(image: ImageRecord) -> int:
    """The primary key of a stored image row (set once the row is flushed).

    Raises:
        ValueError: the row has not been stored yet.
    """
    if image.id is None:
        raise ValueError(f"image row {image.path!r} has not been stored yet")
    return image.id


def get_image(session: Session, image_id: int) -> ImageRecord:
    """The image row with this id. Raises ``KeyError`` if there is none."""
    img = session.get(ImageRecord, image_id)
    if img is None:
        raise KeyError(f"no image with id {image_id}")
    return img


def image_by_sha(session: Session, sha256: str) -> ImageRecord | None:
    """The image row for a content hash, or ``None``."""
    return session.exec(select(ImageRecord).where(ImageRecord.sha256 == sha256)).first()


def active_adapter_version(session: Session, base_model: str) -> AdapterVersion | None:
    """The active LoRA adapter row of ``base_model`` (at most one is active), or ``None``.

    The one read of "which adapter is active": the registry (to load it) and
    :mod:`catreview.adapters.versions` (to gate and flip it) both call this.
    """
    q = select(AdapterVersion).where(AdapterVersion.base_model == base_model, AdapterVersion.active == True)  # noqa: E712
    return session.exec(q).first()


def insert_ignoring_conflicts(session: Session, model: type[SQLModel], index_elements: list[str]) -> Any:
    """``INSERT ... ON CONFLICT (index_elements) DO NOTHING`` for ``model``'s table in the
    session's dialect (SQLite and PostgreSQL both have it), the race-free get-or-create.
    The result's ``rowcount`` is 1 when the row was inserted and 0 when it already existed, on both
    databases (``preserve_rowcount``: SQLAlchemy with psycopg otherwise reports -1 for an INSERT).

    Raises:
        ValueError: the database is neither SQLite nor PostgreSQL.
    """
    name = session.get_bind().dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(model).on_conflict_do_nothing(index_elements=index_elements)
        return stmt.execution_options(preserve_rowcount=True)
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        pg_stmt = pg_insert(model).on_conflict_do_nothing(index_elements=index_elements)
        return pg_stmt.execution_options(preserve_rowcount=True)
    raise ValueError(f"database type {name!r} is not supported; use SQLite or PostgreSQL")
