"""The grid (``catreview.query.grid``), its thumbnails (``catreview.query.thumbs``), bulk review
(``ReviewApp.bulk_review``) and the Grid tab's handlers, on the shared photos (SQLite).

Real shared photos imported with their folder labels, predictions of the tiny random built-in
models through the project's prediction code and the queue scores of
:func:`catreview.query.queues.refresh_scores`; every filter is checked against a reference computed
in Python from the same rows, and its SQL against SQLite's ``EXPLAIN QUERY PLAN``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import event, text
from sqlmodel import Session, col, select

from catreview.app.core import ReviewApp
from catreview.app.ui import build_ui, grid_tab
from catreview.data.db import ImageRecord, PhotoScore, Review
from catreview.data.images import ImageDecodeError
from catreview.data.importer import import_folder
from catreview.data.reviews import ReviewError
from catreview.predict.runner import run_predictions
from catreview.query.grid import UNLABELLED, BulkReviewError, GridFilter, grid_page
from catreview.query.queues import QUEUE_KINDS, queue_items, refresh_scores
from catreview.query.thumbs import THUMB_SIZE, thumbnail_file, thumbnail_path

BREEDS = ("Bengal", "Siamese", "Persian")
PER_BREED = 4


_BUILT: dict[tuple[Path, Path], Path] = {}


def _build_grid_db(tmp: Path, demo_dir: Path, cats_dir: Path) -> Path:
    """12 labelled shared photos (3 breeds) + 2 unlabelled ones and a broken file, with stage-1 and
    VLM predictions of the tiny random models and their queue scores."""
    from catreview.config import load_settings

    root = tmp / "photos"
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:PER_BREED]:
            shutil.copy(p, root / breed / p.name)
    (tmp / "unlabelled").mkdir()
    for p in sorted((cats_dir / "Bombay").glob("*.jpg"))[:2]:
        shutil.copy(p, tmp / "unlabelled" / p.name)
    (tmp / "unlabelled" / "broken.jpg").write_bytes(b"not a jpeg")
    db = tmp / "grid.db"
    app = ReviewApp(load_settings(database_url=f"sqlite:///{db}", demo_dir=demo_dir, data_dir=tmp / "data"))
    import_folder(app.engine, root, vocabulary=app.vocabulary, labels_from_folders=True, workers=1)
    import_folder(app.engine, tmp / "unlabelled", vocabulary=app.vocabulary, workers=1)
    run_predictions(app.engine, app.registry, num_workers=0, reasoning=False)
    refresh_scores(app.engine, app.registry)
    app.engine.dispose()  # checkpoints SQLite's write-ahead log into the file
    return db


@pytest.fixture(scope="session")
def grid_db(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path, cats_dir: Path) -> Path:
    """The database of :func:`_build_grid_db`, built once per process (tests/test_plots.py imports
    this fixture: one build serves both modules)."""
    key = (demo_dir, cats_dir)
    if key not in _BUILT:
        _BUILT[key] = _build_grid_db(tmp_path_factory.mktemp("grid"), demo_dir, cats_dir)
    return _BUILT[key]


@pytest.fixture
def grid_app(grid_db: Path, settings) -> ReviewApp:
    """A fresh copy of :func:`grid_db` opened by an app (tests may change it)."""
    shutil.copy(grid_db, settings.database_url.removeprefix("sqlite:///"))
    return ReviewApp(settings)


def _all_pages(app: ReviewApp, flt: GridFilter, limit: int = 5) -> list[int]:
    """Every photo of ``flt``, page by page (each page at most ``limit``, no photo twice)."""
    out: list[int] = []
    after = None
    for _ in range(100):
        page = grid_page(app.engine, flt, after=after, limit=limit)
        assert len(page.items) <= limit
        out += page.ids
        if page.next_after is None:
            return out
        assert len(page.items) == limit and page.next_after == page.ids[-1]
        after = page.next_after
    raise AssertionError("the pages never end")


def _rows(app: ReviewApp) -> list[tuple[ImageRecord, PhotoScore | None]]:
    with Session(app.engine) as s:
        images = list(s.exec(select(ImageRecord).where(col(ImageRecord.error).is_(None)).order_by(col(ImageRecord.id))))
        scores = {p.image_id: p for p in s.exec(select(PhotoScore))}
    return [(i, scores.get(i.id or 0)) for i in images]


def test_every_filter_matches_a_reference_page_by_page(grid_app: ReviewApp) -> None:
    app = grid_app
    rows = _rows(app)
    assert len(rows) == len(BREEDS) * PER_BREED + 2  # the broken file is never in the grid
    assert all(score is not None for _, score in rows)  # stage 1 ran on every photo
    assert _all_pages(app, GridFilter()) == [i.id for i, _ in rows]
    for breed in BREEDS:
        assert _all_pages(app, GridFilter(label=breed)) == [i.id for i, _ in rows if i.current_label == breed]
    assert _all_pages(app, GridFilter(label=UNLABELLED)) == [i.id for i, _ in rows if i.current_label is None]
    assert len(_all_pages(app, GridFilter(label=UNLABELLED))) == 2
    predicted = {s.fused_label for _, s in rows if s}
    for label in predicted:
        want = [i.id for i, s in rows if s and s.fused_label == label]
        assert _all_pages(app, GridFilter(predicted=label)) == want
        for breed in BREEDS:  # a confusion-matrix cell: current label x fused label
            cell = [i.id for i, s in rows if s and s.fused_label == label and i.current_label == breed]
            assert _all_pages(app, GridFilter(label=breed, predicted=label)) == cell
    stage1 = {s.stage1_label for _, s in rows if s}
    for label in stage1:
        want = [i.id for i, s in rows if s and s.stage1_label == label]
        assert _all_pages(app, GridFilter(predicted=label, predicted_by="stage 1")) == want
    for i, s in rows:
        if s and s.vlm_label and i.current_label:
            cell = [j.id for j, t in rows if t and t.vlm_label == s.vlm_label and j.current_label == i.current_label]
            assert _all_pages(app, GridFilter(label=i.current_label, predicted=s.vlm_label, predicted_by="VLM")) == cell
    # Queues: the open photos in the queue's own order (catreview.query.queues), without wrapping.
    for kind in QUEUE_KINDS:
        if kind == "label_errors":
            continue  # no label-issue scores in this database
        reference = [q.image_id for q in queue_items(app.engine, kind, limit=1000)]
        assert _all_pages(app, GridFilter(queue=kind), limit=4) == reference, kind
        assert len(reference) == len(rows)  # imported labels are unverified: every photo is open
    assert _all_pages(app, GridFilter(queue="label_errors")) == []
    # Items carry what the page shows and what a bulk review replaces.
    first = grid_page(app.engine, GridFilter(label=BREEDS[0]), limit=2).items[0]
    image, score = next((i, s) for i, s in rows if i.id == first.image_id)
    assert score is not None
    assert (first.sha256, first.current_label, first.current_review_id, first.current_source) == (
        image.sha256, image.current_label, image.current_review_id, "import"
    )  # fmt: skip
    assert (first.predicted, first.predicted_prob) == (score.fused_label, pytest.approx(score.fused_prob))
    assert first.caption.startswith(f"#{first.image_id} {BREEDS[0]} → {score.fused_label} ")


def test_bad_filters_and_limits_are_refused_with_a_reason(grid_app: ReviewApp) -> None:
    with pytest.raises(ValueError, match="unknown queue 'nope'"):
        grid_page(grid_app.engine, GridFilter(queue="nope"))
    with pytest.raises(ValueError, match="unknown predictor"):
        grid_page(grid_app.engine, GridFilter(predicted="Bengal", predicted_by="stage 2"))
    with pytest.raises(ValueError, match="needs a current label"):
        grid_page(grid_app.engine, GridFilter(predicted="Bengal", predicted_by="VLM"))
    for limit in (0, 501):
        with pytest.raises(ValueError, match="limit must be in 1..500"):
            grid_page(grid_app.engine, GridFilter(), limit=limit)


def _plans(app: ReviewApp, flt: GridFilter, after: int | None) -> list[str]:
    """SQLite's query plan of every statement :func:`grid_page` runs for ``flt``."""
    statements: list[tuple[str, object]] = []

    def remember(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(app.engine, "before_cursor_execute", remember)
    try:
        grid_page(app.engine, flt, after=after, limit=48)
    finally:
        event.remove(app.engine, "before_cursor_execute", remember)
    plans = []
    with app.engine.connect() as conn:
        for statement, parameters in statements:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()  # type: ignore[arg-type]
            plans.append(" | ".join(r[3] for r in rows))
    return plans


def test_every_filter_walks_an_index_without_sorting(grid_app: ReviewApp) -> None:
    app = grid_app
    rows = _rows(app)
    middle = rows[len(rows) // 2][0].id
    label = rows[0][0].current_label
    score = rows[0][1]
    assert score is not None and label is not None
    cases = {
        "every photo": (GridFilter(), "ix_images_decodable"),
        "no label": (GridFilter(label=UNLABELLED), "ix_images_un"),  # unreviewed / unverified (both partial on id)
        "fused label": (GridFilter(predicted=score.fused_label), "ix_photo_scores_fused_label"),
        "stage-1 label": (
            GridFilter(predicted=score.stage1_label, predicted_by="stage 1"),
            "ix_photo_scores_stage1_label",
        ),
        "cell": (  # the side with fewer photos (test_a_confusion_cell_walks_its_smaller_side)
            GridFilter(label=label, predicted=score.fused_label),
            "ix_images_current_label"
            if sum(i.current_label == label for i, _ in rows)
            < sum(s.fused_label == score.fused_label for _, s in rows if s)
            else "ix_photo_scores_fused_label",
        ),
        "import queue": (GridFilter(queue="import"), "ix_images_unverified"),
        "disagreement queue": (GridFilter(queue="disagreement"), "ix_photo_scores_disagreement"),
        "margin queue": (GridFilter(queue="margin"), "ix_photo_scores_margin"),
        "label_errors queue": (GridFilter(queue="label_errors"), "ix_photo_scores_label_issue"),
        "rare queue": (GridFilter(queue="rare"), "ix_photo_scores_rarity"),
        "random queue": (GridFilter(queue="random"), "ix_photo_scores_random"),
    }
    for name, (flt, index) in cases.items():
        for after in (None, middle):
            plans = _plans(app, flt, after)
            page_plan = plans[-1]  # the page query (a queue first reads the after photo's key by primary key)
            assert index in page_plan, (name, page_plan)
            assert "TEMP B-TREE" not in page_plan, (name, page_plan)
            assert all("SCAN images" not in p or "USING INDEX" in p for p in plans), (name, plans)
            assert all("SCAN photo_scores" not in p or "USING INDEX" in p for p in plans), (name, plans)


def test_the_current_label_filter_walks_its_own_index(grid_app: ReviewApp) -> None:
    label = _rows(grid_app)[0][0].current_label
    page_plan = _plans(grid_app, GridFilter(label=label), None)[-1]
    assert "ix_images_current_label" in page_plan and "TEMP B-TREE" not in page_plan, page_plan


def test_tied_queue_keys_are_served_by_two_short_ranges(grid_app: ReviewApp) -> None:
    """Most photos share a queue key (a zero disagreement, their class's rarity): a page from a
    tied photo reads the tied photos past it by ``key = ? AND image_id < ?`` and then the later keys,
    never one row-value range that SQLite would serve by the key alone (walking every tied photo)."""
    app = grid_app
    with app.engine.begin() as conn:
        conn.execute(text("UPDATE photo_scores SET disagreement = 0, rarity = 0.5"))
    for kind, column in (("disagreement", "disagreement"), ("rare", "rarity")):
        reference = [q.image_id for q in queue_items(app.engine, kind, limit=1000)]
        assert len(reference) == len(_rows(app))
        assert _all_pages(app, GridFilter(queue=kind), limit=4) == reference, kind
        plans = _plans(app, GridFilter(queue=kind), reference[3])
        assert len(plans) == 3, plans  # the after photo's key, the tied photos past it, the later keys
        assert f"ix_photo_scores_{'disagreement' if kind == 'disagreement' else 'rarity'}" in plans[1], plans
        assert f"({column}=? AND image_id<?)" in plans[1], plans
        assert f"({column}<?)" in plans[2], plans
        assert all("TEMP B-TREE" not in p for p in plans), plans
        page = grid_page(app.engine, GridFilter(queue=kind), after=reference[3], limit=48)
        assert page.ids == reference[4:] and page.next_after is None


def test_a_confusion_cell_walks_its_smaller_side(grid_app: ReviewApp) -> None:
    """A rare label inside a common prediction walks the label's index (checking the prediction
    per photo); a rare prediction walks the prediction's index (checking the label)."""
    app = grid_app
    siamese = [i.id for i, _ in _rows(app) if i.current_label == "Siamese"]
    with app.engine.begin() as conn:
        conn.execute(text("UPDATE photo_scores SET fused_label = 'Bengal'"))
        conn.execute(text("UPDATE photo_scores SET fused_label = 'Persian' WHERE image_id = :i"), {"i": siamese[0]})
    rows = _rows(app)
    for predicted, index in (("Bengal", "ix_images_current_label"), ("Persian", "ix_photo_scores_fused_label")):
        flt = GridFilter(label="Siamese", predicted=predicted)
        want = [i.id for i, s in rows if s and s.fused_label == predicted and i.current_label == "Siamese"]
        assert want and _all_pages(app, flt, limit=2) == want, predicted
        for after in (None, want[0]):
            plans = _plans(app, flt, after)
            assert index in plans[-1] and "TEMP B-TREE" not in plans[-1], (predicted, plans)
            assert all("SCAN images" not in p or "USING" in p for p in plans), plans
            assert all("SCAN photo_scores" not in p or "USING" in p for p in plans), plans


def test_thumbnails_are_made_once_per_content_hash(tmp_path: Path, cats_dir: Path) -> None:
    photo = sorted((cats_dir / "Bengal").glob("*.jpg"))[0]
    sha = "ab" * 32
    cache = tmp_path / "thumbs"
    thumb = thumbnail_file(photo, sha, cache)
    assert thumb == thumbnail_path(sha, cache) == cache / "ab" / f"{sha}-{THUMB_SIZE}.jpg"
    with Image.open(thumb) as im, Image.open(photo) as original:
        assert im.format == "JPEG" and max(im.size) == min(THUMB_SIZE, max(original.size))
        ratio = original.size[0] / original.size[1]
        assert im.size[0] / im.size[1] == pytest.approx(ratio, rel=0.05)  # aspect kept
    made = thumb.stat().st_mtime_ns
    moved = tmp_path / "elsewhere.jpg"  # the same bytes elsewhere: the same thumbnail, not made again
    shutil.copy(photo, moved)
    assert thumbnail_file(moved, sha, cache) == thumb and thumb.stat().st_mtime_ns == made
    assert [p.name for p in cache.rglob("*")] == ["ab", thumb.name]  # no temporary file left
    with pytest.raises(ImageDecodeError, match="file not found"):
        thumbnail_file(tmp_path / "gone.jpg", "cd" * 32, cache)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageDecodeError):
        thumbnail_file(bad, "ef" * 32, cache)
    assert not (cache / "ef").exists() or not any((cache / "ef").iterdir())
    with pytest.raises(ValueError, match="not a sha256"):
        thumbnail_path("../../etc/passwd", cache)


def test_bulk_review_stores_one_review_per_photo_and_reports_conflicts(grid_app: ReviewApp) -> None:
    app = grid_app
    page = grid_page(app.engine, GridFilter(label="Bengal"))
    ids = page.ids
    assert len(ids) == PER_BREED
    with Session(app.engine) as s:
        before = len(list(s.exec(select(Review))))
    # Nothing stored for a bad request.
    for args, message in (
        ((ids, "Bengal", " "), "annotator"),
        ((ids, "Martian", "ann"), "unknown label"),
        (([], "Bengal", "ann"), "select at least one photo"),
    ):
        with pytest.raises(ReviewError, match=message):
            app.bulk_review(*args)
    # Someone else reviews the second photo after the page was read: that photo is reported, the rest saved.
    app.review(ids[1], "Persian", "carol")
    with pytest.raises(BulkReviewError) as info:
        app.bulk_review([*ids, ids[0]], "Siamese", "dave", seen=page.seen())
    err = info.value
    assert [r.image_id for r in err.saved] == [ids[0], *ids[2:]]  # in order, the duplicate id once
    assert [i for i, _ in err.failed] == [ids[1]] and "carol chose 'Persian'" in err.failed[0][1]
    assert str(err).startswith(f"saved {PER_BREED - 1}, not saved 1: photo {ids[1]} was reviewed meanwhile")
    with Session(app.engine) as s:
        reviews = list(s.exec(select(Review).where(col(Review.id) > 0).order_by(col(Review.id))))
        current = {i.id: (i.current_label, i.current_source) for i in s.exec(select(ImageRecord))}
        opened = {p.image_id: p.open for p in s.exec(select(PhotoScore))}
    new = reviews[before:]
    assert [(r.image_id, r.label, r.annotator, r.source) for r in new] == [
        (ids[1], "Persian", "carol", "ui"),
        *[(i, "Siamese", "dave", "grid") for i in [ids[0], *ids[2:]]],
    ]
    assert all(r.previous_label == "Bengal" and r.model_snapshot_json for r in new)  # chained, with the models' outputs
    assert current[ids[1]] == ("Persian", "ui")
    assert all(current[i] == ("Siamese", "grid") for i in [ids[0], *ids[2:]])
    assert not any(opened[i] for i in ids)  # a human decision closes the photos in every queue
    # A stale page is refused for every photo; chaining (no ``seen``) is not.
    with pytest.raises(BulkReviewError) as info:
        app.bulk_review(ids[:2], "Bengal", "dave", seen=page.seen())
    assert info.value.saved == [] and len(info.value.failed) == 2
    assert [r.label for r in app.bulk_review(ids[:2], "Bengal", "dave")] == ["Bengal", "Bengal"]


def test_grid_tab_shows_thumbnails_selects_and_assigns(grid_app: ReviewApp) -> None:
    app = grid_app
    build_ui(app)  # the tab is part of the app
    gallery, selection, line, state, chosen = grid_tab.show(
        app, grid_tab.filter_of("Persian", "(any)", "fused", "(no queue)")
    )
    assert state is not None and len(gallery) == PER_BREED and line.startswith(f"Page 1: {PER_BREED} photos")
    for (path, caption), item in zip(gallery, state.page.items):
        assert Path(path).is_relative_to(app.thumbs_dir) and Path(path).is_file()  # served from the static folder
        assert caption == item.caption
    assert [c[1] for c in selection["choices"]] == [str(i) for i in state.page.ids] and selection["value"] == []
    assert chosen == []
    chosen = grid_tab.toggle(chosen, state, 0)
    chosen = grid_tab.toggle(chosen, state, 2)
    chosen = grid_tab.toggle(chosen, state, 0)  # a second click unselects
    assert chosen == [str(state.page.ids[2])]
    chosen = grid_tab.toggle(chosen, state, 1)
    message = grid_tab.assign(app, chosen, "Bengal", "erin", state)
    assert message == f"Saved 2 reviews: Bengal on #{state.page.ids[2]}, #{state.page.ids[1]}."
    assert grid_tab.assign(app, chosen, "Bengal", "", state).startswith("Not saved: enter your annotator name")
    stale = grid_tab.assign(app, chosen, "Siamese", "erin", state)  # the page still shows the old labels
    assert stale.startswith("Nothing saved. Not saved (2):") and "was reviewed meanwhile" in stale
    _, _, line, _, _ = grid_tab.show(app, grid_tab.filter_of("(any)", "(any)", "fused", "nope"))
    assert line.startswith("Cannot show this: unknown queue 'nope'")
    with Session(app.engine) as s:
        labels = dict(s.exec(select(ImageRecord.id, ImageRecord.current_label)).all())
    assert [labels[i] for i in state.page.ids] == ["Persian", "Bengal", "Bengal", "Persian"]


def test_explain_helper_sees_the_page_query(grid_app: ReviewApp) -> None:
    """The plan helper reads the statements grid_page really runs (not an empty list)."""
    plans = _plans(grid_app, GridFilter(queue="random"), _rows(grid_app)[3][0].id)
    assert len(plans) == 3 and "photo_scores" in plans[0]  # the key, then the tied photos and the later keys
    assert "ix_photo_scores_random" in plans[1] and "ix_photo_scores_random" in plans[2]
    with grid_app.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM photo_scores")).scalar() == len(BREEDS) * PER_BREED + 2


def test_pages_agree_with_a_reference_on_sqlite_and_postgresql(db_url: str) -> None:
    """Synthetic rows (many ties in the queue keys, labels with and without photos) on both
    databases: every filter's pages, walked 7 at a time, are the reference order."""
    import random

    from sqlalchemy import insert

    from catreview.data.db import make_engine, utcnow

    engine = make_engine(db_url)
    rng = random.Random(3)
    labels = ["Bengal", "Persian", "Siamese"]
    now = utcnow()
    images, scores = [], []
    for i in range(1, 61):
        label = rng.choice([*labels, None])
        error = "broken" if i % 13 == 0 else None
        images.append(dict(id=i, sha256=f"{i:064x}", path=f"/p/{i}.jpg", size=1, imported_at=now, error=error,
                           current_label=label, current_review_id=i if label else None,
                           current_source=rng.choice(["import", "ui"]) if label else None))  # fmt: skip
        if error is None and i % 11:  # every 11th decodable photo has no score row (not predicted yet)
            pred = rng.choice([*labels, "other"])
            scores.append(dict(image_id=i, open=rng.random() < 0.7, stage1_label=rng.choice(labels), stage1_prob=0.5,
                               vlm_label=rng.choice(labels), vlm_prob=0.4, fused_label=pred, fused_prob=0.6,
                               fused_margin=rng.choice([0.1, 0.2, 0.3]), disagreement=rng.choice([0.0, 0.5]),
                               rarity=rng.choice([0.25, 0.75]), label_issue=rng.choice([None, 0.9, 0.1]),
                               random_key=rng.random(), models="m", updated_at=now))  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(ImageRecord), images)
        conn.execute(insert(PhotoScore), scores)
    ok = {r["id"]: r for r in images if r["error"] is None}
    sc = {i: {"fused_label": None, "vlm_label": None} for i in ok} | {s["image_id"]: s for s in scores}

    def walk(flt: GridFilter) -> list[int]:
        out, after = [], None
        while True:
            page = grid_page(engine, flt, after=after, limit=7)
            out += page.ids
            if page.next_after is None:
                return out
            after = page.next_after

    assert walk(GridFilter()) == sorted(ok)
    for label in labels:
        assert walk(GridFilter(label=label)) == [i for i in sorted(ok) if ok[i]["current_label"] == label]
        assert walk(GridFilter(predicted=label)) == [i for i in sorted(ok) if sc[i]["fused_label"] == label]
        for pred in [*labels, "other"]:
            cell = [i for i in sorted(ok) if ok[i]["current_label"] == label and sc[i]["fused_label"] == pred]
            assert walk(GridFilter(label=label, predicted=pred)) == cell
            vlm = [i for i in sorted(ok) if ok[i]["current_label"] == label and sc[i]["vlm_label"] == pred]
            assert walk(GridFilter(label=label, predicted=pred, predicted_by="VLM")) == vlm
    assert walk(GridFilter(label=UNLABELLED)) == [i for i in sorted(ok) if ok[i]["current_label"] is None]
    unverified = [i for i in sorted(ok) if ok[i]["current_source"] in (None, "import")]
    assert walk(GridFilter(queue="import")) == unverified
    orders = {"disagreement": ("disagreement", True), "margin": ("fused_margin", False),
              "rare": ("rarity", True), "random": ("random_key", False), "label_errors": ("label_issue", True)}  # fmt: skip
    for kind, (key, desc) in orders.items():
        rows = [s for s in scores if s["open"] and s[key] is not None]
        rows.sort(key=lambda s: (s[key], s["image_id"]), reverse=desc)
        assert walk(GridFilter(queue=kind)) == [s["image_id"] for s in rows], kind
        assert walk(GridFilter(queue=kind)) == [q.image_id for q in queue_items(engine, kind, limit=1000)], kind
    engine.dispose()


def test_postgresql_pages_read_only_their_own_rows(postgres_url: str) -> None:
    """On PostgreSQL a page from the middle of 20,000 photos reads about a page of rows in every
    plan node (``EXPLAIN ANALYZE``): each id bound is stated on both joined tables, so no merge
    join walks the other table's primary key from its first row (what made a page cost ~13 ms at
    127,000 photos; benchmarks/grid_bench.py)."""
    import re

    from sqlalchemy import insert

    from catreview.data.db import make_engine, utcnow

    engine = make_engine(postgres_url)
    n, now = 20_000, utcnow()
    labels = ["Bengal", "Persian", "Siamese", "Domestic Short Hair"]
    images = [dict(id=i, sha256=f"{i:064x}", path=f"/p/{i}.jpg", size=1, imported_at=now,
                   current_label=labels[i % 4], current_review_id=i, current_source="import")
              for i in range(1, n + 1)]  # fmt: skip
    scores = [dict(image_id=i, open=True, stage1_label=labels[i % 3], stage1_prob=0.5, fused_label=labels[i % 3],
                   fused_prob=0.5, fused_margin=(i % 997) / 997, disagreement=0.0 if i % 4 else 0.5, rarity=0.5,
                   random_key=(i * 7919 % n) / n, models="m", updated_at=now)
              for i in range(1, n + 1) if i % 50]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(ImageRecord), images)
        conn.execute(insert(PhotoScore), scores)
        conn.exec_driver_sql("ANALYZE")  # what autovacuum does after a bulk load
    middle = n // 2
    filters = {
        "all": GridFilter(),
        "label": GridFilter(label="Bengal"),
        "predicted": GridFilter(predicted="Persian"),
        "import queue": GridFilter(queue="import"),
        "margin queue": GridFilter(queue="margin"),
        "disagreement queue (tied)": GridFilter(queue="disagreement"),
    }
    statements: list[tuple[str, object]] = []
    for name, flt in filters.items():
        statements.clear()

        def remember(conn, cursor, statement, parameters, context, executemany) -> None:
            if statement.lstrip().upper().startswith("SELECT"):
                statements.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", remember)
        try:
            page = grid_page(engine, flt, after=middle, limit=48)
        finally:
            event.remove(engine, "before_cursor_execute", remember)
        assert len(page.items) == 48, name
        with engine.connect() as conn:
            for statement, parameters in statements:
                plan = [r[0] for r in conn.exec_driver_sql("EXPLAIN ANALYZE " + statement, parameters)]  # type: ignore[arg-type]
                read = [
                    int(r) * int(loops)
                    for r, loops in re.findall(r"actual time=\S+ rows=(\d+) loops=(\d+)", " ".join(plan))
                ]
                assert read and max(read) <= 500, (name, plan)
    engine.dispose()
