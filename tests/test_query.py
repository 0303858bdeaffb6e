"""The query layer's per-click answers cost the same at any collection size.

Checked without timings: every SQL statement a click runs is captured; their number must not
change when the collection grows 100-fold, and on SQLite ``EXPLAIN QUERY PLAN`` must show no
full scan of the tables that grow with the collection (images, predictions, reviews).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlmodel import Session, col, select

from catreview.app.core import ReviewApp
from catreview.data import counts
from catreview.data.db import ImageRecord, Prediction, insert_ignoring_conflicts
from catreview.data.importer import import_folder
from catreview.data.reviews import append_first_reviews
from catreview.predict.runner import insert_predictions, run_predictions
from catreview.query import photos

GROWING = ("images", "predictions", "reviews")


@pytest.fixture
def app(settings, cats_dir: Path, tmp_path: Path) -> ReviewApp:
    """12 real photos with real (demo-model) predictions, 6 of them reviewed."""
    root = tmp_path / "photos"
    for breed in ("Bengal", "Persian", "Sphynx"):
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:4]:
            shutil.copy(p, root / breed / p.name)
    app = ReviewApp(settings)
    summary = import_folder(app.engine, root, vocabulary=app.vocabulary)
    run_predictions(app.engine, app.registry, num_workers=0)
    for i in summary.image_ids[:6]:
        app.review(i, "Bengal", "alice")
    return app


def grow(app: ReviewApp, extra: int) -> None:
    """Add ``extra`` photos backed by the first photo's file, with its predictions; 90% reviewed."""
    with Session(app.engine) as s:
        first = s.exec(select(ImageRecord).order_by(col(ImageRecord.id)).limit(1)).one()
        template = [
            p.model_dump(exclude={"id"}) for p in s.exec(select(Prediction).where(Prediction.image_id == first.id))
        ]
        rows = [
            {"sha256": hashlib.sha256(f"grow-{i}".encode()).hexdigest(), "path": first.path, "size": first.size}
            for i in range(extra)
        ]
        s.exec(insert_ignoring_conflicts(s, ImageRecord, ["sha256"]), params=rows)
        counts.bump(s, photos=extra)
        s.commit()
        new = list(s.exec(select(ImageRecord.id).where(col(ImageRecord.id) > first.id + 11)))
        insert_predictions(s, [{**row, "image_id": i} for i in new for row in template])
        append_first_reviews(s, {i: "Persian" for k, i in enumerate(new) if k % 10}, "import", source="import")
        s.commit()
        assert counts.totals(s) == counts.recount(s)


@contextmanager
def captured(app: ReviewApp) -> Iterator[list[tuple[str, Any]]]:
    """The (SQL, parameters) of every statement run on the app's engine inside the block."""
    seen: list[tuple[str, Any]] = []

    def hook(_conn, _cursor, statement, parameters, _context, executemany):
        if not executemany:
            seen.append((statement, parameters))

    event.listen(app.engine, "before_cursor_execute", hook)
    try:
        yield seen
    finally:
        event.remove(app.engine, "before_cursor_execute", hook)


def clicks(app: ReviewApp) -> dict[str, Callable[[], Any]]:
    """What one click of each Review-tab control asks of the core, on a reviewed photo."""
    from catreview.app.ui.review_tab import render

    mid = photos.page(app.engine, limit=3)[-1]  # reviewed already, so a save changes nothing a click reads
    return {
        "show": lambda: render(app, mid),
        "next": lambda: app.neighbour(mid, 1),
        "previous": lambda: app.neighbour(mid, -1),
        "next unreviewed": lambda: app.next_unreviewed(mid),
        "counts": app.counts,
        "save": lambda: app.review(mid, "Sphynx", "bob"),
        "page": lambda: photos.page(app.engine, after=mid, limit=50),
        "failed": lambda: app.failed_images(limit=50),
    }


def full_scans(app: ReviewApp, statements: list[tuple[str, Any]]) -> list[str]:
    """Statements whose SQLite plan scans a growing table whole (``SCAN images`` etc.)."""
    bad = []
    with app.engine.connect() as conn:
        for sql, params in statements:
            if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "WITH")):
                continue
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params).all()
            details = [str(row[-1]) for row in plan]
            if any(d.startswith("SCAN") and d.split()[1] in GROWING and "USING" not in d for d in details):
                bad.append(f"{sql} -> {details}")
    return bad


def test_clicks_run_the_same_statements_at_12_and_1212_photos_and_never_scan(app: ReviewApp) -> None:
    before: dict[str, int] = {}
    for name, click in clicks(app).items():
        click()  # warm: models loaded, display file made
        with captured(app) as seen:
            click()
        before[name] = len(seen)
        assert not full_scans(app, seen), name
    grow(app, 1200)
    for name, click in clicks(app).items():
        click()
        with captured(app) as seen:
            click()
        assert len(seen) == before[name], (name, before[name], [s for s, _ in seen])
        assert not full_scans(app, seen), (name, full_scans(app, seen))


def test_views_stream_in_batches_and_match_one_by_one(app: ReviewApp) -> None:
    grow(app, 30)
    ids = [v["id"] for v in photos.iter_views(app.engine, app.registry, batch_size=7)]
    with Session(app.engine) as s:
        assert ids == sorted(s.exec(select(ImageRecord.id)))
    some = ids[::9]
    streamed = list(photos.iter_views(app.engine, app.registry, image_ids=some, batch_size=2))
    assert streamed == [app.view(i) for i in some]
    assert streamed[0]["stage1"] and streamed[0]["fused"] and streamed[0]["vlm"]
