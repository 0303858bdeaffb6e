"""Schema migrations (Alembic, run by ``make_engine``): a database made by the previous release
upgrades keeping every row, a fresh one ends equal to the models, parallel starts migrate once.

The previous-release database is ``tests/data/release4.sql``: a SQL dump of a database that
release 0.4's own code (commit 21d1755) made from 10 shared photos and a file that is not an
image, with import labels, UI reviews that change a label, predictions, a calibration and an
export (``tests/data/make_release4.sh`` regenerates it; see ``tests/data/README.md``).
"""

from __future__ import annotations

import json
import multiprocessing
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlmodel import Session, SQLModel, col, select

from catreview.data import counts
from catreview.data.db import ImageRecord, Review, make_engine
from catreview.data.migrate import alembic_config, current_revisions, head_revision
from tests.conftest import REPO_ROOT

DUMP = Path(__file__).parent / "data" / "release4.sql"
RELEASE4_TABLES = [
    "adapters",
    "calibrations",
    "exports",
    "images",
    "predictions",
    "preferences",
    "reviews",
    "split_assignments",
    "training_runs",
]


def restore_release4(path: Path, photos: Path) -> str:
    """Restore the release-0.4 dump into a new SQLite file (photo paths under ``photos``); returns its URL."""
    sql = DUMP.read_text(encoding="utf-8").replace("@PHOTOS@", str(photos))
    with sqlite3.connect(path) as conn:
        conn.executescript(sql)
    conn.close()
    return f"sqlite:///{path}"


def table_rows(path: Path, tables: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every row of ``tables`` (as dicts, in rowid order) read with plain sqlite3."""
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        out = {t: [dict(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY rowid")] for t in tables}
    conn.close()
    return out


def sqlite_schema(path: Path) -> set[tuple[str, str, str]]:
    """``(type, name, normalised SQL)`` of the tables and indexes in a SQLite file (Alembic's own table left out)."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' AND name != 'alembic_version'"
        ).fetchall()
    conn.close()
    return {(kind, name, re.sub(r"\s+", " ", sql or "").strip()) for kind, name, sql in rows}


def schema_differences(url: str) -> list[Any]:
    """Alembic autogenerate's differences between the database and ``SQLModel.metadata`` (types and server defaults too)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return list(compare_metadata(ctx, SQLModel.metadata))
    finally:
        engine.dispose()


def test_revision_0001_is_the_schema_release4_made(tmp_path: Path, cats_dir: Path) -> None:
    old = tmp_path / "release4.db"
    restore_release4(old, cats_dir)
    fresh = tmp_path / "0001.db"
    engine = create_engine(f"sqlite:///{fresh}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001_release4")
    engine.dispose()
    assert len(sqlite_schema(old)) == 9 + 6  # tables + indexes
    assert sqlite_schema(fresh) == sqlite_schema(old)


def test_release4_database_upgrades_keeping_every_row(tmp_path: Path, cats_dir: Path, demo_dir: Path) -> None:
    path = tmp_path / "release4.db"
    url = restore_release4(path, cats_dir)
    before = table_rows(path, RELEASE4_TABLES)
    assert current_revisions(create_engine(url)) == []

    engine = make_engine(url)
    assert current_revisions(engine) == [head_revision()] == ["0004_accounts"]
    assert schema_differences(url) == []
    after = table_rows(path, RELEASE4_TABLES)
    for table, rows in before.items():  # every old row, every old column, unchanged
        assert [{k: r[k] for k in rows[0]} for r in after[table]] == rows if rows else after[table] == []
    assert {t: len(r) for t, r in before.items() if r} == {
        "calibrations": 1,
        "exports": 1,
        "images": 11,
        "predictions": 20,
        "reviews": 13,
        "split_assignments": 7,
    }

    reviews = before["reviews"]
    newest = {}
    for r in reviews:  # rowid order = id order
        newest[r["image_id"]] = r
    with Session(engine) as s:
        images = s.exec(select(ImageRecord).order_by(col(ImageRecord.id))).all()
        assert {i.id: (i.current_review_id, i.current_label) for i in images} == {
            i.id: ((newest[i.id]["id"], newest[i.id]["label"]) if i.id in newest else (None, None)) for i in images
        }
        assert (images[1].path, images[1].current_label) == (str(cats_dir / "Bengal" / "Bengal_1.jpg"), "Bengal")
        for image_id in newest:  # each photo's reviews chain in id order, nothing forks
            chain = s.exec(select(Review).where(Review.image_id == image_id).order_by(col(Review.id))).all()
            assert [r.replaces_review_id for r in chain] == [None] + [r.id for r in chain[:-1]]
        assert [(r.id, r.replaces_review_id) for r in s.exec(select(Review).where(Review.image_id == 2))] == [
            (1, None),
            (10, 1),
            (11, 10),
        ]
        assert counts.totals(s) == counts.recount(s) == counts.Totals(photos=10, failed=1, reviewed=9, verified=3)
        assert {i.id: i.current_source for i in images} == {
            i.id: (newest[i.id]["source"] if i.id in newest else None) for i in images
        }
        assert sum(r["source"] == "import" for r in newest.values()) == 6

    from catreview.app.core import ReviewApp
    from catreview.config import load_settings

    app = ReviewApp(load_settings(database_url=url, demo_dir=demo_dir, data_dir=tmp_path / "data"))
    view = app.view(2)
    assert (view["path"], view["review"]["label"], view["review"]["previous_label"]) == (
        str(cats_dir / "Bengal" / "Bengal_1.jpg"),
        "Bengal",
        "Maine Coon",
    )
    assert app.display_path(2).is_file()
    assert app.next_unreviewed() == 1 and app.counts() == (9, 10)
    changed = app.review(2, "Persian", "dave")
    first = app.review(1, "Birman", "dave")
    assert (changed.replaces_review_id, changed.previous_label, first.replaces_review_id) == (11, "Bengal", None)
    imported_only = sorted(i for i, r in newest.items() if r["source"] == "import")
    assert app.view(2)["review"]["label"] == "Persian" and app.next_unreviewed() == imported_only[0] == 3
    with Session(app.engine) as s:
        assert counts.totals(s) == counts.recount(s) == counts.Totals(photos=10, failed=1, reviewed=10, verified=4)
    assert current_revisions(make_engine(url)) == ["0004_accounts"]  # a second start changes nothing


def test_downgrade_to_release4_and_back(tmp_path: Path, cats_dir: Path) -> None:
    path = tmp_path / "release4.db"
    url = restore_release4(path, cats_dir)
    release4_columns = {t: [c["name"] for c in inspect(create_engine(url)).get_columns(t)] for t in RELEASE4_TABLES}
    engine = make_engine(url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0001_release4")
    engine.dispose()
    plain = create_engine(url)
    assert current_revisions(plain) == ["0001_release4"]
    assert {t: [c["name"] for c in inspect(plain).get_columns(t)] for t in RELEASE4_TABLES} == release4_columns
    assert not inspect(plain).has_table("collection_counts")
    plain.dispose()
    with Session(make_engine(url)) as s:  # up again: the chain and totals are rebuilt
        assert s.get(Review, 11).replaces_review_id == 10
        assert counts.totals(s) == counts.Totals(photos=10, failed=1, reviewed=9, verified=3)


def test_fresh_database_equals_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    assert current_revisions(engine) == [head_revision()]
    engine.dispose()
    assert schema_differences(db_url) == []


def test_database_from_a_newer_catreview_is_refused_untouched(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    make_engine(url).dispose()
    plain = create_engine(url)
    with plain.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
        conn.execute(text("ALTER TABLE images ADD COLUMN added_later INTEGER"))
    with pytest.raises(ValueError, match=r"revision 0099_future, which this catreview does not know.*newer catreview"):
        make_engine(url)
    assert current_revisions(plain) == ["0099_future"]
    assert "added_later" in {c["name"] for c in inspect(plain).get_columns("images")}


def test_database_of_an_unreleased_build_is_refused_with_the_fix(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dev.db'}"
    plain = create_engine(url)
    SQLModel.metadata.create_all(plain)  # what builds between 5c54044 and the migrations did
    with pytest.raises(
        ValueError, match=r"unreleased catreview build.*alembic -x url=sqlite:///.*dev\.db stamp 0004_accounts"
    ):
        make_engine(url)
    assert current_revisions(plain) == []


def test_unopenable_files_are_one_clear_error(tmp_path: Path) -> None:
    notes = tmp_path / "notes.db"
    notes.write_text("these are my notes, not a database\n")
    with pytest.raises(ValueError, match=r"cannot open the database sqlite:///.*notes\.db: file is not a database"):
        make_engine(f"sqlite:///{notes}")
    assert notes.read_text() == "these are my notes, not a database\n"
    (tmp_path / "folder.db").mkdir()
    with pytest.raises(ValueError, match=r"cannot open the database .*folder\.db: unable to open database file"):
        make_engine(f"sqlite:///{tmp_path / 'folder.db'}")


def test_in_memory_database_migrates(tmp_path: Path) -> None:
    engine = make_engine("sqlite://")
    assert current_revisions(engine) == [head_revision()]
    with Session(engine) as s:
        assert counts.totals(s) == counts.Totals(0, 0, 0)


def test_postgres_times_without_time_zone_become_utc(postgres_url: str) -> None:
    # a release-0.4 database made with an older sqlmodel: naive timestamps, the server's zone elsewhere
    engine = create_engine(postgres_url)
    time_columns = ScriptDirectory.from_config(alembic_config()).get_revision("0002_scale").module.TIME_COLUMNS
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001_release4")
        for table, columns in time_columns.items():
            for column in columns:
                conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE timestamp without time zone"))
        conn.execute(
            text(
                "INSERT INTO images (sha256, path, size, imported_at) "
                "VALUES (:sha, '/photos/a.jpg', 1, '2026-11-01 10:00:00')"
            ),
            {"sha": "a" * 64},
        )
        conn.execute(text(f"ALTER DATABASE {engine.url.database} SET timezone TO 'America/New_York'"))
    engine.dispose()
    make_engine(postgres_url).dispose()
    assert schema_differences(postgres_url) == []
    engine = create_engine(postgres_url)
    with Session(engine) as s:
        assert s.exec(select(ImageRecord.imported_at)).one() == datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
    engine.dispose()


def _start(url: str, barrier: Any) -> None:
    barrier.wait(timeout=120)  # every process has imported catreview: the starts really overlap
    make_engine(url).dispose()


@pytest.mark.slow  # 6 spawned interpreters importing catreview: ~15-35 s on 2 busy cores
def test_parallel_starts_on_one_fresh_database_migrate_once(db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_start, args=(db_url, barrier)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * 6
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [(head_revision(),)]
        assert conn.execute(text("SELECT id, photos, failed, reviewed FROM collection_counts")).all() == [(1, 0, 0, 0)]
    engine.dispose()
    assert schema_differences(db_url) == []


@pytest.mark.slow  # a CLI process (torch, demo models): ~40 s on 2 busy cores
def test_cli_json_output_stays_clean_while_migrating(tmp_path: Path, cats_dir: Path, demo_dir: Path) -> None:
    url = restore_release4(tmp_path / "release4.db", cats_dir)
    env = {"HF_HUB_OFFLINE": "1", "CATREVIEW_DEMO_DIR": str(demo_dir), "CATREVIEW_DATA_DIR": str(tmp_path / "data")}
    r = subprocess.run(
        [sys.executable, "-m", "catreview", "predictions", "--json", "--db", url],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**_base_env(), **env},
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 11 and "alembic" not in r.stdout.lower()
    assert {row["id"]: (row["review"] or {}).get("label") for row in rows}[2] == "Bengal"
    assert current_revisions(create_engine(url)) == ["0004_accounts"]


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("CATREVIEW_")}


def test_0002_database_with_reviews_upgrades_to_0003(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002_scale")
        for i, sha in enumerate("abcd", start=1):
            conn.execute(
                text(
                    "INSERT INTO images (id, sha256, path, size, imported_at, error) "
                    "VALUES (:i, :sha, :p, 1, '2026-11-01 10:00:00+00', :err)"
                ),
                {"i": i, "sha": sha * 64, "p": f"/photos/{sha}.jpg", "err": "truncated" if sha == "c" else None},
            )
        reviews = [  # photo 1: imported, then corrected by a person; photo 2: imported only; photo 4: none
            (1, 1, "import", "Persian", "import", None),
            (2, 2, "import", "Bengal", "import", None),
            (3, 1, "alice", "Birman", "ui", 1),
        ]
        for rid, image, annotator, label, source, replaces in reviews:
            conn.execute(
                text(
                    "INSERT INTO reviews (id, image_id, annotator, label, source, replaces_review_id, created_at) "
                    "VALUES (:r, :i, :a, :l, :s, :rep, '2026-11-01 10:00:00+00')"
                ),
                {"r": rid, "i": image, "a": annotator, "l": label, "s": source, "rep": replaces},
            )
        conn.execute(text("UPDATE images SET current_review_id = 3, current_label = 'Birman' WHERE id = 1"))
        conn.execute(text("UPDATE images SET current_review_id = 2, current_label = 'Bengal' WHERE id = 2"))
        conn.execute(text("UPDATE collection_counts SET photos = 3, failed = 1, reviewed = 2 WHERE id = 1"))
    engine.dispose()

    engine = make_engine(db_url)
    assert current_revisions(engine) == ["0004_accounts"]
    assert schema_differences(db_url) == []
    with Session(engine) as s:
        images = {i.id: (i.current_source, i.phash) for i in s.exec(select(ImageRecord))}
        assert images == {1: ("ui", None), 2: ("import", None), 3: (None, None), 4: (None, None)}
        assert [r.blind for r in s.exec(select(Review).order_by(col(Review.id)))] == [False, False, False]
        assert counts.totals(s) == counts.recount(s) == counts.Totals(photos=3, failed=1, reviewed=2, verified=1)
    from catreview.query import photos

    assert photos.next_unreviewed(engine) == 2  # only imported: not verified yet
    assert photos.next_unreviewed(engine, 2) == 4
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0002_scale")
    engine.dispose()
    plain = create_engine(db_url)
    assert "current_source" not in {c["name"] for c in inspect(plain).get_columns("images")}
    assert not inspect(plain).has_table("photo_scores")
    plain.dispose()
    with Session(make_engine(db_url)) as s:  # up again: sources and the verified count come back
        assert s.get(ImageRecord, 1).current_source == "ui"
        assert counts.totals(s) == counts.Totals(photos=3, failed=1, reviewed=2, verified=1)
