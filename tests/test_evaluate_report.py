"""The evaluation report (``catreview.evaluate.report``): every stored model version scored on the
held-out reviewed photos, checked against the photo views the app shows and scikit-learn; photos an
adapter was trained on are left out; the CLI and the Evaluation tab show it.

Real shared photos, the tiny random built-in models and a real (random) LoRA adapter, through the
project's import, prediction and activation code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from sqlmodel import Session, col, select

from catreview.app.core import ReviewApp
from catreview.app.presenters.evaluate import report_text
from catreview.app.ui import build_ui, evaluate_tab
from catreview.cli.main import main
from catreview.data.db import ImageRecord, SplitAssignment, utcnow
from catreview.data.importer import import_folder
from catreview.evaluate.report import ANOTHER_BREED, adapter_name_of, evaluation_report
from catreview.predict.fusion import OTHER
from catreview.predict.runner import run_predictions
from catreview.query.photos import iter_views
from tests.test_adapters import add_version, random_adapter

# scikit-learn's reference balanced accuracy warns when the shown labels include breeds not in y_true
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")

BREEDS = ("Bengal", "Siamese", "Persian")
PER_BREED = 4


@pytest.fixture(scope="module")
def labelled_db(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path, cats_dir: Path) -> Path:
    """A SQLite file holding 12 labelled shared photos (3 breeds) with predictions of the tiny
    random models (stage 1 + VLM), plus one photo that is not reviewed; built once per module."""
    from catreview.config import load_settings

    tmp = tmp_path_factory.mktemp("evaluate")
    root = tmp / "photos"
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:PER_BREED]:
            shutil.copy(p, root / breed / p.name)
    (tmp / "unlabelled").mkdir()
    shutil.copy(sorted((cats_dir / "Bombay").glob("*.jpg"))[0], tmp / "unlabelled" / "x.jpg")
    db = tmp / "labelled.db"
    app = ReviewApp(load_settings(database_url=f"sqlite:///{db}", demo_dir=demo_dir, data_dir=tmp / "data"))
    import_folder(app.engine, root, vocabulary=app.vocabulary, labels_from_folders=True, workers=1)
    import_folder(app.engine, tmp / "unlabelled", vocabulary=app.vocabulary, workers=1)
    run_predictions(app.engine, app.registry, num_workers=0)
    app.engine.dispose()  # checkpoints SQLite's write-ahead log into the file
    return db


@pytest.fixture
def labelled_app(labelled_db: Path, settings) -> ReviewApp:
    """A fresh copy of :func:`labelled_db` opened by an app (tests may change it)."""
    shutil.copy(labelled_db, settings.database_url.removeprefix("sqlite:///"))
    return ReviewApp(settings)


def _reference(app: ReviewApp) -> dict[str, tuple[list[str], list[str]]]:
    """(true, shown) labels per stage from the photo views the Review tab shows (an independent path)."""
    out: dict[str, tuple[list[str], list[str]]] = {"stage 1": ([], []), "VLM": ([], []), "fused": ([], [])}
    canon = app.vocabulary.canonical_or_same
    for v in iter_views(app.engine, app.registry):
        if not v["review"]:
            continue
        human = v["review"]["label"]
        shown = {"stage 1": canon(v["stage1"][0]["label"]), "fused": v["fused"]["label"]}
        vlm = v["vlm"] or {}
        if vlm.get("label"):
            shown["VLM"] = vlm["label"] if vlm["label"] == OTHER else canon(vlm["label"])
        for stage, label in shown.items():
            out[stage][0].append(human)
            out[stage][1].append(label)
    return out


def test_report_matches_the_review_tab_and_scikit_learn(labelled_app: ReviewApp) -> None:
    app = labelled_app
    report = app.evaluation()
    assert (report.n_reviewed, report.n_excluded, report.n_evaluated) == (12, 0, 12)
    assert report.breeds == sorted(BREEDS)
    assert [r.stage for r in report.rows] == ["stage 1", "VLM", "fused"]
    assert all(r.active for r in report.rows)  # one version of each: the ones in use
    ref = _reference(app)
    for row in report.rows:
        y_true, y_pred = ref[row.stage]
        assert row.n == len(y_true) == 12
        assert row.accuracy == pytest.approx(np.mean(np.array(y_true) == np.array(y_pred)))
        assert row.balanced_accuracy == pytest.approx(balanced_accuracy_score(y_true, y_pred))
        shown = [p if p in BREEDS or p == OTHER else ANOTHER_BREED for p in y_pred]
        expected = confusion_matrix(y_true, shown, labels=row.columns)[: len(row.labels)]
        np.testing.assert_array_equal(row.confusion, expected)
        assert row.confusion.sum() == 12 and int(np.trace(row.confusion[:, : len(row.labels)])) == sum(
            a.correct for a in row.per_breed.values()
        )
        assert {b: a.total for b, a in row.per_breed.items()} == dict.fromkeys(sorted(BREEDS), PER_BREED)
    # Candidate accuracy: photos whose breed is a stage-1 candidate, VLM's argmax over the candidates.
    hits = n_cand = 0
    for v in iter_views(app.engine, app.registry):
        probs = {app.vocabulary.canonical_or_same(c): p for c, p in v["vlm"]["probabilities"].items() if c != OTHER}
        if v["review"] and v["review"]["label"] in probs:
            n_cand += 1
            hits += max(probs, key=lambda c: probs[c]) == v["review"]["label"]
    vlm = report.rows[1]
    assert vlm.n_candidates == 3 and vlm.n_candidate == n_cand
    assert vlm.candidate_accuracy == (hits / n_cand if n_cand else None)

    # Streaming: pages of 5 photos give the same report as one page.
    assert (
        evaluation_report(app.engine, app.settings, batch_size=5).to_dict()
        == evaluation_report(app.engine, app.settings).to_dict()
    )
    with pytest.raises(ValueError, match="batch_size"):
        evaluation_report(app.engine, app.settings, batch_size=0)


def test_photos_an_adapter_was_trained_on_are_left_out_for_every_version(
    labelled_app: ReviewApp, tmp_path: Path
) -> None:
    app = labelled_app
    base = app.registry.base_model()
    before = app.registry.vlm().model_version
    with Session(app.engine) as s:  # the first two photos of each breed were in a train split
        q = select(ImageRecord.sha256, ImageRecord.current_label).where(col(ImageRecord.current_label).is_not(None))
        rows = list(s.exec(q.order_by(col(ImageRecord.id))))
        train = [sha for b in BREEDS for sha in [sha for sha, lab in rows if lab == b][:2]]
        for sha in train:
            s.add(SplitAssignment(sha256=sha, split="train", assigned_at=utcnow()))
        s.commit()
    adapter = add_version(app.engine, app.settings, base, random_adapter(base, tmp_path / "a", seed=3))
    app.promote(adapter, actor="ada")  # predicted in the background (the app's own scheduling)
    assert app.wait(timeout=300), "background predictions of the new adapter still running after 300 s"
    assert app.job.error is None, app.job.log
    after = app.registry.vlm().model_version
    assert after != before and adapter_name_of(after) is not None and adapter_name_of(before) is None

    report = app.evaluation()
    assert (report.n_reviewed, report.n_excluded, report.n_evaluated) == (12, 6, 6)
    assert report.notes[0].startswith("Left out 6 of 12 reviewed photos")
    stages = [(r.stage, r.vlm_version, r.active) for r in report.rows]
    assert stages == [
        ("stage 1", None, True),
        ("VLM", after, True),
        ("VLM", before, False),
        ("fused", after, True),
        ("fused", before, False),
    ]
    assert all(r.n == 6 for r in report.rows)  # every version on the same held-out photos
    text = report_text(report)
    assert "Left out 6 of 12" in text and after in text and before in text

    # A stage-1 version fitted on some photos (the heads' hook) leaves those out too; unknown: a note.
    first = train[0]
    other = next(sha for sha, _ in rows if sha not in train)
    narrower = evaluation_report(app.engine, app.settings, stage1_trained=lambda s, m, v: {first, other})
    assert narrower.n_excluded == 7
    unknown = evaluation_report(app.engine, app.settings, stage1_trained=lambda s, m, v: None)
    assert unknown.n_excluded == 6 and any("training photos are unknown" in n for n in unknown.notes)


def test_cli_prints_the_table_and_json_and_refuses_an_empty_database(
    labelled_app: ReviewApp, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("CATREVIEW_DEMO_DIR", str(labelled_app.settings.demo_dir))
    monkeypatch.setenv("CATREVIEW_DATA_DIR", str(labelled_app.settings.data_dir))
    url = labelled_app.settings.database_url
    assert main(["evaluate", "--db", url, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == labelled_app.evaluation().to_dict()
    assert printed["photos"] == {"reviewed": 12, "excluded": 0, "evaluated": 12}
    assert main(["evaluate", "--db", url, "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("12 held-out photos of 3 breeds") and "Confusion matrix, fused" in out

    assert main(["evaluate", "--db", f"sqlite:///{tmp_path / 'empty.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Nothing to evaluate yet") and err.count("\n") == 1
    assert main(["evaluate", "--db", url, "--vlm", "no-such-profile"]) == 2
    assert "no VLM profile named 'no-such-profile'" in capsys.readouterr().err


def test_evaluation_tab_shows_the_table_per_breed_and_confusion(labelled_app: ReviewApp) -> None:
    build_ui(labelled_app)  # the tab is part of the app
    header, summary, per_breed, choice, matrix, report = evaluate_tab.evaluate(labelled_app)
    assert header.startswith("12 held-out photos")
    assert list(summary["stage"]) == ["stage 1", "VLM", "fused"] and list(summary["n"]) == [12, 12, 12]
    assert list(per_breed["breed"]) == sorted(BREEDS) and list(per_breed["photos"]) == [PER_BREED] * 3
    assert choice["value"] == report.rows[-1].name and len(choice["choices"]) == 3
    assert list(matrix["true breed"]) == sorted(BREEDS) and int(matrix[report.rows[-1].columns].to_numpy().sum()) == 12
    stage1 = evaluate_tab.confusion(report, report.rows[0].name)
    assert int(stage1[report.rows[0].columns].to_numpy().sum()) == 12
    assert evaluate_tab.confusion(None, report.rows[0].name).empty
