"""Fitting the calibration on the reviewed photos of the database and storing it.

Reads the latest human review of each photo (breeds only; "Not a cat"/"Unsure" are left out) and
the cached predictions of the current model versions, runs :func:`catreview.evaluate.calibration.calibrate`
and stores temperatures + weight in ``calibrations`` for this (classifier, VLM) version pair.
:func:`catreview.query.photos.current_blend` then uses them for every fused prediction.

Photos the VLM's active LoRA adapter may have learned (the ``train`` split of the exports made
before the adapter was created) are left out: their VLM probabilities are fitted to the very
labels calibration measures against, so they would make the VLM look better calibrated and more
accurate than it is on new photos.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlmodel import Session

from catreview.adapters.versions import training_photo_hashes
from catreview.data.db import CalibrationRecord, make_engine
from catreview.data.labels import BreedVocabulary, is_breed
from catreview.evaluate.calibration import CalibrationReport, ReviewRecord, calibrate
from catreview.predict.fusion import OTHER
from catreview.query.photos import PhotoView, current_blend, iter_views

if TYPE_CHECKING:
    from catreview.config import Settings
    from catreview.models.registry import ModelRegistry

__all__ = ["fit_and_store", "review_records"]


def review_records(views: Sequence[PhotoView], vocabulary: BreedVocabulary | None = None) -> list[ReviewRecord]:
    """:class:`ReviewRecord` for photos whose latest review names a breed and that have stage-1
    predictions (VLM probabilities ``None`` when routing skipped the VLM or it has not run).

    Stage-1 labels and the VLM's candidate keys are mapped to ``vocabulary``'s canonical names
    (:meth:`~catreview.data.labels.BreedVocabulary.canonical_or_same`), like the reviews are, so a
    checkpoint labelled ``"Maine_Coon"`` matches the review ``"Maine Coon"``.
    """
    canon = vocabulary.canonical_or_same if vocabulary is not None else (lambda label: label)
    out = []
    for v in views:
        review, s1 = v.get("review"), v.get("stage1")
        if not review or not s1 or not is_breed(review["label"]):
            continue
        vlm = (v.get("vlm") or {}).get("probabilities")
        out.append(
            ReviewRecord(
                human_label=canon(review["label"]),
                stage1_topk=[(canon(d["label"]), d["probability"]) for d in s1],
                vlm_probs=None if vlm is None else {k if k == OTHER else canon(k): p for k, p in vlm.items()},
            )
        )
    return out


def fit_and_store(
    settings: Settings, registry: ModelRegistry, *, vlm_name: str | None = None, store: bool = True
) -> tuple[CalibrationReport, int | None]:
    """Fit on the database of ``settings``; returns the report and the stored row id (or None).

    Photos the active adapter may have learned are left out (see the module docstring); the
    report's ``data_note`` says how many, or that the adapter's training photos are unknown.
    "Before" and the weight search's tie-break use the weight in force (the last stored fit for
    these model versions, else ``fusion.weight``).

    Raises:
        CalibrationError: (a ``ValueError``) fewer reviewed photos than
            ``fusion.calibration_min_reviews`` (after leaving out the adapter's training photos),
            see :func:`~catreview.evaluate.calibration.calibrate`.
    """
    engine = make_engine(settings.database_url)
    views = list(iter_views(engine, registry, vlm_name=vlm_name))
    adapter = registry.vlm(vlm_name).profile.adapter
    with Session(engine) as session:
        trained = training_photo_hashes(session, adapter)
    note = None
    if trained is None:
        note = (
            f"The VLM's adapter {adapter} is not a version of this database: photos it was trained on "
            "cannot be left out, so the VLM numbers may be optimistic."
        )
    elif trained:
        kept = [v for v in views if v["sha256"] not in trained]
        n_left_out = len(review_records(views)) - len(review_records(kept))
        views = kept
        note = (
            f"Left out {n_left_out} reviewed photos of the train split the active adapter was trained on "
            "(its verdicts on them are not a fair test)."
        )
    records = review_records(views, BreedVocabulary.from_labels_file(settings.classifier.labels_file))
    clf, vlm = registry.classifier(), registry.vlm(vlm_name)
    with Session(engine) as session:  # the weight in force: the last fit's, else the configured one
        in_force = current_blend(session, settings, clf.model_version, vlm.model_version).weight
    report = calibrate(
        records,
        min_reviews=settings.fusion.calibration_min_reviews,
        current_weight=in_force,
        n_folds=settings.fusion.calibration_folds,
    )
    report = dataclasses.replace(report, data_note=note)
    if not store:
        return report, None
    with Session(engine) as session:
        row = CalibrationRecord(
            stage1_version=clf.model_version,
            vlm_version=vlm.model_version,
            temperature_stage1=report.stage1_temperature,
            temperature_vlm=report.vlm_temperature or 1.0,
            weight=report.weight,
            temperature_fused=report.fused_temperature,
            n_reviews=report.n_reviews,
            report_json=json.dumps(
                {"summary": report.summary_rows(), "per_breed": report.per_breed_rows()}, default=str
            ),
        )
        session.add(row)
        session.commit()
        return report, row.id
