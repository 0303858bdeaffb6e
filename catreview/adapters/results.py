"""What a finished LoRA round hands to the app: the typed content of ``result.json``.

:mod:`training.lora` builds a :class:`RoundResult` and writes it last into the run folder
(:data:`catreview.adapters.runfolder.RESULT_FILE`); :func:`catreview.adapters.rounds.register_round`
reads it back and :func:`catreview.adapters.gate.gate` compares its :class:`EvalMetrics`. One model
on both sides, so the trainer and the gate cannot drift apart on key names.

Serialisation keeps exactly the keys that were set (``model_dump(exclude_unset=True)``): metrics
of a validation evaluation carry ``val_loss``, those of the test split ``loss`` and the per-photo
lists, and neither gains the other's keys as ``null``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from catreview.adapters.runfolder import BEST_DIR, RESULT_FILE, read_result
from catreview.errors import CatreviewError

#: Fields of :class:`EvalMetrics` that hold one entry per scored photo (in the same order): what
#: the paired bootstrap resamples. Left out of the metrics stored with a version (only the
#: round's ``result.json`` keeps them).
PER_PHOTO_KEYS = ("photos", "truth", "predicted")


class ResultFileError(CatreviewError, ValueError):
    """A ``result.json`` that does not hold a round's result (damaged, or another program's)."""


class BreedAccuracy(BaseModel):
    """One class's accuracy (recall) on the scored photos: ``correct`` of ``n``, ``accuracy`` in [0, 1]."""

    model_config = ConfigDict(frozen=True)

    correct: int
    n: int
    accuracy: float


class EvalMetrics(BaseModel):
    """One model scored once on one split by the app's scorer (:func:`training.evaluation.evaluate`).

    Attributes:
        n: photos scored.
        accuracy, balanced_accuracy, macro_f1: in [0, 1] (:mod:`catreview.metrics`;
            ``"other"`` is a class of its own when it is a photo's correct answer).
        candidate_accuracy: in [0, 1]: on the photos whose breed is among their candidates, the
            share whose breed scores highest among the breed candidates (``"other"`` left out;
            chance ``1 / k``); ``None`` when there is no such photo.
        per_breed: ``{class: BreedAccuracy}`` over the classes present in the truth.
        val_loss: validation evaluations: mean per-token NLL of the correct answer (nats).
        loss: test evaluations: the same number (the gate's held-out loss).
        eval_seconds: wall time of the evaluation.
        step: optimizer step the evaluation was made at (selection metrics).
        photos, truth, predicted: test evaluations only, in photo order: file names, correct
            answers and the scorer's labels (:data:`PER_PHOTO_KEYS`).

    Every field has a default so that an empty ``{}`` (no evaluation) reads as "nothing scored";
    an unknown key is refused (the trainer and this contract must not drift apart).
    """

    model_config = ConfigDict(extra="forbid")

    n: int = 0
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    macro_f1: float | None = None
    candidate_accuracy: float | None = None
    per_breed: dict[str, BreedAccuracy] = Field(default_factory=dict)
    val_loss: float | None = None
    loss: float | None = None
    eval_seconds: float | None = None
    step: int | None = None
    photos: list[str] | None = None
    truth: list[str] | None = None
    predicted: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The keys that were set, JSON-ready."""
        return self.model_dump(mode="json", exclude_unset=True)

    def without_per_photo(self) -> dict[str, Any]:
        """:meth:`to_dict` without the per-photo lists, for storing with a version and showing."""
        return {k: v for k, v in self.to_dict().items() if k not in PER_PHOTO_KEYS}


class Baseline(BaseModel):
    """The active adapter a round was started against, scored by the round on its validation
    items (``metrics``) and, once, on its test items (``test_metrics``, for the gate)."""

    adapter: str
    metrics: EvalMetrics | None = None
    test_metrics: EvalMetrics | None = None


class RoundResult(BaseModel):
    """``result.json`` of a finished round (written last, atomically, by :mod:`training.lora`).

    Attributes:
        base_model: hub id or folder the adapter was trained for.
        export_hash: the export's content hash (stored with the version).
        config: the round's :meth:`catreview.adapters.train_config.TrainConfig.to_dict`.
        adapter_dir: the selected adapter's folder, relative to the run folder (``best``).
        metrics: the selected checkpoint's validation metrics (best of several evaluations:
            optimistically biased, never gated on).
        best_step: optimizer step of the selected checkpoint.
        initial_metrics, initial_test_metrics: the base model (untrained adapter, step 0) on the
            validation and the test split.
        final_metrics: the last validation evaluation.
        test_metrics: the selected checkpoint on the test split, scored once after training
            (``None`` without test photos).
        baseline: the active adapter, when the round was given one.
        n_test: test photos.
        steps, total_steps: optimizer steps done and planned.

    The remaining fields are the round's bookkeeping (timings, sizes, precision), for people.
    An unknown key is refused.
    """

    model_config = ConfigDict(extra="forbid")

    status: str = "succeeded"
    base_model: str
    export_dir: str | None = None
    export_hash: str
    config: dict[str, Any]
    adapter_dir: str = BEST_DIR
    metrics: EvalMetrics | None = None
    best_step: int | None = None
    initial_metrics: EvalMetrics | None = None
    final_metrics: EvalMetrics | None = None
    test_metrics: EvalMetrics | None = None
    initial_test_metrics: EvalMetrics | None = None
    baseline: Baseline | None = None
    baseline_adapter: str | None = None
    steps: int = 0
    total_steps: int | None = None
    epochs_completed: int | None = None
    stopped_early: bool = False
    resumed_from_step: list[int] = Field(default_factory=list)
    samples_seen: int | None = None
    train_seconds: float | None = None
    samples_per_second: float | None = None
    wall_seconds: float | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int = 0
    breeds: list[str] = Field(default_factory=list)
    mixed_precision: str | None = None
    dtype: str | None = None
    num_processes: int | None = None
    trainable_parameters: int | None = None
    lora_modules: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (nested metrics keep only their set keys)."""
        d = self.model_dump(mode="json")
        for key in ("metrics", "initial_metrics", "final_metrics", "test_metrics", "initial_test_metrics"):
            m = getattr(self, key)
            d[key] = None if m is None else m.to_dict()
        if self.baseline is not None:
            d["baseline"] = self.baseline.model_dump(mode="json", exclude_unset=True)
            for key in ("metrics", "test_metrics"):
                m = getattr(self.baseline, key)
                if m is not None:
                    d["baseline"][key] = m.to_dict()
        return d

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON (what ``result.json`` holds)."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def read(cls, run_dir: str | Path) -> RoundResult | None:
        """The result of the round in ``run_dir``, ``None`` while it is not finished.

        Raises:
            ResultFileError: ``result.json`` is not a round's result.
        """
        data = read_result(run_dir)
        if data is None:
            return None
        try:
            return cls.model_validate(data)
        except ValueError as exc:  # pydantic.ValidationError
            raise ResultFileError(f"{Path(run_dir) / RESULT_FILE} is not a round's result: {exc}") from None


__all__ = ["PER_PHOTO_KEYS", "Baseline", "BreedAccuracy", "EvalMetrics", "ResultFileError", "RoundResult"]
