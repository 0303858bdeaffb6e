"""Fitting the calibration on the reviewed photos of the database and storing it.

Reads the latest human review of each photo (breeds only; "Not a cat"/"Unsure" are left out) and
the cached predictions of the current model versions, runs :func:`catreview.calibration.calibrate`
and stores temperatures + weight in ``calibrations`` for this (classifier, VLM) version pair.
:func:`catreview.results.current_blend` then uses them for every fused prediction.
"""

from __future__ import annotations

import json

from typing import Any

from sqlmodel import Session

from catreview.calibration import CalibrationReport, ReviewRecord, calibrate
from catreview.db import CalibrationRecord, make_engine
from catreview.labels import is_breed
from catreview.results import iter_views


def review_records(views: list[dict[str, Any]]) -> list[ReviewRecord]:
    """:class:`ReviewRecord` for photos whose latest review names a breed and that have stage-1
    predictions (VLM probabilities ``None`` when routing skipped the VLM or it has not run)."""
    out = []
    for v in views:
        review, s1 = v.get("review"), v.get("stage1")
        if not review or not s1 or not is_breed(review["label"]):
            continue
        vlm = v.get("vlm") or {}
        out.append(ReviewRecord(
            human_label=review["label"],
            stage1_topk=[(d["label"], d["probability"]) for d in s1],
            vlm_probs=vlm.get("probabilities"),
        ))
    return out


def fit_and_store(settings: Any, registry: Any, *, vlm_name: str | None = None, store: bool = True) -> tuple[CalibrationReport, int | None]:
    """Fit on the database of ``settings``; returns the report and the stored row id (or None).

    Raises:
        ValueError: fewer reviewed photos than ``fusion.calibration_min_reviews``.
    """
    engine = make_engine(settings.database_url)
    views = list(iter_views(engine, registry, vlm_name=vlm_name))
    records = review_records(views)
    report = calibrate(
        records,
        min_reviews=settings.fusion.calibration_min_reviews,
        current_weight=settings.fusion.weight,
        n_folds=settings.fusion.calibration_folds,
    )
    if not store:
        return report, None
    clf, vlm = registry.classifier(), registry.vlm(vlm_name)
    with Session(engine) as session:
        row = CalibrationRecord(
            stage1_version=clf.model_version,
            vlm_version=vlm.model_version,
            temperature_stage1=report.stage1_temperature,
            temperature_vlm=report.vlm_temperature or 1.0,
            weight=report.weight,
            temperature_fused=report.fused_temperature,
            n_reviews=report.n_reviews,
            report_json=json.dumps({"summary": report.summary_rows(), "per_breed": report.per_breed_rows()}, default=str),
        )
        session.add(row)
        session.commit()
        return report, row.id



