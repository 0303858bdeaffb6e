"""Schema migrations at start: one Alembic upgrade under a lock, instead of racing ``create_all``.

:func:`upgrade` (called by :func:`catreview.data.db.make_engine`) brings any database to the
newest revision of ``catreview/data/migrations/versions``:

- a fresh database: every revision from nothing;
- a database made before Alembic (release 0.4 or older: catreview tables, no ``alembic_version``):
  the columns older releases lacked are added first (:func:`catreview.data.db.add_missing_columns`),
  then ``0001_release4`` creates only the release-0.4 tables it does not have (none for a 0.4
  database: the same as stamping it), then the later revisions run;
- a database at a revision this code does not know (made by a newer catreview): ``ValueError``,
  nothing touched.

Several processes may start on one database at once (the app, CLI runs, workers). The check and
the upgrade run in one transaction while holding a lock, so exactly one of them migrates and the
others find the database at head:

- PostgreSQL: ``pg_advisory_xact_lock`` on :data:`PG_LOCK_KEY`, taken as the first statement of
  the migration transaction on the migration connection and released by its commit or rollback
  (it cannot outlive the transaction, not even on a pooled connection). DDL is transactional.
- SQLite file: :class:`filelock.FileLock` on ``<database file>.migrate.lock`` (an OS lock,
  released when the process dies; the file itself stays), and the migration runs on its own
  connection in one ``BEGIN IMMEDIATE`` transaction (pysqlite would otherwise commit each DDL
  statement on its own), so an interrupted upgrade leaves the previous revision intact.
- In-memory SQLite: one process only, no lock.

A database already at head costs one lock and one ``SELECT`` of ``alembic_version``; Alembic
is not entered, so nothing is logged. Alembic's own INFO lines (``Running upgrade ...``) go to
the ``alembic`` loggers, which catreview never attaches to stdout (the CLI's JSON output stays
clean).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from filelock import FileLock, Timeout
from sqlalchemy import create_engine, event, inspect, pool, text
from sqlalchemy.engine import Connection, Engine

from catreview.data.db import _sqlite_pragmas, add_missing_columns, redact_url

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""The Alembic script folder shipped in the package (``env.py``, ``versions/``)."""

PG_LOCK_KEY = int.from_bytes(b"catrevie", "big")
"""PostgreSQL advisory lock key of the migration step (a fixed 63-bit number, "catrevie" in ASCII)."""

LOCK_TIMEOUT_S = 300.0
"""How long a start waits for another process's migration (SQLite file lock), in seconds."""

VERSION_TABLE = "alembic_version"

RELEASE_TABLES = frozenset(
    {"images", "predictions", "reviews", "exports", "split_assignments", "adapters", "training_runs"}
    | {"preferences", "calibrations"}
)
"""Tables of the pre-Alembic releases: any of them without ``alembic_version`` marks an old database."""


def alembic_config(connection: Connection | None = None) -> Config:
    """A programmatic Alembic config for the shipped scripts (no ``alembic.ini``).

    Args:
        connection: the connection ``env.py`` migrates (inside its open transaction).
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


@cache
def _known_revisions() -> frozenset[str]:
    return frozenset(s.revision for s in _script().walk_revisions())


def head_revision() -> str:
    """The newest revision id of the shipped scripts (one head)."""
    head = _script().get_current_head()
    if head is None:  # pragma: no cover - the package ships revisions
        raise RuntimeError(f"no Alembic revisions in {MIGRATIONS_DIR / 'versions'}")
    return head


def current_revisions(bind: Engine | Connection) -> list[str]:
    """The revision ids stored in ``alembic_version`` (empty for a database without it)."""
    if not inspect(bind).has_table(VERSION_TABLE):
        return []
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return current_revisions(conn)
    return [row[0] for row in bind.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))]


def upgrade(engine: Engine) -> list[str]:
    """Bring ``engine``'s database to :func:`head_revision` (see the module docstring).

    Returns:
        The revision ids applied, oldest first (empty when the database was already at head).

    Raises:
        ValueError: the database is at a revision this code does not know (a newer catreview
            made it), was made by an unreleased build without migrations, or another process
            held the SQLite migration lock for :data:`LOCK_TIMEOUT_S`.
        sqlalchemy.exc.DatabaseError: the database cannot be opened or written.
    """
    head = head_revision()
    with _migration_transaction(engine) as conn:
        current = current_revisions(conn)
        if current == [head]:
            return []
        unknown = [rev for rev in current if rev not in _known_revisions()]
        if unknown:
            raise ValueError(
                f"the database {redact_url(engine.url)} is at schema revision {', '.join(unknown)}, which this "
                f"catreview does not know (its newest is {head}): it was made by a newer catreview; "
                "upgrade catreview to open it"
            )
        if not current:
            _prepare_pre_alembic(conn, engine)
        applied: list[str] = []
        cfg = alembic_config(conn)
        cfg.attributes["applied"] = applied
        command.upgrade(cfg, "head")
    log.info("database %s upgraded: %s", redact_url(engine.url), " -> ".join(applied))
    return applied


def _prepare_pre_alembic(conn: Connection, engine: Engine) -> None:
    """Give a pre-Alembic database the columns its old tables lacked (nothing for a fresh one)."""
    tables = set(inspect(conn).get_table_names())
    if not tables & RELEASE_TABLES:
        return
    if "images" in tables and "current_review_id" in {c["name"] for c in inspect(conn).get_columns("images")}:
        raise ValueError(
            f"the database {redact_url(engine.url)} was made by an unreleased catreview build without migrations "
            "(it has images.current_review_id but no alembic_version); make it again, or if its schema equals "
            f"revision {head_revision()} mark it so from the repository root: "
            f"alembic -x url={redact_url(engine.url)} stamp {head_revision()}"
        )
    added = add_missing_columns(conn)
    if added:
        log.info("database %s: added columns of older releases: %s", redact_url(engine.url), ", ".join(added))


def _sqlite_file(engine: Engine) -> Path | None:
    """The database file of a SQLite engine, or ``None`` (in memory, or not SQLite)."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:") or url.query.get("mode") == "memory":
        return None
    return Path(database).expanduser()


@contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside an open transaction, holding the migration lock; committed on success."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            yield conn
        return
    path = _sqlite_file(engine)
    if path is None:  # in-memory SQLite (one process) or another dialect: no lock to take
        with engine.connect() as conn, conn.begin():
            yield conn
        return
    lock = FileLock(f"{path}.migrate.lock", timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise ValueError(
            f"another process has been upgrading the database {path} for {LOCK_TIMEOUT_S:.0f} s "
            f"(lock {lock.lock_file}); wait for it to finish"
        ) from None
    try:
        migration_engine = _sqlite_migration_engine(engine)
        try:
            with migration_engine.connect() as conn, conn.begin():
                yield conn
        finally:
            migration_engine.dispose()
    finally:
        lock.release()


def _sqlite_migration_engine(engine: Engine) -> Engine:
    """A one-connection engine on the same SQLite file whose transactions include DDL.

    pysqlite opens transactions only before INSERT/UPDATE/DELETE and runs DDL in autocommit;
    with the driver's own handling off (``isolation_level = None``) and an explicit ``BEGIN
    IMMEDIATE`` (SQLAlchemy's documented recipe for SQLite transactional DDL), the whole upgrade
    is one transaction that holds the write lock from its first statement.
    """
    migration_engine = create_engine(engine.url, poolclass=pool.NullPool, connect_args={"timeout": 10})

    @event.listens_for(migration_engine, "connect")
    def _connect(dbapi_conn: Any, record: Any) -> None:
        _sqlite_pragmas(dbapi_conn, record)
        dbapi_conn.isolation_level = None

    @event.listens_for(migration_engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return migration_engine
