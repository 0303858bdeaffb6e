"""Fitting the calibration on the reviewed photos of the database and storing it.

Reads the latest human review of each photo (breeds only; "Not a cat"/"Unsure" are left out) and
the cached predictions of the current model versions, runs :func:`catreview.evaluate.calibration.calibrate`
and stores temperatures + weight in ``calibrations`` for this (classifier, VLM) version pair.
:func:`catreview.query.photos.current_blend` then uses them for every fused prediction.

Photos the VLM's active LoRA adapter may have learned (the ``train`` split of the exports made
before the adapter was created) are left out: their VLM probabilities are fitted to the very
labels calibration measures against, so they would make the VLM look better calibrated and more
accurate than it is on new photos.

Scale: only reviewed photos with a breed label are read (ids from ``images.current_label``), their
views streamed in batches (:func:`catreview.query.photos.iter_views`) into :class:`ReviewArrays`,
a few numbers per photo, which :func:`~catreview.evaluate.calibration.calibrate` fits on as they are
(no record per photo); the adapter's training photos are only counted (one query per batch).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func
from sqlmodel import Session, col, select

from catreview.adapters.versions import training_photo_hashes
from catreview.data.db import CalibrationRecord, ImageRecord, Prediction, make_engine
from catreview.data.labels import SPECIAL_LABELS, BreedVocabulary, is_breed
from catreview.evaluate.calibration import CalibrationReport, CandidateArrays, ReviewRecord, calibrate
from catreview.predict.fusion import OTHER
from catreview.query.photos import PhotoView, current_blend, iter_views

if TYPE_CHECKING:
    from catreview.config import Settings
    from catreview.models.registry import ModelRegistry

__all__ = ["ReviewArrays", "fit_and_store", "review_arrays", "review_record", "review_records", "reviewed_breed_photos"]

BATCH_SIZE = 500
"""Photo ids per query when counting the left-out training photos."""


def review_record(view: PhotoView | dict[str, Any], vocabulary: BreedVocabulary | None = None) -> ReviewRecord | None:
    """The :class:`ReviewRecord` of one photo, or ``None`` unless its latest review names a breed
    and it has stage-1 predictions (VLM probabilities ``None`` when routing skipped the VLM or it
    has not run).

    Stage-1 labels and the VLM's candidate keys are mapped to ``vocabulary``'s canonical names
    (:meth:`~catreview.data.labels.BreedVocabulary.canonical_or_same`), like the reviews are, so a
    checkpoint labelled ``"Maine_Coon"`` matches the review ``"Maine Coon"``.
    """
    canon: Callable[[str], str] = vocabulary.canonical_or_same if vocabulary is not None else (lambda label: label)
    review, s1 = view.get("review"), view.get("stage1")
    if not review or not s1 or not is_breed(review["label"]):
        return None
    vlm = (view.get("vlm") or {}).get("probabilities")
    return ReviewRecord(
        human_label=canon(review["label"]),
        stage1_topk=[(canon(d["label"]), d["probability"]) for d in s1],
        vlm_probs=None if vlm is None else {k if k == OTHER else canon(k): p for k, p in vlm.items()},
    )


def review_records(
    views: Iterable[PhotoView | dict[str, Any]], vocabulary: BreedVocabulary | None = None
) -> list[ReviewRecord]:
    """:func:`review_record` of every view that has one, in order."""
    return [r for r in (review_record(v, vocabulary) for v in views) if r is not None]


@dataclass(frozen=True)
class ReviewArrays(CandidateArrays):
    """What a calibration fit needs of N reviewed photos, as arrays (a few dozen bytes a photo):
    the :class:`~catreview.evaluate.calibration.CandidateArrays` that
    :func:`~catreview.evaluate.calibration.calibrate` fits on directly.

    Labels are integer codes into ``labels`` (canonical breed names, and
    :data:`~catreview.predict.fusion.OTHER`); ``K`` is the widest stage-1 top-k, ``V`` the widest
    VLM distribution (candidates + OTHER).

    Attributes:
        labels: the name of each code.
        human: ``(N,)`` int32, the reviewer's breed.
        stage1_labels: ``(N, K)`` int32, stage 1's top-k in its order; -1 past a photo's own k.
        stage1_probs: ``(N, K)`` float64 probabilities in [0, 1]; NaN past a photo's own k.
        vlm_labels: ``(N, V)`` int32, the VLM's candidates and OTHER in stored order; -1 padding
            (the whole row without a verdict).
        vlm_probs: ``(N, V)`` float64 in [0, 1], NaN padding.
        has_vlm: ``(N,)`` bool, the photo has a VLM verdict.

    :meth:`~catreview.evaluate.calibration.CandidateArrays.records` gives the photos back as
    :class:`ReviewRecord` values, equal to those they were built from.
    """


class _ArrayBuilder:
    """Fills :class:`ReviewArrays` one record at a time; ``capacity`` rows are allocated up front
    (columns grow when a wider top-k comes)."""

    def __init__(self, capacity: int) -> None:
        self.n = 0
        self.codes: dict[str, int] = {}
        self.human = np.zeros(capacity, dtype=np.int32)
        self.has_vlm = np.zeros(capacity, dtype=bool)
        self.s1 = (np.full((capacity, 3), -1, dtype=np.int32), np.full((capacity, 3), np.nan))
        self.vlm = (np.full((capacity, 4), -1, dtype=np.int32), np.full((capacity, 4), np.nan))

    def _code(self, label: str) -> int:
        return self.codes.setdefault(label, len(self.codes))

    @staticmethod
    def _put(
        cols: tuple[np.ndarray, np.ndarray], row: int, items: Sequence[tuple[str, float]], code: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        labels, probs = cols
        if len(items) > labels.shape[1]:
            extra = len(items) - labels.shape[1]
            labels = np.pad(labels, ((0, 0), (0, extra)), constant_values=-1)
            probs = np.pad(probs, ((0, 0), (0, extra)), constant_values=np.nan)
        for j, (label, p) in enumerate(items):
            labels[row, j], probs[row, j] = code(label), p
        return labels, probs

    def add(self, record: ReviewRecord) -> None:
        i = self.n
        if i == self.human.shape[0]:
            raise ValueError(f"more records than the {i} allocated")
        s1 = record.stage1_topk
        topk: list[tuple[str, float]] = list(s1.items()) if isinstance(s1, Mapping) else [(lab, p) for lab, p in s1]
        self.human[i] = self._code(record.human_label)
        self.s1 = self._put(self.s1, i, topk, self._code)
        if record.vlm_probs is not None:
            self.has_vlm[i] = True
            self.vlm = self._put(self.vlm, i, list(record.vlm_probs.items()), self._code)
        self.n += 1

    def finish(self) -> ReviewArrays:
        n = self.n
        return ReviewArrays(
            labels=list(self.codes),
            human=self.human[:n].copy(),
            stage1_labels=self.s1[0][:n].copy(),
            stage1_probs=self.s1[1][:n].copy(),
            vlm_labels=self.vlm[0][:n].copy(),
            vlm_probs=self.vlm[1][:n].copy(),
            has_vlm=self.has_vlm[:n].copy(),
        )


def review_arrays(
    views: Iterable[PhotoView | dict[str, Any]], capacity: int, vocabulary: BreedVocabulary | None = None
) -> ReviewArrays:
    """:class:`ReviewArrays` of the views that have a :func:`review_record`, consumed as a stream
    (nothing kept per view). ``capacity`` bounds the number of records (e.g. the number of views).

    Raises:
        ValueError: more records than ``capacity``.
    """
    builder = _ArrayBuilder(capacity)
    for v in views:
        rec = review_record(v, vocabulary)
        if rec is not None:
            builder.add(rec)
    return builder.finish()


def reviewed_breed_photos(session: Session) -> list[tuple[int, str]]:
    """``(image id, sha256)`` of the photos whose current review names a breed, by id (one query
    on ``images``: the denormalised ``current_label``)."""
    q = (
        select(col(ImageRecord.id), col(ImageRecord.sha256))
        .where(col(ImageRecord.current_review_id).is_not(None), col(ImageRecord.current_label).not_in(SPECIAL_LABELS))
        .order_by(col(ImageRecord.id))
    )
    return [(int(i), sha) for i, sha in session.exec(q) if i is not None]


def _with_stage1(session: Session, image_ids: Sequence[int], model_id: str, model_version: str) -> int:
    """How many of ``image_ids`` have a stage-1 prediction of this model version (a count per batch)."""
    n = 0
    for start in range(0, len(image_ids), BATCH_SIZE):
        q = select(func.count()).where(
            col(Prediction.image_id).in_(image_ids[start : start + BATCH_SIZE]),
            Prediction.kind == "stage1",
            Prediction.model_id == model_id,
            Prediction.model_version == model_version,
        )
        n += int(session.exec(q).one())
    return n


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
    clf, vlm = registry.classifier(), registry.vlm(vlm_name)
    with Session(engine) as session:
        trained = training_photo_hashes(session, vlm.profile.adapter)
        photos = reviewed_breed_photos(session)
        left_out = [i for i, sha in photos if trained and sha in trained]
        n_left_out = _with_stage1(session, left_out, clf.model_id, clf.model_version) if left_out else 0
    note = None
    if trained is None:
        note = (
            f"The VLM's adapter {vlm.profile.adapter} is not a version of this database: photos it was trained on "
            "cannot be left out, so the VLM numbers may be optimistic."
        )
    elif trained:
        note = (
            f"Left out {n_left_out} reviewed photos of the train split the active adapter was trained on "
            "(its verdicts on them are not a fair test)."
        )
    kept = [i for i, sha in photos if not (trained and sha in trained)]
    vocabulary = BreedVocabulary.from_labels_file(settings.classifier.labels_file)
    arrays = review_arrays(iter_views(engine, registry, vlm_name=vlm_name, image_ids=kept), len(kept), vocabulary)
    with Session(engine) as session:  # the weight in force: the last fit's, else the configured one
        in_force = current_blend(session, settings, clf.model_version, vlm.model_version).weight
    report = calibrate(
        arrays,
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
