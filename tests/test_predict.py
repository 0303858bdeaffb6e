"""Predictions over a collection: DataLoader stage 1, batched VLM, resuming, broken files, shards,
``accelerate launch`` (one process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from sqlmodel import Session, col, select

from catreview.config import Settings, load_settings
from catreview.data.db import ImageRecord, Prediction, make_engine, stored_id
from catreview.data.images import load_rgb
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.models.registry import ModelRegistry
from catreview.predict.loader import PhotoItem, collate_photos, photo_loader
from catreview.predict.runner import Shard, run_predictions, stage1_topk

REPO_ROOT = Path(__file__).resolve().parents[1]
BREEDS = ["Sphynx", "Bombay", "Bengal"]


@pytest.fixture
def photos(tmp_path: Path, cats_dir: Path) -> Path:
    """2 shared photos of each of 3 breeds, copied into breed folders (6 photos)."""
    root = tmp_path / "photos"
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:2]:
            shutil.copy(p, root / breed / p.name)
    return root


def _with(settings: Settings, *, database_url: str | None = None, batch_size: int | None = None) -> Settings:
    update: dict = {}
    if database_url is not None:
        update["database_url"] = database_url
    if batch_size is not None:
        update["classifier"] = settings.classifier.model_copy(update={"batch_size": batch_size})
    return settings.model_copy(update=update)


def _rows(engine, kind: str) -> list[Prediction]:
    with Session(engine) as s:
        return list(s.exec(select(Prediction).where(Prediction.kind == kind).order_by(Prediction.image_id)))


def _paths(engine) -> dict[int, str]:
    with Session(engine) as s:
        return {stored_id(i): i.path for i in s.exec(select(ImageRecord).where(col(ImageRecord.error).is_(None)))}


def _assert_equal_to_one_by_one(engine, reg: ModelRegistry) -> None:
    """Every stored stage-1 top-k equals the classifier's output on that photo alone (1e-5)."""
    clf, paths = reg.classifier(), _paths(engine)
    rows = _rows(engine, "stage1")
    assert {r.image_id for r in rows} == set(paths)
    for row in rows:
        (alone,) = clf.topk([load_rgb(paths[row.image_id])], k=3)
        stored = stage1_topk(row)
        assert [lab for lab, _ in stored] == [lab for lab, _ in alone]
        assert [p for _, p in stored] == pytest.approx([p for _, p in alone], abs=1e-5)


def test_batched_predictions_equal_one_by_one(settings, photos: Path) -> None:
    engine = make_engine(settings.database_url)
    import_folder(engine, photos, vocabulary=BreedVocabulary.default())
    reg = ModelRegistry(_with(settings, batch_size=4))  # batches of 4 and 2
    summary = run_predictions(engine, reg, num_workers=0)
    assert (summary.images, summary.stage1_computed, summary.vlm_computed) == (6, 6, 6)
    _assert_equal_to_one_by_one(engine, reg)

    # VLM verdicts were scored in batches; each equals the VLM on its photo alone.
    vlm, paths = reg.vlm(), _paths(engine)
    for row in _rows(engine, "vlm"):
        (alone,) = vlm.score_candidates([load_rgb(paths[row.image_id])], [row.payload["candidates"][:-1]])
        assert row.payload["probabilities"] == pytest.approx([float(p) for p in alone.probabilities], abs=1e-5)


def test_a_stopped_run_resumes_where_it_stopped(settings, photos: Path, db_url: str) -> None:
    s = _with(settings, database_url=db_url, batch_size=2)
    engine = make_engine(db_url)
    import_folder(engine, photos, vocabulary=BreedVocabulary.default())
    stop = threading.Event()

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "stage 1":
            stop.set()  # after the first batch

    first = run_predictions(engine, ModelRegistry(s), progress=progress, stop=stop, num_workers=0)
    assert first.cancelled and (first.stage1_computed, first.vlm_computed) == (2, 0)
    assert len(_rows(engine, "stage1")) == 2

    resumed = run_predictions(engine, ModelRegistry(s), num_workers=0)
    assert not resumed.cancelled
    assert (resumed.stage1_computed, resumed.stage1_cached, resumed.vlm_computed) == (4, 2, 6)
    assert len(_rows(engine, "stage1")) == 6 and len(_rows(engine, "vlm")) == 6

    # top_k changed: every stage-1 row is stale, recomputed and overwritten in place (the
    # database's own JSON functions find them), and the VLM runs on the new candidate lists.
    s2 = s.model_copy(update={"classifier": s.classifier.model_copy(update={"top_k": 2})})
    again = run_predictions(engine, ModelRegistry(s2), num_workers=0)
    assert (again.stage1_computed, again.stage1_cached, again.vlm_computed) == (6, 0, 6)
    rows = _rows(engine, "stage1")
    assert len(rows) == 6 and all(len(stage1_topk(r)) == 2 for r in rows)
    assert len(_rows(engine, "vlm")) == 12  # verdicts for the 3-candidate lists are kept (history)
    done = run_predictions(engine, ModelRegistry(s2), num_workers=0)
    assert (done.stage1_computed, done.stage1_cached, done.vlm_computed, done.vlm_cached) == (0, 6, 0, 6)


def test_workers_decode_and_a_broken_file_is_reported(settings, photos: Path) -> None:
    """DataLoader workers (spawned processes) decode; a photo that broke after import is listed
    with its reason, the other photos of its batch and run are predicted."""
    engine = make_engine(settings.database_url)
    import_folder(engine, photos, vocabulary=BreedVocabulary.default())
    broken = sorted((photos / "Bombay").glob("*.jpg"))[0]
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # truncated since the import
    s = _with(settings, batch_size=4)
    # Routing sends no photo to the VLM: one pass, so one worker start (seconds).
    reg = ModelRegistry(s.model_copy(update={"fusion": s.fusion.model_copy(update={"routing_threshold": 0.0})}))
    summary = run_predictions(engine, reg, num_workers=1)
    assert [(Path(p).name, reason) for p, reason in summary.failed] == [
        (broken.name, "truncated image file (incomplete download or copy?)")
    ]
    assert (summary.stage1_computed, summary.vlm_skipped) == (5, 5)
    broken.write_bytes(data)  # mended: the next run predicts only it
    mended = run_predictions(engine, reg, num_workers=0)
    assert (mended.stage1_computed, mended.stage1_cached, mended.failed) == (1, 5, [])
    _assert_equal_to_one_by_one(engine, reg)


def test_collate_keeps_the_decodable_photos_of_a_batch(photos: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    good = sorted(photos.rglob("*.jpg"))[:2]
    items = [PhotoItem(1, str(good[0])), PhotoItem(2, str(empty)), PhotoItem(3, str(good[1]))]
    data_config = {"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    (batch,) = list(photo_loader(items, batch_size=3, num_workers=0, data_config=data_config))
    assert [i.image_id for i in batch.items] == [1, 3] and batch.pixels is not None
    assert batch.pixels.shape == (2, 3, 64, 64) and batch.pixels.dtype == torch.float32
    assert batch.failed == [(items[1], "empty file (0 bytes)")]
    (pil,) = list(photo_loader(items, batch_size=3, num_workers=0))  # no transform: PIL images
    assert pil.pixels is None and [im.mode for im in pil.images] == ["RGB", "RGB"]
    nothing = collate_photos([])
    assert nothing.items == [] and nothing.pixels is None and nothing.failed == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        photo_loader(items, batch_size=0, num_workers=0)


def test_shards_split_the_photos_and_overlaps_are_harmless(settings, photos: Path) -> None:
    engine = make_engine(settings.database_url)
    import_folder(engine, photos, vocabulary=BreedVocabulary.default())
    reg = ModelRegistry(settings)
    ids = sorted(_paths(engine))
    a = run_predictions(engine, reg, shard=Shard(0, 2), num_workers=0)
    assert {r.image_id for r in _rows(engine, "stage1")} == {i for i in ids if i % 2 == 0}
    b = run_predictions(engine, reg, shard=Shard(1, 2), num_workers=0)
    assert (a.images + b.images, a.stage1_computed + b.stage1_computed, a.vlm_computed + b.vlm_computed) == (6, 6, 6)
    assert [r.image_id for r in _rows(engine, "stage1")] == ids
    everything = run_predictions(engine, reg, shard=Shard(0, 1), num_workers=0)
    assert (everything.stage1_computed, everything.stage1_cached, everything.vlm_cached) == (0, 6, 6)
    with pytest.raises(ValueError, match="shard 2 of 2"):
        Shard(2, 2)


@pytest.mark.slow
def test_accelerate_launch_one_process(settings, photos: Path) -> None:
    """The documented data-parallel command, on one CPU process: every photo predicted once."""
    db = ["--db", settings.database_url]
    env = {**os.environ, "CATREVIEW_DEMO_DIR": str(settings.demo_dir), "HF_HUB_OFFLINE": "1"}
    engine = make_engine(settings.database_url)
    import_folder(engine, photos, vocabulary=BreedVocabulary.default())
    launch = [
        *("accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--cpu"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "-m", "catreview", "predict"),
    ]
    r = subprocess.run(
        [*launch, *db, "--no-reasoning", "--workers", "0", "--batch-size", "4"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "6 photos; stage 1: 6 computed" in r.stdout, r.stdout
    reg = ModelRegistry(load_settings(database_url=settings.database_url, demo_dir=settings.demo_dir))
    assert len(_rows(engine, "vlm")) == 6
    _assert_equal_to_one_by_one(engine, reg)
    bad = subprocess.run(
        [sys.executable, "-m", "catreview", "predict", *db, "--workers", "-1"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--workers: must be 0 or more, got -1" in bad.stderr
