"""Both stages over the shared photos: caching by model version, routing, labels import, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import Session, select

from catreview.config import load_settings
from catreview.data.db import ImageRecord, Prediction, Review, make_engine
from catreview.data.importer import import_folder
from catreview.data.labels import BREEDS67_FILE, BreedVocabulary, read_label_file
from catreview.models.demo import build_demo_classifier
from catreview.models.registry import ModelRegistry
from catreview.predict.runner import run_predictions
from catreview.query.photos import iter_views

REPO_ROOT = Path(__file__).resolve().parents[1]
BREEDS = ["Sphynx", "Maine_Coon", "Bombay"]


@pytest.fixture
def photos(tmp_path: Path, cats_dir: Path) -> Path:
    """3 photos each of 3 breeds, copied into breed folders."""
    root = tmp_path / "photos"
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:3]:
            shutil.copy(p, root / breed / p.name)
    return root


def test_predictions_are_cached_per_model_version(settings, photos: Path, tmp_path: Path) -> None:
    engine = make_engine(settings.database_url)
    import_folder(engine, photos, vocabulary=BreedVocabulary.default())
    reg = ModelRegistry(settings)
    first = run_predictions(engine, reg)
    assert (first.stage1_computed, first.vlm_computed) == (9, 9)
    again = run_predictions(engine, ModelRegistry(settings))  # a restart: fresh registry
    assert (again.stage1_computed, again.vlm_computed, again.stage1_cached, again.vlm_cached) == (0, 0, 9, 9)

    views = list(iter_views(engine, reg))
    for v in views:
        assert len(v["stage1"]) == 3
        probs = v["vlm"]["probabilities"]
        assert list(probs) == [d["label"] for d in v["stage1"]] + ["other"]
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert sum(v["fused"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)

    # A new classifier checkpoint is a new version: stage 1 recomputed, old rows kept (history).
    ckpt = build_demo_classifier(tmp_path / "other" / "model.safetensors", read_label_file(BREEDS67_FILE), seed=1)
    s2 = load_settings(
        database_url=settings.database_url,
        demo_dir=settings.demo_dir,
        classifier={"model": "convnext_atto", "checkpoint": ckpt},
    )
    third = run_predictions(engine, ModelRegistry(s2))
    assert third.stage1_computed == 9 and third.stage1_cached == 0
    with Session(engine) as s:
        assert len(list(s.exec(select(Prediction).where(Prediction.kind == "stage1")))) == 18

    # top_k changed: stage 1 recomputed and overwritten in place (same version), views follow.
    s3 = s2.model_copy(update={"classifier": s2.classifier.model_copy(update={"top_k": 2})})
    fourth = run_predictions(engine, ModelRegistry(s3))
    assert fourth.stage1_computed == 9 and fourth.stage1_cached == 0
    assert all(len(v["stage1"]) == 2 for v in iter_views(engine, ModelRegistry(s3)))
    with Session(engine) as s:
        assert len(list(s.exec(select(Prediction).where(Prediction.kind == "stage1")))) == 18

    # The same checkpoint with its class names in another order is another version.
    names = read_label_file(BREEDS67_FILE)
    (tmp_path / "reordered.txt").write_text("\n".join(names[::-1]) + "\n")
    s4 = s2.model_copy(
        update={"classifier": s2.classifier.model_copy(update={"labels_file": tmp_path / "reordered.txt"})}
    )
    assert ModelRegistry(s4).classifier().model_version != ModelRegistry(s2).classifier().model_version


def test_a_prediction_stored_meanwhile_is_kept_and_other_errors_raise(settings, photos: Path) -> None:
    from sqlalchemy.exc import IntegrityError

    from catreview.predict.runner import _store

    engine = make_engine(settings.database_url)
    import_folder(engine, photos, vocabulary=BreedVocabulary.default())
    with Session(engine) as s:
        ids = [i.id for i in s.exec(select(ImageRecord))]
        row = lambda img, text: Prediction(
            image_id=img,
            kind="reasoning",
            model_id="m",
            model_version="v",
            input_key="k",
            payload_json=f'{{"text": "{text}"}}',
        )
        _store(s, [row(ids[0], "first")])
        # another process stored photo 0 meanwhile: skipped, photo 1 still stored
        _store(s, [row(ids[0], "second"), row(ids[1], "new")])
        texts = {
            p.image_id: p.payload["text"] for p in s.exec(select(Prediction).where(Prediction.kind == "reasoning"))
        }
        assert texts == {ids[0]: "first", ids[1]: "new"}
        with pytest.raises(IntegrityError):  # not a duplicate: a photo that does not exist
            _store(s, [row(10_000, "orphan")])


def test_routing_threshold_skips_the_vlm(settings, photos: Path) -> None:
    engine = make_engine(settings.database_url)
    import_folder(engine, photos, vocabulary=BreedVocabulary.default())
    routed = settings.model_copy(update={"fusion": settings.fusion.model_copy(update={"routing_threshold": 0.0})})
    summary = run_predictions(engine, ModelRegistry(routed))
    assert summary.vlm_skipped == 9 and summary.vlm_computed == 0
    for v in iter_views(engine, ModelRegistry(routed)):
        assert v["vlm"]["skipped"] is True
        assert v["fused"]["label"] == v["stage1"][0]["label"]


def test_labels_csv_reports_problems(settings, photos: Path, tmp_path: Path) -> None:
    engine = make_engine(settings.database_url)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "path,label\n"
        "Sphynx/" + sorted(os.listdir(photos / "Sphynx"))[0] + ",sphynx\n"
        "Maine_Coon/" + sorted(os.listdir(photos / "Maine_Coon"))[0] + ",Maine_Coon\n"
        "Maine_Coon/" + sorted(os.listdir(photos / "Maine_Coon"))[0] + ",Maine_Coon\n"
        "Sphynx/" + sorted(os.listdir(photos / "Sphynx"))[0] + ",Siamese\n"
        "Bombay/" + sorted(os.listdir(photos / "Bombay"))[0] + ",Tabby Tiger Lion\n"
        "Bombay/gone.jpg,Bombay\n"
    )
    summary = import_folder(engine, photos, vocabulary=BreedVocabulary.default(), labels_csv=csv)
    assert summary.labels_recorded == 2
    assert [lab for _, lab in summary.unknown_labels] == ["Tabby Tiger Lion"]
    assert summary.missing_files == ["Bombay/gone.jpg"]
    first_sphynx = sorted(os.listdir(photos / "Sphynx"))[0]
    assert summary.duplicate_label_rows == [
        "Maine_Coon/" + sorted(os.listdir(photos / "Maine_Coon"))[0],
        f"Sphynx/{first_sphynx} (labels 'sphynx' and 'Siamese'; the first is kept)",
    ]
    with pytest.raises(FileNotFoundError, match="labels file not found: .*nope.csv"):
        import_folder(engine, photos, vocabulary=BreedVocabulary.default(), labels_csv=tmp_path / "nope.csv")
    with Session(engine) as s:
        labels = sorted(r.label for r in s.exec(select(Review)))
    assert labels == ["Maine Coon", "Sphynx - Hairless Cat"]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catreview", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_cli_import_predict_list_json(settings, photos: Path) -> None:
    env = {**os.environ, "CATREVIEW_DEMO_DIR": str(settings.demo_dir), "HF_HUB_OFFLINE": "1"}
    db = ["--db", settings.database_url]
    r = _cli("import", str(photos), "--labels-from-folders", *db, env=env)
    assert r.returncode == 0, r.stderr
    assert "9 new" in r.stdout and "labels recorded as reviews: 9" in r.stdout
    r = _cli("predict", *db, env=env)
    assert r.returncode == 0, r.stderr
    r = _cli("predictions", "--json", *db, env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 9
    for row in rows:
        assert set(row) >= {"path", "sha256", "error", "stage1", "vlm", "fused", "review"}
        assert row["error"] is None and len(row["stage1"]) == 3
        assert row["vlm"]["reasoning"], "predict generates the reasoning by default"
        assert row["review"]["annotator"] == "import"
    assert {row["review"]["label"] for row in rows} == {"Sphynx - Hairless Cat", "Maine Coon", "Bombay"}
    bad = _cli("import", str(photos / "nope"), *db, env=env)
    assert bad.returncode == 2 and "not a folder" in bad.stderr and "Traceback" not in bad.stderr

    # `predictions --json | head -0`: the reader is gone before the first line; no BrokenPipeError
    # traceback (the pipe is closed at once, so the first write fails whatever the buffer size).
    proc = subprocess.Popen(
        [sys.executable, "-m", "catreview", "predictions", "--json", *db],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in proc.stderr.read().decode()

    # A file that is not a database: one line, not a traceback.
    not_db = photos.parent / "notes.db"
    not_db.write_text("these are my notes, not a database\n")
    r = _cli("predictions", "--db", f"sqlite:///{not_db}", env=env)
    assert r.returncode == 2 and "cannot open the database" in r.stderr and "Traceback" not in r.stderr


def test_export_tab_refuses_bad_sizes_and_writes_nothing(settings, photos: Path) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from catreview.app.core import ReviewApp
    from catreview.app.ui import build_ui

    app = ReviewApp(settings)
    import_folder(app.engine, photos, vocabulary=BreedVocabulary.default(), labels_from_folders=True)
    demo = build_ui(app)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        for size in (0, -336):
            summary, zip_file = client.predict(0, size, None, False, False, api_name="/export")
            assert summary == (
                "Export failed, nothing written: image size must be a positive whole number "
                f"of pixels (e.g. 336), got {size}"
            ), summary
            assert zip_file is None
        with pytest.raises(AppError, match="less than minimum value 0"):  # the cap field's own bound
            client.predict(0, 336, -2, False, False, api_name="/export")
        summary, _ = client.predict(0, 8, None, False, False, api_name="/export")  # the export's own floor
        assert summary == "Export failed, nothing written: image_size must be at least 16 px, got 8", summary
        assert not (settings.data_dir / "exports").exists() or not any((settings.data_dir / "exports").iterdir())
        summary, zip_file = client.predict(0, 64, 0, False, False, api_name="/export")  # 0 = no cap
        assert "9 photos" in summary and zip_file.endswith(".zip"), summary
    finally:
        demo.close()
