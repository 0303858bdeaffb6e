"""Database schema: a database older than the Alembic migrations gains the columns added since,
keeps its rows, and is then migrated to head (tests/test_migrations.py has the release-0.4 case)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import inspect
from sqlmodel import Session

from catreview.config import Settings
from catreview.data.db import CalibrationRecord, add_missing_columns, make_engine
from catreview.data.migrate import current_revisions, head_revision
from catreview.query.photos import current_blend

# The calibrations table as the first release created it (no temperature_fused).
OLD_CALIBRATIONS = """
CREATE TABLE calibrations (
    id INTEGER NOT NULL PRIMARY KEY,
    stage1_version VARCHAR NOT NULL,
    vlm_version VARCHAR NOT NULL,
    temperature_stage1 FLOAT NOT NULL,
    temperature_vlm FLOAT NOT NULL,
    weight FLOAT NOT NULL,
    n_reviews INTEGER NOT NULL,
    report_json TEXT,
    created_at DATETIME NOT NULL
)
"""


def test_old_database_gains_temperature_fused_and_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(OLD_CALIBRATIONS)
        conn.execute(
            "INSERT INTO calibrations VALUES (7, 's1@a', 'vlm@b', 1.5, 0.8, 0.6, 40, '{}', '2026-11-01 10:00:00')"
        )
    engine = make_engine(f"sqlite:///{path}")
    assert "temperature_fused" in {c["name"] for c in inspect(engine).get_columns("calibrations")}
    assert add_missing_columns(engine) == []  # idempotent: a second start changes nothing
    # then the migrations ran: the tables this old database never had exist, the revision is head
    assert current_revisions(engine) == [head_revision()]
    assert {"images", "reviews", "collection_counts"} <= set(inspect(engine).get_table_names())
    with Session(engine) as s:
        row = s.get(CalibrationRecord, 7)
        assert (row.temperature_stage1, row.temperature_vlm, row.weight, row.temperature_fused) == (1.5, 0.8, 0.6, 1.0)
        blend = current_blend(s, Settings(), "s1@a", "vlm@b")
    assert (blend.weight, blend.temperature_fused, blend.source) == (0.6, 1.0, "calibration #7")


def test_add_missing_columns_adds_to_old_tables_only(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(OLD_CALIBRATIONS)
        conn.execute("CREATE TABLE images (id INTEGER NOT NULL PRIMARY KEY)")
    conn.close()
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:  # on a connection: inside its transaction
        assert add_missing_columns(conn) == ["calibrations.temperature_fused"]
    assert add_missing_columns(engine) == []
    assert inspect(engine).get_table_names() == ["calibrations", "images"]  # no table created here
