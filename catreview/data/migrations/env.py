"""Alembic environment of catreview (run by Alembic, not imported by the package).

Two ways in:

- :func:`catreview.data.migrate.upgrade` (every start): the :class:`alembic.config.Config` it
  builds carries an open connection in ``attributes["connection"]``, already inside the
  migration transaction and under the migration lock; the revisions applied are appended to
  ``attributes["applied"]``. Nothing here configures logging or prints.
- The ``alembic`` command with the repository's ``alembic.ini`` (developers: ``alembic upgrade
  head``, ``alembic revision --autogenerate``): a connection is made from ``sqlalchemy.url`` and
  the ini file's logging section is applied (to stderr). ``-x url=...`` names another database.

``target_metadata`` is the models' :data:`sqlmodel.SQLModel.metadata`, for autogenerate;
``render_as_batch`` makes autogenerate write SQLite-compatible ``batch_alter_table`` blocks.
"""

from __future__ import annotations

from logging.config import fileConfig
from pathlib import Path
from typing import Any

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection, make_url
from sqlmodel import SQLModel

import catreview.data.db  # noqa: F401  (defines the tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def _record_applied(ctx: Any, step: Any, heads: Any, run_args: Any) -> None:
    applied = config.attributes.get("applied")
    if applied is not None and step.is_upgrade and not step.is_stamp:
        applied.append(step.up_revision_id)


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        on_version_apply=_record_applied,
        **kwargs,
    )


def run_with_connection(connection: Connection) -> None:
    """Run the migrations on ``connection`` (inside its transaction when one is open)."""
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """``alembic upgrade --sql``: write the SQL for the URL's dialect instead of running it."""
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    _configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run on the connection handed in by catreview, else on one made from ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with_connection(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: set sqlalchemy.url in alembic.ini or pass -x url=...")
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        run_with_connection(conn)
        conn.commit()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
