"""Review queues and imported labels as unverified, on the shared photos with real predictions of
the tiny random built-in models (through the app's predict code), on SQLite and PostgreSQL.

One SQLite database is built per module (import with folder labels, predict, score) and copied
for each test; the PostgreSQL test imports the same photos and copies the predictions over.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlmodel import Session, col, select

from catreview.app.core import ReviewApp
from catreview.config import load_settings
from catreview.data import counts
from catreview.data.db import ImageRecord, PhotoScore, Prediction, Review
from catreview.data.importer import import_folder
from catreview.data.reviews import append_first_reviews
from catreview.predict.runner import insert_predictions, run_predictions
from catreview.query import queues
from catreview.query.queues import QUEUE_KINDS, QueueItem, next_in_queue, store_label_issues

BREEDS = ("Bengal", "Persian", "Sphynx", "Siamese")
PER_BREED = 4
N = len(BREEDS) * PER_BREED
SCORED_KINDS = [k for k in QUEUE_KINDS if k not in ("import", "label_errors")]


def _photos(cats_dir: Path, root: Path) -> Path:
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:PER_BREED]:
            shutil.copy(p, root / breed / p.name)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, cats_dir: Path, demo_dir: Path) -> Path:
    """A SQLite file: 16 shared photos imported with their folder labels, predicted, scored."""
    base = tmp_path_factory.mktemp("queues")
    settings = load_settings(database_url=f"sqlite:///{base / 'q.db'}", demo_dir=demo_dir, data_dir=base / "data")
    app = ReviewApp(settings)
    import_folder(app.engine, _photos(cats_dir, base / "photos"), vocabulary=app.vocabulary, labels_from_folders=True)
    run_predictions(app.engine, app.registry, num_workers=0, reasoning=False)
    assert app.refresh_scores() == N
    app.engine.dispose()
    return base


@pytest.fixture
def app(built: Path, tmp_path: Path, demo_dir: Path) -> Iterator[ReviewApp]:
    shutil.copy(built / "q.db", tmp_path / "q.db")
    settings = load_settings(database_url=f"sqlite:///{tmp_path / 'q.db'}", demo_dir=demo_dir, data_dir=built / "data")
    a = ReviewApp(settings)
    yield a
    a.engine.dispose()


def scores(app: ReviewApp) -> list[PhotoScore]:
    with Session(app.engine) as s:
        return list(s.exec(select(PhotoScore).order_by(col(PhotoScore.image_id))))


def expected_order(rows: list[PhotoScore], kind: str) -> list[int]:
    """The queue's order computed in Python from the rows (open rows, key then id)."""
    column, descending = queues.ORDERS[kind].column.key, queues.ORDERS[kind].descending
    rows = [r for r in rows if r.open and getattr(r, column) is not None]
    return [r.image_id for r in sorted(rows, key=lambda r: (getattr(r, column), r.image_id), reverse=descending)]


def test_imported_labels_are_unverified_until_a_person_confirms(app: ReviewApp) -> None:
    totals = app.review_totals()
    assert totals == counts.Totals(photos=N, failed=0, reviewed=N, verified=0)
    assert (totals.imported, totals.unverified, app.counts()) == (N, N, (N, N))
    first = app.next_unreviewed()
    assert first is not None and app.view(first)["review"]["source"] == "import"
    assert app.next_unreviewed(first) == first + 1

    r = app.review(first, app.view(first)["review"]["label"], "alice", blind=True)  # confirming = a human review
    with Session(app.engine) as s:
        img = s.get(ImageRecord, first)
        assert (img.current_source, img.current_review_id, r.source, r.blind) == ("ui", r.id, "ui", True)
        assert s.get(PhotoScore, first).open is False
        assert counts.totals(s) == counts.recount(s) == counts.Totals(N, 0, N, 1)
    assert app.refresh_scores() == N  # a refresh reads the decision back from the photo
    with Session(app.engine) as s:
        assert [r.image_id for r in s.exec(select(PhotoScore).where(col(PhotoScore.open).is_(False)))] == [first]
    assert app.next_unreviewed(first - 1 if first > 1 else None) == first + 1
    assert app.next_unreviewed(N) == first + 1  # wraps past the confirmed photo
    assert app.review(first + 1, "Persian", "alice").blind is False

    with Session(app.engine) as s:  # a human bulk first review (no import label) counts as verified
        img = ImageRecord(sha256="f" * 64, path="/nowhere.jpg", size=1)
        s.add(img)
        counts.bump(s, photos=1)
        s.commit()
        made = append_first_reviews(s, {img.id: "Bengal"}, "bob", source="grid")
        s.commit()
        assert list(made) == [img.id]
        assert counts.totals(s) == counts.recount(s) == counts.Totals(N + 1, 0, N + 1, 3)
        assert s.get(ImageRecord, img.id).current_source == "grid"


def test_scores_follow_the_stored_predictions(app: ReviewApp) -> None:
    rows = scores(app)
    assert len(rows) == N and all(r.open for r in rows)
    assert len({r.models for r in rows}) == 1
    labels = [r.fused_label for r in rows]
    for r in rows:
        view = app.view(r.image_id)
        fused = sorted(view["fused"]["probabilities"].values(), reverse=True)
        assert (r.fused_label, r.stage1_label) == (view["fused"]["label"], view["stage1"][0]["label"])
        assert r.fused_margin == pytest.approx(fused[0] - fused[1])
        assert r.random_key == int(view["sha256"][:13], 16) / 2**52
        vlm = view["vlm"]
        assert (r.vlm_label, r.vlm_prob) == (vlm["label"], pytest.approx(vlm["confidence"]))
        assert 0.0 <= r.disagreement <= 1.0
        assert (r.disagreement == 0.0) == (r.vlm_label == r.stage1_label)
        freq = labels.count(r.fused_label)
        assert r.rarity == pytest.approx(queues.rarity(freq, N))
    assert queues.rarity(1, N) == 1.0 and queues.rarity(N, N) == 0.0
    # a refresh rewrites the same rows and keeps the label-issue scores
    with Session(app.engine) as s:
        assert store_label_issues(s, [(rows[0].image_id, 0.9, "imported label Bengal, out-of-fold says X")]) == 1
    assert app.refresh_scores() == N
    again = scores(app)
    assert [(r.image_id, r.fused_margin, r.rarity) for r in again] == [
        (r.image_id, r.fused_margin, r.rarity) for r in rows
    ]
    assert again[0].label_issue == 0.9


@pytest.mark.parametrize("kind", SCORED_KINDS)
def test_each_queue_lists_open_photos_in_its_order_with_reasons(app: ReviewApp, kind: str) -> None:
    order = expected_order(scores(app), kind)
    items = app.queue_items(kind, limit=100)
    assert [i.image_id for i in items] == order and len(order) == N
    assert all(isinstance(i, QueueItem) and i.reason for i in items)
    keys = [i.score for i in items]
    assert keys == sorted(keys, reverse=queues.ORDERS[kind].descending)

    walked, at = [], None  # next_in_queue walks the same order, then wraps to the first
    for _ in range(N + 1):
        nxt = app.next_in_queue(kind, at)
        assert nxt is not None
        walked.append(nxt.image_id)
        at = nxt.image_id
    assert walked == [*order, order[0]]
    mid = order[5]  # a page after photo ``mid`` wraps around and lists every other photo once
    assert [i.image_id for i in app.queue_items(kind, 100, after=mid)] == order[6:] + order[:6]

    app.review(order[6], "Bengal", "alice")  # decided: out of every queue; the walk goes on past it
    assert app.next_in_queue(kind, mid).image_id == order[7]
    assert app.next_in_queue(kind, order[6]).image_id == order[7]
    assert order[6] not in [i.image_id for i in app.queue_items(kind, 100)]


def test_reasons_say_why(app: ReviewApp) -> None:
    rows = {r.image_id: r for r in scores(app)}
    top = app.next_in_queue("disagreement")
    r = rows[top.image_id]
    assert top.score == r.disagreement > 0
    assert top.reason == f"stage 1 {r.stage1_label} {r.stage1_prob:.2f} vs VLM {r.vlm_label} {r.vlm_prob:.2f}"
    low = app.next_in_queue("margin")
    r = rows[low.image_id]
    second = r.fused_prob - r.fused_margin
    assert low.reason == f"lowest fused margin: {r.fused_label} {r.fused_prob:.2f} vs {r.fused_runner_up} {second:.2f}"
    assert app.next_in_queue("import").reason.startswith("import order: imported label ")


def test_label_error_queue_is_what_was_stored(app: ReviewApp) -> None:
    assert app.next_in_queue("label_errors") is None  # nothing ranked yet
    ids = [r.image_id for r in scores(app)]
    issues = [(ids[3], 0.95, "imported label Persian, out-of-fold stage-1 says Bengal 0.83"), (ids[0], 0.4, "b")]
    with Session(app.engine) as s:
        assert store_label_issues(s, [*issues, (10_000, 0.5, "no such photo")]) == 2
        with pytest.raises(ValueError, match="0..1; photo 7 has 1.5"):
            store_label_issues(s, [(7, 1.5, "x")])
    items = app.queue_items("label_errors", 10)
    assert [(i.image_id, i.score, i.reason) for i in items] == [(i, sc, why) for i, sc, why in issues]
    with Session(app.engine) as s:  # a new ranking replaces the old one entirely
        store_label_issues(s, [(ids[1], 0.7, "c")])
    assert [i.image_id for i in app.queue_items("label_errors", 10)] == [ids[1]]


def test_bad_queue_requests_are_clear_errors(app: ReviewApp) -> None:
    with pytest.raises(ValueError, match="unknown queue 'sorted'; choose one of: import, disagreement"):
        app.next_in_queue("sorted")
    with pytest.raises(ValueError, match=r"limit must be in 1\.\.10000, not 0"):
        app.queue_items("margin", 0)
    assert app.next_in_queue("margin", after=999_999) == app.next_in_queue("margin")  # unknown photo: the start


def _statements(app: ReviewApp, call: Any) -> list[tuple[str, Any]]:
    """(SQL, parameters) of every statement ``call()`` runs on the app's engine."""
    seen: list[tuple[str, Any]] = []

    def hook(_c: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    event.listen(app.engine, "before_cursor_execute", hook)
    try:
        call()
    finally:
        event.remove(app.engine, "before_cursor_execute", hook)
    return seen


def _plans(app: ReviewApp, call: Any) -> tuple[list[str], list[list[str]]]:
    """The statements ``call()`` runs and each one's SQLite query plan."""
    seen = _statements(app, call)
    with app.engine.connect() as conn:
        plans = [[str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + q, p).all()] for q, p in seen]
    return [q for q, _ in seen], plans


INDEX = {
    "import": "ix_images_unverified",
    "disagreement": "ix_photo_scores_disagreement",
    "margin": "ix_photo_scores_margin",
    "label_errors": "ix_photo_scores_label_issue",
    "rare": "ix_photo_scores_rarity",
    "random": "ix_photo_scores_random",
}


@pytest.mark.parametrize("kind", list(QUEUE_KINDS))
def test_queue_queries_use_their_partial_index_and_never_sort(app: ReviewApp, kind: str) -> None:
    ids = [r.image_id for r in scores(app)]
    with Session(app.engine) as s:
        store_label_issues(s, [(i, (k + 1) / N, "x") for k, i in enumerate(ids)])
    order = [i.image_id for i in app.queue_items(kind, 100)]
    for after in (None, order[3], order[-1]):  # from the start, mid-queue, at the end (wraps)
        statements, plans = _plans(app, lambda after=after: next_in_queue(app.engine, kind, after))
        assert 1 <= len(statements) <= 3, statements
        assert any("LIMIT" in q for q in statements)
        for q, plan in zip(statements, plans):
            text = " ".join(plan)
            if "LIMIT" in q:
                assert INDEX[kind] in text, (q, plan)
            assert "TEMP B-TREE" not in text, (q, plan)  # no sort
            # a scan of a table (not of a LIMITed subquery's rows) only along an index, in order
            scans = [d for d in plan if d.split()[:2] in (["SCAN", "photo_scores"], ["SCAN", "images"])]
            assert all("INDEX" in d for d in scans), (q, plan)


def test_queue_cli_prints_the_same_list(app: ReviewApp, capsys: pytest.CaptureFixture[str]) -> None:
    from catreview.cli.main import main

    url = str(app.engine.url)
    assert main(["queue", "--by", "margin", "--limit", "5", "--json", "--db", url]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = app.queue_items("margin", 5)
    assert [(o["id"], o["score"], o["reason"], o["queue"]) for o in out] == [
        (i.image_id, i.score, i.reason, "margin") for i in want
    ]
    assert all(Path(o["path"]).is_file() and o["label"] == app.view(o["id"])["review"]["label"] for o in out)
    assert {o["label"] for o in out} <= {"Bengal", "Persian", "Sphynx - Hairless Cat", "Siamese"}
    assert main(["queue", "--by", "import", "--limit", "2", "--db", url]) == 0
    text = capsys.readouterr()
    assert len(text.out.splitlines()) == 2 and "2 photo(s) in queue 'import'" in text.err
    with pytest.raises(SystemExit) as exc:
        main(["queue", "--by", "best", "--db", url])
    assert exc.value.code == 2 and "invalid choice: 'best'" in capsys.readouterr().err


def test_postgres_serves_the_same_queues(app: ReviewApp, postgres_url: str, built: Path, demo_dir: Path) -> None:
    settings = load_settings(database_url=postgres_url, demo_dir=demo_dir, data_dir=built / "data")
    pg = ReviewApp(settings)
    import_folder(pg.engine, built / "photos", vocabulary=pg.vocabulary, labels_from_folders=True)
    with Session(app.engine) as src, Session(pg.engine) as dst:  # the same real predictions
        sha = {i.id: i.sha256 for i in src.exec(select(ImageRecord))}
        to_pg = {i.sha256: i.id for i in dst.exec(select(ImageRecord))}
        rows = [p.model_dump(exclude={"id"}) for p in src.exec(select(Prediction))]
        insert_predictions(dst, [{**r, "image_id": to_pg[sha[r["image_id"]]]} for r in rows])
    assert pg.refresh_scores() == N
    back = {v: k for k, v in to_pg.items()}
    for kind in [*SCORED_KINDS, "import"]:
        sqlite_items = [(sha[i.image_id], round(i.score, 9), i.reason) for i in app.queue_items(kind, 100)]
        pg_items = [(back[i.image_id], round(i.score, 9), i.reason) for i in pg.queue_items(kind, 100)]
        if kind == "import":  # ids differ between the databases: same photos, same reasons
            assert sorted(x[::2] for x in pg_items) == sorted(x[::2] for x in sqlite_items)
        else:
            assert pg_items == sqlite_items, kind
    for kind in QUEUE_KINDS:  # the partial indexes serve the queries (sequential scans off: 16 rows are few)
        statements = _statements(pg, lambda kind=kind: pg.next_in_queue(kind, 3))
        with pg.engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            for sql, params in statements:
                if "LIMIT" in sql:
                    plan = " ".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql, params).all())
                    assert (
                        f"Index Scan Backward using {INDEX[kind]}" in plan or f"Index Scan using {INDEX[kind]}" in plan
                    ), (
                        kind,
                        plan,
                    )
                    assert "Sort" not in plan, plan
    order = [i.image_id for i in pg.queue_items("margin", 100)]
    pg.review(order[0], "Bengal", "alice")
    assert pg.next_in_queue("margin").image_id == order[1]
    assert pg.refresh_scores() == N and pg.next_in_queue("margin").image_id == order[1]  # a refresh keeps it closed
    with Session(pg.engine) as s:
        assert counts.totals(s) == counts.recount(s) == counts.Totals(N, 0, N, 1)
        assert s.exec(select(Review).where(Review.image_id == order[0], col(Review.blind).is_(False))).all()
        assert store_label_issues(s, [(order[2], 0.5, "r")]) == 1
    assert pg.next_in_queue("label_errors").image_id == order[2]
    pg.engine.dispose()


def test_the_apps_prediction_pass_scores_the_queues(settings: Any, cats_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "few"
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        shutil.copy(sorted((cats_dir / breed).glob("*.jpg"))[0], root / breed)
    app = ReviewApp(settings)
    assert app.start_background([root], labels_from_folders=True)
    assert app.wait(timeout=240), "start-up import + predictions still running"
    assert app.job.error is None, app.job.log
    assert "review queues: 4 photos scored" in app.job.log
    assert len(scores(app)) == 4 and len(app.queue_items("disagreement", 10)) == 4
    assert app.review_totals() == counts.Totals(photos=4, failed=0, reviewed=4, verified=0)
