"""Database schema: an older database gains the columns added since, and keeps its rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import inspect
from sqlmodel import Session

from catreview.config import Settings
from catreview.data.db import CalibrationRecord, add_missing_columns, make_engine
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
    with Session(engine) as s:
        row = s.get(CalibrationRecord, 7)
        assert (row.temperature_stage1, row.temperature_vlm, row.weight, row.temperature_fused) == (1.5, 0.8, 0.6, 1.0)
        blend = current_blend(s, Settings(), "s1@a", "vlm@b")
    assert (blend.weight, blend.temperature_fused, blend.source) == (0.6, 1.0, "calibration #7")
