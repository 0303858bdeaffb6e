"""The Review tab's save (:meth:`ReviewApp.save_decision`): a save names the review the annotator
was shown and is refused when someone reviewed the photo meanwhile; a photo open in the overlap
round takes blind votes and is served by the per-annotator overlap queue. Real shared photos, on
SQLite and the PostgreSQL server the tests start."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from catreview.app.core import OVERLAP_QUEUE, ReviewApp
from catreview.config import load_settings
from catreview.data import overlap
from catreview.data.db import ImageRecord, OverlapItem, OverlapVote, Review
from catreview.data.importer import import_folder
from catreview.data.reviews import ReviewConflictError


@pytest.fixture
def app(tmp_path: Path, cats_dir: Path, demo_dir: Path, db_url: str) -> ReviewApp:
    """12 shared photos (4 each of three breeds), imported without labels."""
    root = tmp_path / "photos"
    for breed in ("Bengal", "Persian", "Siamese"):
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:4]:
            shutil.copy(p, root / breed / p.name)
    app = ReviewApp(load_settings(database_url=db_url, demo_dir=demo_dir, data_dir=tmp_path / "data"))
    import_folder(app.engine, root, vocabulary=app.vocabulary, workers=1)
    return app


def _ids(app: ReviewApp) -> list[int]:
    with Session(app.engine) as s:
        return [int(i) for i in s.exec(select(ImageRecord.id).order_by(col(ImageRecord.id)))]


def _reviews(app: ReviewApp, image_id: int) -> list[tuple[str, str, int | None]]:
    with Session(app.engine) as s:
        q = select(Review).where(Review.image_id == image_id).order_by(col(Review.id))
        return [(r.annotator, r.label, r.replaces_review_id) for r in s.exec(q)]


def test_a_save_on_a_stale_view_is_refused_then_replace_keeps_both(app: ReviewApp) -> None:
    pid = _ids(app)[0]
    seen_by_both = None  # neither saw a review: the photo was not reviewed when they opened it
    first = app.save_decision(pid, "Bengal", "ann", seen=seen_by_both)
    assert first.review is not None and first.vote is None
    with pytest.raises(ReviewConflictError) as err:
        app.save_decision(pid, "persian", "bea", "fur", seen=seen_by_both)
    assert err.value.current is not None and (err.value.current.annotator, err.value.current.label) == ("ann", "Bengal")
    assert "ann chose 'Bengal'" in str(err.value)
    assert _reviews(app, pid) == [("ann", "Bengal", None)]  # nothing stored for bea
    # "Replace with mine": a new review naming hers as the one it replaces
    again = app.save_decision(pid, "persian", "bea", "fur", seen=err.value.current.id)
    assert again.label == "Persian" and again.review is not None
    assert _reviews(app, pid) == [("ann", "Bengal", None), ("bea", "Persian", first.review.id)]
    assert app.view(pid)["review"]["id"] == again.review.id  # what the page's "seen" field shows next


def test_an_open_overlap_photo_takes_blind_votes_and_the_queue_serves_each_annotator(app: ReviewApp) -> None:
    with Session(app.engine) as s:
        added = overlap.start_round(s, 1.0, k=2)  # every photo without a human decision
    ids = _ids(app)
    assert added == len(ids) == 12
    assert app.next_for(OVERLAP_QUEUE, None, "ann").image_id == ids[0]
    one = app.save_decision(ids[0], "Bengal", "ann")
    assert one.vote is not None and (one.vote.status, one.vote.votes, one.review) == ("open", 1, None)
    assert _reviews(app, ids[0]) == []  # a vote is not a review: nobody sees it as the photo's label
    assert app.next_for(OVERLAP_QUEUE, ids[0], "ann").image_id == ids[1]  # ann has voted on the first
    assert app.next_for(OVERLAP_QUEUE, None, "bea").image_id == ids[0]  # bea has not
    assert (app.my_vote(ids[0], "ann"), app.my_vote(ids[0], "bea")) == ("Bengal", None)
    changed = app.save_decision(ids[0], "Persian", "ann")  # a second vote replaces the first
    assert changed.previous_vote == "Bengal" and changed.vote.votes == 1
    assert app.withdraw_vote(ids[0], "ann") == "Persian"  # the Review tab's undo of a vote
    assert app.my_vote(ids[0], "ann") is None and app.overlap_item(ids[0]).votes == 0
    app.save_decision(ids[0], "Bengal", "ann")
    agreed = app.save_decision(ids[0], "bengal", "bea")
    assert agreed.vote.status == "agreed" and agreed.review is not None and agreed.label == "Bengal"
    assert [a for a, _, _ in _reviews(app, ids[0])] == ["bea"]  # the consensus review
    app.save_decision(ids[1], "Bengal", "ann")
    disputed = app.save_decision(ids[1], "Siamese", "bea")
    assert disputed.vote.status == "disputed" and disputed.review is None
    with Session(app.engine) as s:
        assert s.get(OverlapItem, ids[1]).status == "disputed"
        assert len(list(s.exec(select(OverlapVote).where(OverlapVote.image_id == ids[1])))) == 2
    # a settled photo takes ordinary reviews again (a reviewer adjudicates disputed ones in the Team tab)
    assert app.overlap_item(ids[0]).status == "agreed"
    with pytest.raises(overlap.OverlapError, match="settled"):
        app.withdraw_vote(ids[0], "bea")
    later = app.save_decision(ids[0], "Persian", "cy", seen=agreed.review.id)
    assert later.vote is None and later.review.replaces_review_id == agreed.review.id
    assert app.next_for(OVERLAP_QUEUE, None, "ann").image_id == ids[2]


def test_a_disputed_photo_waits_for_adjudication(app: ReviewApp) -> None:
    with Session(app.engine) as s:
        overlap.start_round(s, 1.0, k=2)
    pid = _ids(app)[0]
    app.save_decision(pid, "Bengal", "ann")
    app.save_decision(pid, "Persian", "bea")
    with pytest.raises(overlap.OverlapError, match="disputed"):
        app.save_decision(pid, "Siamese", "cy")
    assert _reviews(app, pid) == []
