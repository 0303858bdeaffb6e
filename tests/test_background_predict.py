"""Predictions follow the active version: activating an adapter (by hand, or through a finished
round that passes the gate) predicts the new version in the background, review queue first, with no
other action; a pass in progress for the old version gives way.

Real shared photos, the tiny random built-in models and real (random) LoRA adapters, through the
app's own activation code and background job. Waits poll the database with a deadline and fail on
timeout.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from sqlmodel import Session, col, func, select

from catreview.adapters.versions import activate, active_version
from catreview.app.core import ReviewApp
from catreview.app.presenters.review import prediction_panels
from catreview.app.presenters.train import NO_ADAPTER, activated
from catreview.app.ui import train_tab
from catreview.data.db import ImageRecord, Prediction, TrainingRun, make_engine
from tests.test_adapters import REF, _fake_round, add_version, held_out, random_adapter

DEADLINE_S = 240.0


@pytest.fixture
def photos(tmp_path: Path, cats_dir: Path) -> Path:
    """Eight unlabelled shared photos of four breeds."""
    root = tmp_path / "photos"
    for breed in ("Bengal", "Siamese", "Persian", "Sphynx"):
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:2]:
            shutil.copy(p, root / breed / p.name)
    return root


def _started(settings, photos: Path) -> ReviewApp:
    """An app after its start-up import + predictions (as ``app.py`` runs them)."""
    app = ReviewApp(settings)
    assert app.start_background([photos])
    assert app.wait(timeout=DEADLINE_S), "start-up import + predictions still running"
    assert app.job.error is None, app.job.log
    return app


def _vlm_rows(app: ReviewApp, version: str) -> list[int]:
    """Image ids of the stored VLM verdicts of ``version``, in the order they were written."""
    with Session(app.engine) as s:
        q = select(Prediction.image_id).where(Prediction.kind == "vlm", Prediction.model_version == version)
        return [int(i) for i in s.exec(q.order_by(col(Prediction.id)))]


def _photo_ids(app: ReviewApp) -> set[int]:
    with Session(app.engine) as s:
        return {int(i) for i in s.exec(select(ImageRecord.id).where(col(ImageRecord.error).is_(None))) if i}


def _wait_for_version(app: ReviewApp, version: str) -> list[int]:
    """Poll until every photo has a VLM verdict of ``version``; fail at the deadline."""
    wanted = _photo_ids(app)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        rows = _vlm_rows(app, version)
        if set(rows) == wanted:
            return rows
        time.sleep(0.1)
    pytest.fail(
        f"after {DEADLINE_S:.0f} s only {len(set(_vlm_rows(app, version)))} of {len(wanted)} photos have a "
        f"verdict of {version}; job: {app.job.text()} {app.job.log[-3:]}"
    )


def test_an_activated_adapter_is_predicted_in_the_background_review_queue_first(
    settings, photos: Path, tmp_path: Path
) -> None:
    app = _started(settings, photos)
    ids = sorted(_photo_ids(app))
    old = app.registry.vlm().model_version
    assert set(_vlm_rows(app, old)) == set(ids)
    for i in ids[:3]:  # reviewed photos go last
        app.review(i, "Bengal", "alice")
    app.view(ids[4])  # the photo on screen

    base = app.registry.base_model()
    adapter = add_version(app.engine, settings, base, random_adapter(base, tmp_path / "a", seed=1))
    assert train_tab.promote(app, str(adapter), actor="ada") == activated(adapter)  # the Train tab's button
    new = app.registry.vlm().model_version
    assert new != old
    rows = _wait_for_version(app, new)  # no other action
    assert rows[0] == ids[4]  # the photo on screen first, then the queue after it, wrapping around
    assert rows[: len(ids) - 3] == [ids[4], ids[5], ids[6], ids[7], ids[3]]
    assert set(rows[len(ids) - 3 :]) == set(ids[:3])
    assert app.wait(timeout=DEADLINE_S) and app.job.error is None, app.job.log
    assert "predicting again: adapter #" in " ".join(app.job.log)
    view = app.view(ids[5])
    assert view["vlm"]["model_version"] == new
    assert "not ready" not in prediction_panels(view).status

    # "No adapter": the base version's cached verdicts are shown again; nothing is recomputed.
    n_rows = len(_vlm_rows(app, old))
    assert train_tab.no_adapter(app, actor="ada") == NO_ADAPTER
    assert app.wait(timeout=DEADLINE_S) and app.job.error is None, app.job.log
    assert app.registry.vlm().model_version == old and len(_vlm_rows(app, old)) == n_rows
    assert app.view(ids[5])["vlm"]["model_version"] == old


def test_activation_during_a_running_pass_ends_with_the_new_version_everywhere(
    settings, photos: Path, tmp_path: Path
) -> None:
    app = ReviewApp(settings)
    base = app.registry.base_model()
    adapter = add_version(app.engine, settings, base, random_adapter(base, tmp_path / "a", seed=2))
    assert app.start_background([photos])
    app.promote(adapter, actor="ada")  # while the import or the first pass runs: taken by that job's loop
    app.schedule_predictions("a second request")  # requests pile up into one more pass
    assert app.wait(timeout=DEADLINE_S), "background job still running"
    assert app.job.error is None, app.job.log
    new = app.registry.vlm().model_version
    assert set(_vlm_rows(app, new)) == _photo_ids(app)
    assert not app.job.running and app.job.message.startswith("Predictions ready")


def test_a_finished_round_that_activates_its_adapter_is_predicted(settings, photos: Path, tmp_path: Path) -> None:
    app = _started(settings, photos)
    base = app.registry.base_model()
    old = app.registry.vlm().model_version
    # A round that finished (result.json written) while nobody watched, and that passes the gate:
    run_dir = _fake_round(
        tmp_path / "run", Path(base), 4, test=held_out({b: "1111111110" for b in REF}), initial_test=held_out(REF)
    )
    with Session(app.engine) as s:
        s.add(TrainingRun(base_model=base, status="running", run_dir=str(run_dir)))
        s.commit()
    assert app.train_jobs.running() is None  # recovered on first use: registered, gated, activated, hooked
    assert active_version(app.engine, base) is not None
    new = app.registry.vlm().model_version
    assert new != old
    _wait_for_version(app, new)


def test_schedule_does_nothing_when_started_without_predictions(settings, photos: Path, tmp_path: Path) -> None:
    app = ReviewApp(settings)
    assert app.start_background([photos], predict=False)
    assert app.wait(timeout=DEADLINE_S) and "predictions not run" in app.job.message
    base = app.registry.base_model()
    adapter = add_version(app.engine, settings, base, random_adapter(base, tmp_path / "a", seed=3))
    app.promote(adapter, actor="ada")
    assert not app.job.running and "predictions not run" in app.job.message
    with Session(app.engine) as s:
        assert s.exec(select(func.count()).select_from(Prediction)).one() == 0


def test_a_version_promoted_by_another_process_is_predicted(settings, photos: Path, tmp_path: Path) -> None:
    """``watch_versions``: a promotion written by another engine (as the CLI in another process
    writes it) is noticed and predicted with no action in this app."""
    app = _started(settings, photos)
    base = app.registry.base_model()
    old = app.registry.vlm().model_version
    adapter = add_version(app.engine, settings, base, random_adapter(base, tmp_path / "a", seed=4))
    app.watch_versions(interval_s=0.2)
    try:
        activate(make_engine(settings.database_url), adapter)  # not through this app
        new = app.registry.vlm().model_version
        assert new != old
        _wait_for_version(app, new)
        assert app.wait(timeout=DEADLINE_S) and app.job.error is None, app.job.log
        assert "active versions changed outside this app" in " ".join(app.job.log)
    finally:
        app.stop()
