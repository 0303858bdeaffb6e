"""Calibration fitted on reviewed photos in the database is stored and used by fused predictions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from catreview.calibration_store import fit_and_store
from sqlmodel import Session

from catreview.db import CalibrationRecord, make_engine
from catreview.importer import import_folder
from catreview.labels import BreedVocabulary
from catreview.predict import run_predictions
from catreview.registry import ModelRegistry
from catreview.results import iter_views


def test_fit_store_and_use(settings, cats_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for breed in ("Bengal", "Abyssinian", "Scottish_Fold", "Exotic_Shorthair"):
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:9]:
            shutil.copy(p, root / breed / p.name)
    engine = make_engine(settings.database_url)
    reg = ModelRegistry(settings)
    import_folder(engine, root, vocabulary=BreedVocabulary.default(), labels_from_folders=True)
    run_predictions(engine, reg)
    before = {v["id"]: v["fused"] for v in iter_views(engine, reg)}
    assert all(f["blend"] == "config" for f in before.values())

    too_many = settings.model_copy(update={"fusion": settings.fusion.model_copy(update={"calibration_min_reviews": 37})})
    with pytest.raises(ValueError, match="at least 37"):
        fit_and_store(too_many, reg)

    report, row_id = fit_and_store(settings, reg)
    assert row_id is not None and report.n_reviews == 36
    # cross-validated numbers on the real photos, stratified over the 4 breeds
    assert report.n_folds == settings.fusion.calibration_folds == 5 and report.cv_note is None
    assert 0.0 <= report.fused.ece_after_cv <= 1.0 and 0.0 <= report.stage1.balanced_accuracy_after_cv <= 1.0
    assert report.stage1_temperature > 0 and 0.0 <= report.weight <= 1.0
    assert {r["breed"] for r in report.per_breed_rows()} == {"Bengal", "Abyssinian", "Scottish Fold", "Exotic Shorthair"}
    with Session(engine) as s:
        stored = s.get(CalibrationRecord, row_id)
    assert (stored.weight, stored.temperature_fused) == (report.weight, report.fused_temperature)
    after = {v["id"]: v["fused"] for v in iter_views(engine, ModelRegistry(settings))}
    assert all(f["blend"] == f"calibration #{row_id}" for f in after.values())
    for f in after.values():
        assert sum(f["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
