"""Shared parts of the database benchmarks (``scale_bench.py``, ``grid_bench.py``): scratch
databases on SQLite or PostgreSQL, percentiles, and the query plans of a call.

:func:`scratch_database` yields the URL of a fresh, empty database (a SQLite file in a folder, or a
new database ``catreview_bench_<N>_<random>`` on a PostgreSQL server, dropped at the end);
:func:`postgres_server` starts a throwaway local server (``tests/postgres.py``) when asked.
:func:`plan_flags` runs a call once, captures every ``SELECT`` it sends and returns each one's
plan (SQLite ``EXPLAIN QUERY PLAN``, PostgreSQL ``EXPLAIN``) with what would make it cost more as
the table grows: a table scan not along an index, a sort (``TEMP B-TREE`` / ``Sort``).
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, event, text  # noqa: E402
from sqlalchemy.engine import Engine, make_url  # noqa: E402

TABLES = ("images", "photo_scores", "predictions", "reviews")
"""The tables whose size grows with the collection (a scan of one of them is a finding)."""


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (1..99) of ``values`` (ms), to 0.1 ms: ``statistics.quantiles``
    with ``n=100``, inclusive method (linear interpolation between order statistics).

    Raises:
        statistics.StatisticsError: fewer than two values.
    """
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 1)


def interleaved(
    by_size: dict[int, dict[str, Callable[[], Any]]], calls: int, warmup: int = 10
) -> dict[int, dict[str, float]]:
    """Time the same named calls on several databases interleaved: for each name, ``warmup``
    untimed calls on each size, then ``calls`` rounds of one timed call per size (the order of
    the sizes rotating each round), so a burst of load on a shared machine hits every size alike
    and the ratios between sizes measure the sizes, not the moment.

    Args:
        by_size: ``{N: {name: call}}``; every size has the same names (those of the first are used).
        calls: timed calls per name and size (>= 2).
        warmup: untimed calls first, per name and size.

    Returns:
        ``{N: {"<name>_p50_ms": .., "<name>_p95_ms": ..}}`` (:func:`percentile`).

    Raises:
        KeyError: a size lacks a name of the first size.
    """
    sizes = list(by_size)
    out: dict[int, dict[str, float]] = {n: {} for n in sizes}
    for name in by_size[sizes[0]]:
        fns = [by_size[n][name] for n in sizes]
        for fn in fns:
            for _ in range(warmup):
                fn()
        times: list[list[float]] = [[] for _ in sizes]
        for k in range(calls):
            for j in range(len(sizes)):
                i = (j + k) % len(sizes)
                t0 = time.perf_counter()
                fns[i]()
                times[i].append((time.perf_counter() - t0) * 1000)
        for n, ts in zip(sizes, times, strict=True):
            out[n][f"{name}_p50_ms"] = percentile(ts, 50)
            out[n][f"{name}_p95_ms"] = percentile(ts, 95)
    return out


@contextmanager
def postgres_server(start: bool) -> Iterator[str | None]:
    """With ``start``: a throwaway local PostgreSQL server (:class:`tests.postgres.PostgresServer`)
    for the block, yielding the URL of its ``postgres`` database; else yields ``None``.

    Raises:
        tests.postgres.PostgresUnavailable: the server binaries are missing or it did not start.
    """
    if not start:
        yield None
        return
    from tests.postgres import PostgresServer

    server = PostgresServer().start()
    try:
        yield server.url("postgres")
    finally:
        server.stop()


@contextmanager
def scratch_database(server_url: str | None, n: int, folder: Path) -> Iterator[str]:
    """A fresh, empty database for ``n`` photos: the SQLite file ``folder/bench-<n>.db`` when
    ``server_url`` is ``None``, else a new database next to the one ``server_url`` names
    (PostgreSQL), dropped (``WITH (FORCE)``) when the block ends."""
    if server_url is None:
        yield f"sqlite:///{folder / f'bench-{n}-{uuid.uuid4().hex[:6]}.db'}"
        return
    name = f"catreview_bench_{n}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def analyze(engine: Engine) -> None:
    """On PostgreSQL, refresh the planner's statistics (``ANALYZE``: what autovacuum does within
    a minute of a bulk load, so the timings are those of a collection in use). Nothing on
    SQLite: the app never runs ``ANALYZE`` there, so its planner works without statistics."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


def _captured(engine: Engine, call: Callable[[], Any]) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    def hook(_c: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH", "(SELECT")):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", hook)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", hook)
    return seen


def _flagged(dialect: str, line: str) -> bool:
    words = line.strip().split()
    if dialect == "sqlite":
        table_scan = words[:1] == ["SCAN"] and len(words) > 1 and words[1] in TABLES and "INDEX" not in line
        return "TEMP B-TREE" in line or table_scan
    seq_scan = "Seq Scan" in line and any(f" on {t}" in line for t in TABLES)
    return seq_scan or line.strip().lstrip("-> ").startswith(("Sort", "Incremental Sort"))


def plan_flags(engine: Engine, call: Callable[[], Any]) -> dict[str, Any]:
    """Run ``call()`` once and explain every ``SELECT`` it sent, with its parameters.

    Returns:
        ``{"statements": k, "plans": [[plan line, ...] per statement], "flags": [line, ...]}``;
        ``flags`` lists the lines that read a whole growing table (:data:`TABLES`) not along an
        index, or sort (SQLite ``TEMP B-TREE``; PostgreSQL ``Sort`` / ``Seq Scan``). An index walk
        in order with a per-row filter is not flagged (its length shows in the timings only).

    Raises:
        ValueError: a database other than SQLite or PostgreSQL.
    """
    dialect = engine.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        raise ValueError(f"database type {dialect!r} is not supported; use SQLite or PostgreSQL")
    statements = _captured(engine, call)
    plans = []
    with engine.connect() as conn:
        for sql, params in statements:
            if dialect == "sqlite":
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params).all()
                plans.append([str(r[-1]) for r in rows])
            else:
                rows = conn.exec_driver_sql("EXPLAIN " + sql, params).all()
                plans.append([str(r[0]) for r in rows])
    flags = [line.strip() for p in plans for line in p if _flagged(dialect, line)]
    return {"statements": len(statements), "plans": plans, "flags": flags}
