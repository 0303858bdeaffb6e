"""The database layer on both databases (``db_url``: a SQLite file, then a throwaway PostgreSQL
server's fresh database): schema creation, review chains and conflicts, running totals, the
insert-on-conflict get-or-create, and concurrent saves from 8 threads."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from catreview.data import counts
from catreview.data.db import (
    ImageRecord,
    Review,
    SplitAssignment,
    insert_ignoring_conflicts,
    make_engine,
    stored_id,
)
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.data.reviews import ReviewConflictError, ReviewError, history, latest_review, record_review

VOCAB = BreedVocabulary.default()
BREEDS = ["Abyssinian", "Bengal", "Birman", "Persian", "Sphynx"]
LABELS = ["Abyssinian", "Bengal", "Birman", "Persian", "Sphynx - Hairless Cat", "Unsure"]


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """``make_engine`` on the fresh database; disposed after the test."""
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def photo_ids(engine: Engine, tmp_path: Path, cats_dir: Path) -> list[int]:
    """One real photo of each of :data:`BREEDS` and an undecodable file imported through the
    importer; returns the 5 decodable photos' ids."""
    root = tmp_path / "photos"
    root.mkdir()
    for breed in BREEDS:
        shutil.copy(sorted((cats_dir / breed).glob("*.jpg"))[0], root / f"{breed}.jpg")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    import_folder(engine, root, vocabulary=VOCAB)
    with Session(engine) as s:
        decodable = select(ImageRecord).where(col(ImageRecord.error).is_(None)).order_by(col(ImageRecord.id))
        return [stored_id(img) for img in s.exec(decodable)]


def aware(t: datetime) -> datetime:
    """``t`` as an aware UTC time (both databases hand back naive UTC)."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def assert_unbroken_chain(session: Session, image_id: int) -> list[Review]:
    """Check that the photo's reviews form one chain: exactly one first review, each later one
    replacing the previous by id with its label as ``previous_label`` and a time that never
    decreases, ending at the image row's current review; returns the chain, oldest first."""
    rows = history(session, image_id)
    firsts = [r for r in rows if r.replaces_review_id is None]
    assert len(firsts) == 1, f"photo {image_id}: {len(firsts)} reviews replace nothing"
    after = {r.replaces_review_id: r for r in rows if r.replaces_review_id is not None}
    assert len(after) == len(rows) - 1, f"photo {image_id}: two reviews replace the same one (fork)"
    chain = [firsts[0]]
    while chain[-1].id in after:
        nxt = after[chain[-1].id]
        assert nxt.previous_label == chain[-1].label, (image_id, nxt.id)
        assert aware(nxt.created_at) >= aware(chain[-1].created_at), (image_id, nxt.id, "time went back")
        chain.append(nxt)
    assert len(chain) == len(rows), f"photo {image_id}: {len(rows) - len(chain)} reviews are off the chain"
    image = session.get(ImageRecord, image_id)
    assert image is not None
    assert (image.current_review_id, image.current_label) == (chain[-1].id, chain[-1].label)
    return chain


def run_threads(n: int, work: Callable[[int], None]) -> list[BaseException]:
    """Run ``work(thread_index)`` in ``n`` threads released together; returns their errors."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "worker threads still running after 300 s"
    return errors


def test_make_engine_creates_the_schema_on_a_fresh_database(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert engine.dialect.name == db_url.split(":")[0].split("+")[0]
        insp = inspect(engine)
        assert {"images", "predictions", "reviews", "collection_counts", "calibrations"} <= set(insp.get_table_names())
        assert {"ix_images_decodable", "ix_images_unreviewed"} <= {i["name"] for i in insp.get_indexes("images")}
        image_columns = {c["name"] for c in insp.get_columns("images")}
        assert {"current_review_id", "current_label"} <= image_columns
        with Session(engine) as s:
            assert counts.totals(s) == counts.recount(s) == counts.Totals(0, 0, 0)
    finally:
        engine.dispose()
    again = make_engine(db_url)  # a second start on the same database changes nothing
    try:
        with Session(again) as s:
            assert s.exec(select(func.count()).select_from(ImageRecord)).one() == 0
    finally:
        again.dispose()


def test_reviews_chain_and_a_stale_replaces_is_a_conflict(engine: Engine, photo_ids: list[int]) -> None:
    pid = photo_ids[0]
    with Session(engine) as s:
        first = record_review(s, pid, "sphynx", "alice", vocabulary=VOCAB)
        assert (first.label, first.replaces_review_id, first.previous_label) == ("Sphynx - Hairless Cat", None, None)
        second = record_review(s, pid, "Birman", "bob", vocabulary=VOCAB)  # default HEAD: after the newest
        assert (second.replaces_review_id, second.previous_label) == (first.id, "Sphynx - Hairless Cat")
        third = record_review(s, pid, "Persian", "carol", vocabulary=VOCAB, replaces=second.id)
        assert (third.replaces_review_id, third.previous_label) == (second.id, "Birman")

        with pytest.raises(ReviewConflictError, match="carol chose 'Persian'") as stale:
            record_review(s, pid, "Bengal", "dave", vocabulary=VOCAB, replaces=first.id)
        assert stale.value.current is not None and stale.value.current.id == third.id
        with pytest.raises(ReviewConflictError):  # "I saw no review" on a reviewed photo
            record_review(s, pid, "Bengal", "dave", vocabulary=VOCAB, replaces=None)
        fresh = record_review(s, photo_ids[1], "Bengal", "dave", vocabulary=VOCAB, replaces=None)
        assert fresh.replaces_review_id is None
        ids = [first.id, second.id, third.id]

    with Session(engine) as s:
        chain = assert_unbroken_chain(s, pid)
        assert [r.id for r in chain] == ids  # the refused saves stored nothing
        latest = latest_review(s, pid)
        assert latest is not None and latest.id == ids[-1]


def test_counts_follow_imports_and_reviews(engine: Engine, photo_ids: list[int]) -> None:
    with Session(engine) as s:
        assert counts.totals(s) == counts.recount(s) == counts.Totals(photos=5, failed=1, reviewed=0)
        record_review(s, photo_ids[0], "Bengal", "alice", vocabulary=VOCAB)
        record_review(s, photo_ids[0], "Birman", "bob", vocabulary=VOCAB)  # a second review of one photo
        record_review(s, photo_ids[3], "Persian", "alice", vocabulary=VOCAB)
        broken = stored_id(s.exec(select(ImageRecord).where(col(ImageRecord.error).is_not(None))).one())
        with pytest.raises(ReviewError, match="could not be decoded"):
            record_review(s, broken, "Bengal", "alice", vocabulary=VOCAB)
        with pytest.raises(ReviewError, match="unknown label"):
            record_review(s, photo_ids[1], "Dragon", "alice", vocabulary=VOCAB)
    with Session(engine) as s:
        assert counts.totals(s) == counts.recount(s) == counts.Totals(photos=5, failed=1, reviewed=2, verified=2)


def test_insert_ignoring_conflicts_keeps_the_first_row(engine: Engine) -> None:
    sha = "ab" * 32
    with Session(engine) as s:
        stmt = insert_ignoring_conflicts(s, SplitAssignment, ["sha256"])
        assert s.exec(stmt.values(sha256=sha, split="train")).rowcount == 1
        assert s.exec(stmt.values(sha256=sha, split="test")).rowcount == 0
        img = insert_ignoring_conflicts(s, ImageRecord, ["sha256"])
        assert s.exec(img.values(sha256=sha, path="/a.jpg", size=1)).rowcount == 1
        assert s.exec(img.values(sha256=sha, path="/b.jpg", size=2)).rowcount == 0
        s.commit()
    with Session(engine) as s:
        assert [(a.sha256, a.split) for a in s.exec(select(SplitAssignment))] == [(sha, "train")]
        assert [(i.path, i.size) for i in s.exec(select(ImageRecord))] == [("/a.jpg", 1)]


def test_insert_ignoring_conflicts_from_8_threads_stores_each_key_once(engine: Engine) -> None:
    shas = [f"{i:064x}" for i in range(20)]
    inserted: list[int] = []

    def work(t: int) -> None:
        for sha in shas[t % 4 :] + shas[: t % 4]:  # threads start at different keys, then collide
            with Session(engine) as s:
                stmt = insert_ignoring_conflicts(s, ImageRecord, ["sha256"])
                inserted.append(s.exec(stmt.values(sha256=sha, path=f"/t{t}/{sha}.jpg", size=t)).rowcount)
                s.commit()

    assert run_threads(8, work) == []
    assert sorted(inserted) == [0] * (8 * 20 - 20) + [1] * 20  # exactly one insert per key won
    with Session(engine) as s:
        assert sorted(s.exec(select(ImageRecord.sha256))) == shas


def test_8_threads_saving_the_same_photos_chain_every_review(engine: Engine, photo_ids: list[int]) -> None:
    saved: list[int | None] = []

    def work(t: int) -> None:
        with Session(engine) as s:  # each thread its own session (and connection)
            for k in range(50):
                pid = photo_ids[(t + k) % len(photo_ids)]
                label = LABELS[(t * 7 + k) % len(LABELS)]
                saved.append(record_review(s, pid, label, f"annotator-{t}", vocabulary=VOCAB).id)

    assert run_threads(8, work) == []  # with the default HEAD every save lands (chained after the newest)
    assert len(saved) == 400
    with Session(engine) as s:
        assert s.exec(select(func.count()).select_from(Review)).one() == 400
        chains = [assert_unbroken_chain(s, pid) for pid in photo_ids]
        assert sum(len(c) for c in chains) == 400
        assert {r.id for c in chains for r in c} == set(saved)
        assert counts.totals(s) == counts.recount(s) == counts.Totals(photos=5, failed=1, reviewed=5, verified=5)


def test_8_threads_saving_what_they_saw_get_a_conflict_or_a_chained_review(
    engine: Engine, photo_ids: list[int]
) -> None:
    saved: list[int | None] = []
    conflicts: list[tuple[int | None, int | None]] = []  # (review the thread saw, newest review then)

    def work(t: int) -> None:
        with Session(engine) as s:
            for k in range(25):
                pid = photo_ids[(t + k) % len(photo_ids)]
                seen = latest_review(s, pid)
                s.rollback()  # end the read, as a page shown earlier would have
                seen_id = seen.id if seen is not None else None
                try:
                    review = record_review(s, pid, LABELS[k % len(LABELS)], f"a{t}", vocabulary=VOCAB, replaces=seen_id)
                    saved.append(review.id)
                except ReviewConflictError as exc:
                    conflicts.append((seen_id, exc.current.id if exc.current is not None else None))
                    s.rollback()

    assert run_threads(8, work) == []  # nothing but ReviewConflictError, and only because replaces= was given
    assert len(saved) + len(conflicts) == 200
    for seen_id, current_id in conflicts:  # a conflict names the newer review that won
        assert current_id is not None and current_id != seen_id
    with Session(engine) as s:
        assert s.exec(select(func.count()).select_from(Review)).one() == len(saved)
        chains = [assert_unbroken_chain(s, pid) for pid in photo_ids]
        assert {r.id for c in chains for r in c} == set(saved)
        assert counts.totals(s) == counts.recount(s)
