"""8 annotators, each logged in with their own account, saving at once through the running app's
public API, on each database.

The app (demo models, login required) serves 40 shared photos; 8 threads, each with its own
``gradio_client`` Client and account, open a photo over ``/show`` and save a review over
``/review`` naming the review they were shown, 25 times each, on overlapping photos (two threads
on the same photo at each step, every photo reviewed by several threads over the run). The server
runs 8 events at a time, so the saves really meet in the database. Checked: no client exception,
no "database is locked", every save is either acknowledged or refused as a conflict that names
who chose what; acknowledged saves == rows stored, each stored under its client's account and
replacing exactly the review that client was shown (no silent overwrite); each photo's history is
one unbroken chain, and the running totals equal a recount.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gradio_client import Client
from sqlmodel import Session, col, func, select

from catreview.app.auth import AuthConfig, password_checker
from catreview.app.core import ReviewApp
from catreview.app.ui import build_ui
from catreview.config import load_settings
from catreview.data import accounts, counts
from catreview.data.db import ImageRecord, Review, stored_id
from tests.test_postgres import assert_unbroken_chain, run_threads

CLIENTS = 8
SAVES_PER_CLIENT = 25
# Canonical names, aliases and special labels, as annotators type them.
LABELS = ["Bengal", "sphynx", "Maine_Coon", "Birman", "Not a cat", "Unsure", "Russian Blue", "persian"]


@contextmanager
def serving(app: ReviewApp, concurrency: int) -> Iterator[str]:
    """The app's UI on a free local port with ``concurrency`` events at a time (``app.py`` uses
    4), login required (the app's users); yields its URL."""
    demo = build_ui(app, AuthConfig("login"))
    demo.queue(default_concurrency_limit=concurrency)
    _, url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=None,
        prevent_thread_lock=True,
        quiet=True,
        auth=password_checker(app.engine),
    )
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture
def forty_photos(tmp_path: Path, cats_dir: Path) -> Path:
    """40 shared photos (5 of each of 8 breeds) copied to a temporary folder."""
    root = tmp_path / "photos"
    for breed in ["Abyssinian", "Bengal", "Birman", "Bombay", "Persian", "Ragdoll", "Siamese", "Sphynx"]:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:5]:
            shutil.copy(p, root / breed / p.name)
    return root


@pytest.mark.slow  # 200 saves over HTTP: about 2 min on 2 busy cores per database
def test_8_clients_saving_reviews_at_once(db_url: str, tmp_path: Path, demo_dir: Path, forty_photos: Path) -> None:
    settings = load_settings(database_url=db_url, demo_dir=demo_dir, data_dir=tmp_path / "data")
    app = ReviewApp(settings)
    app.start_background([forty_photos])  # the importer, then stage 1 + VLM on the demo models
    assert app.wait(timeout=300), "background import + predictions still running after 300 s"
    assert app.job.error is None, app.job.log
    with Session(app.engine) as s:
        decodable = select(ImageRecord).where(col(ImageRecord.error).is_(None)).order_by(col(ImageRecord.id))
        ids = [stored_id(img) for img in s.exec(decodable)]
    assert len(ids) == 40

    names = [f"annotator-{t}" for t in range(CLIENTS)]
    with Session(app.engine) as s:
        for name in names:
            accounts.add_user(s, name, "annotator", f"password-{name}")

    # (client, photo id, review id shown, note, save message, conflict text), appended by the threads
    results: list[tuple[int, int, int, str, str, str]] = []
    with serving(app, concurrency=CLIENTS) as url:
        clients = [Client(url, auth=(name, f"password-{name}"), verbose=False) for name in names]

        def work(t: int) -> None:
            for k in range(SAVES_PER_CLIENT):
                pid = ids[(3 * k + t // 2) % len(ids)]  # threads 2i and 2i+1 on the same photo at each step
                label = LABELS[(t + k) % len(LABELS)]
                seen = int(clients[t].predict(pid, False, api_name="/show")[-1])
                note = f"c{t} step {k}"
                out = clients[t].predict(pid, label, note, False, "import", seen, api_name="/review")
                results.append((t, pid, seen, note, out[-2], out[-1]))

        errors = run_threads(CLIENTS, work)
    assert errors == [], f"{len(errors)} client errors, first: {errors[:1]!r}"
    assert len(results) == CLIENTS * SAVES_PER_CLIENT
    assert not [r for r in results if "locked" in (r[4] + r[5]).lower()], "a save met 'database is locked'"
    saved = [r for r in results if r[4].startswith("Saved ")]
    conflicts = [r for r in results if not r[4]]
    assert len(saved) + len(conflicts) == len(results), [r[4] for r in results if r not in saved + conflicts][:1]
    assert all(" chose **" in r[5] and "Keep theirs" in r[5] for r in conflicts)
    acknowledged = Counter(pid for _, pid, *_ in saved)
    with Session(app.engine) as s:
        stored = dict(s.exec(select(Review.image_id, func.count()).group_by(col(Review.image_id))).all())
        assert stored == dict(acknowledged)  # per photo: every acknowledged save is one row, and no other rows
        for t, pid, seen, note, _, _ in saved:
            row = s.exec(select(Review).where(Review.note == note)).one()
            # stored under the client's own account, replacing exactly the review it was shown
            assert (row.image_id, row.annotator, row.replaces_review_id) == (pid, names[t], seen or None)
        for pid in acknowledged:
            assert_unbroken_chain(s, pid)
        assert max(acknowledged.values()) >= 4  # photos were saved by several clients
        totals = counts.totals(s)
        assert totals == counts.recount(s) and totals.reviewed == len(acknowledged)
    print(f"{len(saved)} saves acknowledged, {len(conflicts)} refused as conflicts")
    app.engine.dispose()
