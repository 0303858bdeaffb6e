"""The app launched on a free port and driven over its API (gradio_client), across a restart."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gradio_client import Client
from sqlmodel import Session, select

from catreview.app.core import ReviewApp
from catreview.app.ui import build_ui
from catreview.data.db import Review


@contextmanager
def running_app(settings, folders: list[Path] | None = None) -> Iterator[tuple[ReviewApp, str]]:
    """Start the app (background import + predictions finished) on a free port; yield (app, url)."""
    app = ReviewApp(settings)
    app.start_background(folders or [])
    assert app.wait(timeout=300), "background import + predictions still running after 300 s"
    assert app.job.error is None, app.job.log
    demo = build_ui(app)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield app, url
    finally:
        demo.close()


@pytest.fixture
def photos(tmp_path: Path, cats_dir: Path) -> Path:
    root = tmp_path / "photos"
    for breed in ("Sphynx", "Birman"):
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:2]:
            shutil.copy(p, root / breed / p.name)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def test_review_over_api_survives_restart(settings, photos: Path) -> None:
    settings = settings.model_copy(update={"annotator": "alice"})  # open mode: every caller is "alice"
    with running_app(settings, [photos]) as (_app, url):
        client = Client(url, verbose=False)
        shown = client.predict(api_name="/show")
        image_id, photo, counter = int(shown[0]), shown[1], shown[2]
        assert "0 / 4 reviewed" in counter and f"photo #{image_id}" in counter
        assert Path(photo).read_bytes() == Path(_app.view(image_id)["path"]).read_bytes()  # the file, not a re-encoding
        stage1 = shown[4]
        assert len(stage1["confidences"]) == 3
        failed = client.predict(api_name="/failed")
        assert [Path(r[0]).name for r in failed["data"]] == ["broken.jpg"]
        assert "not a readable image" in failed["data"][0][1]

        # Review through the public API with an alias, naming the review shown (0: none); then a
        # bad label is refused and a save naming a stale view is refused as a conflict, nothing stored.
        seen = int(shown[-1])
        assert seen == 0
        out = client.predict(image_id, "sphynx", "ears say so", False, "import", seen, api_name="/review")
        message, dialog = out[-2], out[-1]
        assert "Saved" in message and not dialog and "1 / 4 reviewed" in out[2]
        refused = client.predict(image_id, "Dragon", "", False, "import", None, api_name="/review")
        assert "unknown label" in refused[-2]
        stale = client.predict(image_id, "Birman", "", False, "import", seen, api_name="/review")
        assert stale[-2] == "" and "**alice** chose **Sphynx - Hairless Cat**" in stale[-1]
        assert "you saw: not reviewed yet" in stale[-1]
        reasoning = client.predict(image_id, api_name="/reasoning")
        assert isinstance(reasoning, str) and reasoning.strip()

        # Export tab: the reviewed photo leaves as a dataset zip.
        summary, zip_file = client.predict(0, 336, None, False, False, api_name="/export")
        assert "1 photos" in summary and zip_file.endswith(".zip"), summary
        names = zipfile.ZipFile(zip_file).namelist()
        assert any(n.endswith("llava/train.jsonl") for n in names) and any(n.endswith("manifest.csv") for n in names)

    # Restart on the same database: the review is there, nothing recomputed.
    with running_app(settings) as (app2, url2):
        assert app2.job.log and "0 computed" in app2.job.log[0] + app2.job.log[1]
        client2 = Client(url2, verbose=False)
        shown = client2.predict(api_name="/show")
        assert "1 / 4 reviewed" in shown[2]
        assert int(shown[0]) != image_id  # a reload opens on the next photo still to review
        review = app2.view(image_id)["review"]
        assert review["label"] == "Sphynx - Hairless Cat" and review["annotator"] == "alice"
        unknown = client2.predict(10_000, "Birman", "", False, "import", None, api_name="/review")
        assert "no photo with id 10000" in unknown[-2]
    with Session(app2.engine) as s:
        rows = list(s.exec(select(Review)))
    assert [(r.image_id, r.label, r.annotator, r.note) for r in rows] == [
        (image_id, "Sphynx - Hairless Cat", "alice", "ears say so")
    ]
    snapshot = json.loads(rows[0].model_snapshot_json)
    assert len(snapshot["stage1"]) == 3 and snapshot["fused"]["label"]
    clf, vlm = app2.registry.classifier(), app2.registry.vlm()
    assert snapshot["model_versions"] == {"stage1": clf.model_version, "vlm": vlm.model_version}


def test_navigation_and_next_unreviewed_by_photo_id(settings, photos: Path) -> None:
    """The core behind Previous/Next, "Next unreviewed" and the first page load (no predictions needed)."""
    from catreview.data.importer import import_folder
    from catreview.query.photos import page

    app = ReviewApp(settings)
    assert app.next_unreviewed(None) is None and app.first_photo() is None  # no photos at all
    assert app.neighbour(None, 1) is None
    summary = import_folder(app.engine, photos, vocabulary=app.vocabulary)
    ids = page(app.engine)
    assert len(ids) == 4 and ids == sorted(summary.image_ids)  # the broken file is not in the review order
    assert app.first_photo() == ids[0] and app.neighbour(None, 1) == ids[0]
    assert [app.neighbour(i, 1) for i in ids] == [*ids[1:], ids[3]]  # stays on the last photo
    assert [app.neighbour(i, -1) for i in ids] == [ids[0], *ids[:3]]
    assert page(app.engine, after=ids[1], limit=1) == [ids[2]]
    assert [app.next_unreviewed(a) for a in (None, *ids)] == [ids[0], ids[1], ids[2], ids[3], ids[0]]
    for i in (ids[0], ids[2]):
        app.review(i, "Birman", "alice")
    assert [app.next_unreviewed(a) for a in (None, *ids)] == [ids[1], ids[1], ids[3], ids[3], ids[1]]
    assert app.next_unreviewed(10_000) == ids[1]  # past the end: from the start
    assert page(app.engine, unreviewed_only=True) == [ids[1], ids[3]]
    for i in (ids[1], ids[3]):
        app.review(i, "Not a cat", "alice")  # any review counts
    assert app.next_unreviewed(None) is None and app.next_unreviewed(ids[2]) is None
    assert app.counts() == (4, 4)


def test_photo_is_served_by_path_from_the_display_folder(settings, photos: Path) -> None:
    """A browser-ready JPEG is linked by content hash; the same photo twice is one file."""
    from catreview.data.importer import import_folder
    from catreview.query.photos import page

    app = ReviewApp(settings)
    import_folder(app.engine, photos, vocabulary=app.vocabulary)
    first = page(app.engine)[0]
    shown = app.display_path(first)
    assert shown.parent.parent == app.display_dir and shown.name.startswith(app.view(first)["sha256"])
    assert shown.read_bytes() == Path(app.view(first)["path"]).read_bytes()
    assert app.display_path(first) == shown


def test_train_jobs_belong_to_the_app(settings) -> None:
    """One TrainJobs per app, created lazily; the Train tab's jobs_for/_JOBS are views of it."""
    from catreview.adapters.jobs import TrainJobs
    from catreview.app.ui import train_tab

    app, other = ReviewApp(settings), ReviewApp(settings)
    jobs = app.train_jobs
    assert isinstance(jobs, TrainJobs) and jobs.engine is app.engine
    assert app.train_jobs is jobs and train_tab.jobs_for(app) is jobs and train_tab._JOBS[app] is jobs
    assert other.train_jobs is not jobs
    replacement = TrainJobs(app.engine, settings, reconcile=False)
    train_tab._JOBS[app] = replacement
    assert app.train_jobs is replacement and train_tab.jobs_for(app) is replacement
    assert train_tab.base_model(app) == app.registry.base_model()


def test_app_refuses_to_start_with_a_model_it_cannot_load(tmp_path: Path, demo_dir: Path, capsys) -> None:
    import app as app_main

    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        f'demo_dir = "{demo_dir}"\nactive_vlm = "x"\n[vlm_profiles.x]\nmodel = "{tmp_path / "no-such-model"}"\n'
    )
    assert app_main.main(["--config", str(cfg), "--db", f"sqlite:///{tmp_path / 'a.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-model" in err and "Traceback" not in err


def test_gradio_monitoring_summary_is_not_rebuilt_after_every_event(settings) -> None:
    """Gradio's default rebuilds a pandas summary of up to 10,000 past events after each event (a
    per-click cost that grows with use); the app's queue recomputes it every ANALYTICS_SUMMARY_EVERY."""
    from catreview.app.ui import ANALYTICS_SUMMARY_EVERY

    demo = build_ui(ReviewApp(settings))
    demo.queue(default_concurrency_limit=4)  # as app.py does
    assert demo._queue.ANAYLTICS_CACHE_FREQUENCY == ANALYTICS_SUMMARY_EVERY  # (sic: Gradio's attribute name)
