"""Recent decisions, undo (append-only), a photo's history and jumping to a photo, on real photos
and both databases (``db_url``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from catreview.app.core import ReviewApp
from catreview.config import load_settings
from catreview.data import counts
from catreview.data.db import ImageRecord, Review
from catreview.data.importer import import_folder
from catreview.data.reviews import ReviewError
from catreview.query.history import NO_DECISION, UNDO_SOURCE
from catreview.query.photos import page


@pytest.fixture
def photos(tmp_path: Path, cats_dir: Path) -> Path:
    """Two Persian and two Birman photos (labelled by folder) and two unlabelled Bengal ones."""
    root = tmp_path / "photos"
    for breed in ("Persian", "Birman"):
        (root / "labelled" / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:2]:
            shutil.copy(p, root / "labelled" / breed / p.name)
    (root / "open").mkdir()
    for p in sorted((cats_dir / "Bengal").glob("*.jpg"))[:2]:
        shutil.copy(p, root / "open" / p.name)
    return root


@pytest.fixture
def app(db_url: str, tmp_path: Path, demo_dir: Path, photos: Path) -> ReviewApp:
    settings = load_settings(database_url=db_url, demo_dir=demo_dir, data_dir=tmp_path / "data")
    a = ReviewApp(settings)
    import_folder(a.engine, photos / "labelled", vocabulary=a.vocabulary, labels_from_folders=True)
    import_folder(a.engine, photos / "open", vocabulary=a.vocabulary)
    return a


def _state(app: ReviewApp, image_id: int) -> tuple[str | None, str | None, int | None]:
    with Session(app.engine) as s:
        img = s.get(ImageRecord, image_id)
        assert img is not None
        return img.current_label, img.current_source, img.current_review_id


def _totals(app: ReviewApp) -> tuple[int, int, int]:
    with Session(app.engine) as s:
        t = counts.totals(s)
        assert t == counts.recount(s)  # the running totals stay exact through undo
        return t.photos, t.reviewed, t.verified


def _rows(app: ReviewApp) -> list[tuple[int, str, str, str]]:
    with Session(app.engine) as s:
        return [(r.image_id, r.annotator, r.label, r.source) for r in s.exec(select(Review).order_by(col(Review.id)))]


def test_undo_restores_the_previous_label_by_a_new_review(app: ReviewApp) -> None:
    ids = page(app.engine)
    assert len(ids) == 6
    labelled, unlabelled = ids[:4], ids[4:]
    assert _totals(app) == (6, 4, 0)  # imported labels count as labelled, not verified
    imported = _state(app, labelled[0])
    assert imported[1] == "import"

    # alice: corrects an imported label, labels an unlabelled photo, then relabels it
    app.review(labelled[0], "Exotic Shorthair", "alice")
    app.review(unlabelled[0], "Bengal", "alice")
    app.review(unlabelled[0], "Ocicat", "alice")
    app.review(labelled[1], "Persian", "bob")  # someone else's decision is never undone by alice
    assert _totals(app) == (6, 5, 3)
    recent = app.recent_decisions("alice")
    assert [(d.image_id, d.label, d.previous_label, d.current) for d in recent] == [
        (unlabelled[0], "Ocicat", "Bengal", True),
        (unlabelled[0], "Bengal", None, False),
        (labelled[0], "Exotic Shorthair", imported[0], True),
    ]
    assert recent[0].file_name == Path(_path(app, unlabelled[0])).name
    before = len(_rows(app))

    # 1st undo: Ocicat -> Bengal again, a human decision (source "undo")
    u1 = app.undo_last("alice")
    assert (u1.image_id, u1.undone_label, u1.restored_label, u1.restored_source) == (
        unlabelled[0],
        "Ocicat",
        "Bengal",
        UNDO_SOURCE,
    )
    assert _state(app, unlabelled[0]) == ("Bengal", UNDO_SOURCE, u1.review_id)
    assert len(_rows(app)) == before + 1  # append-only: nothing deleted or changed
    assert _totals(app) == (6, 5, 3)

    # 2nd undo skips the undone Ocicat and the Bengal decision no longer in effect: the imported
    # label of labelled[0] comes back, unverified again
    u2 = app.undo_last("alice")
    assert (u2.image_id, u2.restored_label, u2.restored_source) == (labelled[0], imported[0], "import")
    assert _state(app, labelled[0])[:2] == (imported[0], "import")
    assert _totals(app) == (6, 5, 2)
    assert app.next_unreviewed(None) is not None

    with pytest.raises(ReviewError, match="nothing to undo"):
        app.undo_last("alice")
    with pytest.raises(ReviewError, match="annotator"):
        app.undo_last("  ")
    assert _state(app, labelled[1])[:2] == ("Persian", "ui")  # bob's decision stands
    assert len(_rows(app)) == before + 2


def test_undoing_a_first_review_leaves_the_photo_unreviewed(app: ReviewApp) -> None:
    open_id = page(app.engine)[5]
    assert _state(app, open_id) == (None, None, None)
    first = app.review(open_id, "Bengal", "carol", "spots")
    assert _totals(app) == (6, 5, 1)
    undo = app.undo_last("carol")
    assert undo.restored_label is None and undo.undone_review_id == first.id
    assert _state(app, open_id) == (None, None, None)
    assert _totals(app) == (6, 4, 0)
    assert app.next_unreviewed(open_id - 1) == open_id  # back in the unreviewed queue
    hist = app.photo_history(open_id)
    assert [(h.label, h.previous_label, h.annotator, h.source) for h in hist] == [
        ("Bengal", None, "carol", "ui"),
        (NO_DECISION, "Bengal", "carol", UNDO_SOURCE),
    ]
    assert hist[0].note == "spots" and hist[1].note == f"undo of review #{first.id} by carol"
    assert hist[0].time <= hist[1].time
    # a new decision starts a new chain, and can itself be undone
    again = app.review(open_id, "Bengal", "carol")
    assert again.replaces_review_id is None and again.previous_label is None
    assert _totals(app) == (6, 5, 1)
    app.undo_last("carol")
    assert _state(app, open_id) == (None, None, None) and _totals(app) == (6, 4, 0)
    assert app.recent_decisions("carol", limit=1)[0].current is False


def test_recent_decisions_limit_and_blind_flag(app: ReviewApp) -> None:
    ids = page(app.engine)
    for i in ids:
        app.review(i, "Not a cat", "dave")
    app.review(ids[0], "Unsure", "dave", blind=True)
    recent = app.recent_decisions("dave", limit=3)
    assert [(d.image_id, d.label, d.blind) for d in recent] == [
        (ids[0], "Unsure", True),
        (ids[5], "Not a cat", False),
        (ids[4], "Not a cat", False),
    ]
    assert len(app.recent_decisions("dave")) == 7 and app.recent_decisions("nobody") == []
    assert app.recent_decisions("") == []
    with pytest.raises(ValueError, match="limit"):
        app.recent_decisions("dave", limit=0)


def _path(app: ReviewApp, image_id: int) -> str:
    with Session(app.engine) as s:
        img = s.get(ImageRecord, image_id)
        assert img is not None
        return img.path


def test_find_photo_by_id_path_or_file_name(app: ReviewApp) -> None:
    ids = page(app.engine)
    target = ids[3]
    path = _path(app, target)
    assert app.find_photo(str(target)) == target
    assert app.find_photo(f" #{target} ") == target
    assert app.find_photo(path) == target
    assert app.find_photo(Path(path).name) == target
    assert app.find_photo("no-such-photo.jpg") is None
    assert app.find_photo("999999") is None
    assert app.find_photo("") is None
    # LIKE wildcards in a name are literal
    assert app.find_photo("%") is None and app.find_photo("_" * len(Path(path).name)) is None
