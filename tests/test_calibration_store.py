"""Calibration fitted on reviewed photos in the database is stored and used by fused predictions."""

from __future__ import annotations

import shutil
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from catreview.app.presenters.calibration import report_text
from catreview.config import VLMProfile
from catreview.data.db import AdapterVersion, CalibrationRecord, SplitAssignment, make_engine, utcnow
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.evaluate.store import fit_and_store, review_arrays, review_records
from catreview.models.registry import ModelRegistry
from catreview.predict.runner import run_predictions
from catreview.query.photos import iter_views
from tests.calibration_reference import assert_reports_equal, reference_calibrate


def labelled_photos(settings, cats_dir: Path, tmp_path: Path):
    """36 shared photos of 4 breeds imported with folder labels, predictions run."""
    root = tmp_path / "photos"
    for breed in ("Bengal", "Abyssinian", "Scottish_Fold", "Exotic_Shorthair"):
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:9]:
            shutil.copy(p, root / breed / p.name)
    engine = make_engine(settings.database_url)
    reg = ModelRegistry(settings)
    import_folder(engine, root, vocabulary=BreedVocabulary.default(), labels_from_folders=True)
    run_predictions(engine, reg)
    return engine, reg


def test_fit_store_and_use(settings, cats_dir: Path, tmp_path: Path) -> None:
    engine, reg = labelled_photos(settings, cats_dir, tmp_path)
    # the compact arrays the fit streams into give back exactly the records of the views
    vocab = BreedVocabulary.default()
    arrays = review_arrays(iter_views(engine, reg), 36, vocab)
    assert len(arrays) == 36 and arrays.records() == review_records(list(iter_views(engine, reg)), vocab)
    before = {v["id"]: v["fused"] for v in iter_views(engine, reg)}
    assert all(f["blend"] == "config" for f in before.values())

    too_many = settings.model_copy(
        update={"fusion": settings.fusion.model_copy(update={"calibration_min_reviews": 37})}
    )
    with pytest.raises(ValueError, match="at least 37"):
        fit_and_store(too_many, reg)

    report, row_id = fit_and_store(settings, reg)
    assert row_id is not None and report.n_reviews == 36
    # the fit on the streamed arrays is the per-record fit of their records (the old code path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the demo models' T may reach a bound
        expected = reference_calibrate(
            arrays.records(),
            min_reviews=settings.fusion.calibration_min_reviews,
            current_weight=settings.fusion.weight,
            n_folds=settings.fusion.calibration_folds,
        )
    assert_reports_equal(report, expected, tol=1e-12)
    # cross-validated numbers on the real photos, stratified over the 4 breeds
    assert report.n_folds == settings.fusion.calibration_folds == 5 and report.cv_note is None
    assert 0.0 <= report.fused.ece_after_cv <= 1.0 and 0.0 <= report.stage1.balanced_accuracy_after_cv <= 1.0
    assert report.stage1_temperature > 0 and 0.0 <= report.weight <= 1.0
    assert {r["breed"] for r in report.per_breed_rows()} == {
        "Bengal",
        "Abyssinian",
        "Scottish Fold",
        "Exotic Shorthair",
    }
    with Session(engine) as s:
        stored = s.get(CalibrationRecord, row_id)
    assert (stored.weight, stored.temperature_fused) == (report.weight, report.fused_temperature)
    refit, _ = fit_and_store(settings, reg, store=False)
    assert refit.current_weight == report.weight  # "before" is the weight in force now, not the config's
    after = {v["id"]: v["fused"] for v in iter_views(engine, ModelRegistry(settings))}
    assert all(f["blend"] == f"calibration #{row_id}" for f in after.values())
    for f in after.values():
        assert sum(f["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


def test_photos_the_active_adapter_learned_are_left_out(settings, cats_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    settings = settings.model_copy(
        update={"fusion": settings.fusion.model_copy(update={"calibration_min_reviews": 20})}
    )
    engine, reg = labelled_photos(settings, cats_dir, tmp_path)
    base = reg.vlm().profile.model
    adapter_dir = tmp_path / "adapter"
    lora = LoraConfig(r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    get_peft_model(AutoModelForImageTextToText.from_pretrained(base), lora).save_pretrained(adapter_dir)
    shas = [v["sha256"] for v in iter_views(engine, reg)]
    created = utcnow()
    with Session(engine) as s:
        s.add(AdapterVersion(base_model=base, path=str(adapter_dir), export_hash="x", active=True, created_at=created))
        early = created - timedelta(minutes=5)
        s.add_all([SplitAssignment(sha256=h, split="train", assigned_at=early) for h in shas[:10]])
        s.add_all([SplitAssignment(sha256=h, split="val", assigned_at=early) for h in shas[10:14]])
        # assigned after the adapter was made: not in its training data
        s.add_all(
            [SplitAssignment(sha256=h, split="train", assigned_at=created + timedelta(minutes=5)) for h in shas[14:16]]
        )
        s.commit()
    fresh = ModelRegistry(settings)
    assert str(fresh.vlm().profile.adapter) == str(adapter_dir)
    report, _ = fit_and_store(settings, fresh, store=False)
    assert report.n_reviews == 26
    assert "Left out 10 reviewed photos of the train split" in report_text(report)

    # An adapter folder this database does not know: nothing can be left out, and the report says so.
    shutil.copytree(adapter_dir, tmp_path / "adapter-copy")
    unknown = settings.model_copy(
        update={
            "vlm_profiles": {"tiny": VLMProfile(model=base, adapter=str(tmp_path / "adapter-copy"))},
            "active_vlm": "tiny",
        }
    )
    report, _ = fit_and_store(unknown, ModelRegistry(unknown), store=False)
    assert report.n_reviews == 36 and "cannot be left out" in report_text(report)


def test_checkpoint_spellings_match_review_labels() -> None:
    views = [
        {
            "review": {"label": "Maine Coon"},
            "stage1": [
                {"label": "Maine_Coon", "probability": 0.7},
                {"label": "norwegian forest cat", "probability": 0.3},
            ],
            "vlm": {"probabilities": {"Maine_Coon": 0.5, "norwegian forest cat": 0.3, "other": 0.2}},
        }
    ]
    (rec,) = review_records(views, BreedVocabulary.default())
    assert rec.human_label == "Maine Coon"
    # a wider top-k than the first photo's, no verdict, a photo without a breed label: the arrays
    # pad and keep every record as it was
    views += [
        {"review": {"label": "Bengal"}, "stage1": [{"label": f"b{i}", "probability": 0.25} for i in range(4)]},
        {"review": {"label": "Unsure"}, "stage1": views[0]["stage1"]},
    ]
    arrays = review_arrays(views, len(views), BreedVocabulary.default())
    assert arrays.records() == review_records(views, BreedVocabulary.default()) and len(arrays) == 2
    assert arrays.stage1_labels.shape == (2, 4) and list(arrays.has_vlm) == [True, False]
    with pytest.raises(ValueError, match="more records than the 1 allocated"):
        review_arrays(views, 1)
    assert [label for label, _ in rec.stage1_topk] == ["Maine Coon", "Norwegian Forest Cat"]
    assert rec.vlm_probs == {"Maine Coon": 0.5, "Norwegian Forest Cat": 0.3, "other": 0.2}
