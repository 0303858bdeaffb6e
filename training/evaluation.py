"""Evaluation of a round's adapter with the app's own scorer.

Validation items (:func:`training.data.eval_items`) are scored with
:meth:`catreview.models.vlm.postclassifier.VLMPostClassifier.score_candidates` -- the exact code the
app predicts with -- on the adapter being trained: balanced accuracy, accuracy, macro-F1 and
per-breed accuracy (:mod:`catreview.metrics`; predicting ``"other"`` counts as wrong), and the
**candidate accuracy**: on the photos whose breed is among their candidates, how often it scores
highest among the breed candidates (``"other"`` left out; chance ``1 / n_candidates``, the 3-way
task of ``../shared/NOTES.md`` and of the evaluation report's VLM rows). ``val_loss``
is read off the same scores: the mean over photos of the per-token NLL of the true breed's answer,
i.e. the training loss on the validation rows, with no extra forward pass. The test split is
scored the same way, with the per-photo lists the gate's paired bootstrap needs
(:func:`evaluate_test`; :class:`catreview.adapters.results.EvalMetrics` is the typed form).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catreview.adapters.train_config import TrainConfig
from catreview.data.images import load_rgb
from catreview.metrics import balanced_accuracy, macro_f1, per_class_accuracy
from catreview.models.vlm import prompts
from training.data import EvalItem, eval_items, read_export, subsample
from training.errors import TrainingError

if TYPE_CHECKING:
    import torch


def make_scorer(
    model: Any, processor: Any, base_model: str | Path, cfg: TrainConfig, device: torch.device, dtype: torch.dtype
):
    """A :class:`catreview.models.vlm.postclassifier.VLMPostClassifier` that scores with an already loaded ``model``.

    The classifier's own loading is bypassed (the model is the adapter in training), its scoring
    code is used unchanged. ``model_version`` is the fixed string ``"training-eval"``.
    """
    from catreview.config import VLMProfile
    from catreview.models.vlm.postclassifier import VLMPostClassifier

    profile = VLMProfile(
        model=str(base_model), batch_size=cfg.eval_batch_size, score_normalisation=cfg.score_normalisation
    )
    # no checkpoint hashing for in-training evaluations
    return VLMPostClassifier.from_loaded(
        profile, processor, model, device=device, dtype=dtype, model_version="training-eval", name="training-eval"
    )


def classification_metrics(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Balanced accuracy, accuracy, macro-F1 and per-class ("per-breed") accuracy.

    ``truth`` holds each photo's correct answer among its candidates: its breed, or ``"other"``
    when the candidate list (stage 1's top-k) missed the breed -- then ``"other"`` is a class of
    its own. Classes are the values present in ``truth``; any other prediction is simply wrong.
    """
    classes = sorted(set(truth))
    per = per_class_accuracy(truth, predicted, labels=classes)
    return {
        "n": len(truth),
        "accuracy": sum(t == p for t, p in zip(truth, predicted)) / len(truth),
        "balanced_accuracy": balanced_accuracy(truth, predicted, labels=classes),
        "macro_f1": macro_f1(truth, predicted, labels=classes),
        "per_breed": {str(b): {"correct": c, "n": n, "accuracy": a} for b, (c, n, a) in per.items()},
    }


def evaluate(scorer: Any, items: Sequence[EvalItem], cfg: TrainConfig, *, per_photo: bool = False) -> dict[str, Any]:
    """Score ``items`` with ``scorer`` (its model is put in eval mode and left there).

    Args:
        per_photo: also return, in item order, ``photos`` (file names), ``truth`` (each photo's
            correct answer) and ``predicted`` (the scorer's label): what the gate's paired
            bootstrap resamples.

    Returns:
        :func:`classification_metrics` plus ``candidate_accuracy`` (see the module docstring;
        ``None`` when no photo's breed is among its candidates), ``val_loss`` (mean per-token NLL
        of the correct answer, nats) and ``eval_seconds``.
    """
    from catreview.models.vlm.scoring import answer_token_ids, candidate_answer

    t0 = time.perf_counter()
    scorer.model.eval()
    truth, predicted, losses = [], [], []
    among: list[bool] = []  # per photo whose target is a breed: ranked first among the breeds
    chunk = max(cfg.eval_batch_size, 1)
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        verdicts = scorer.score_candidates([load_rgb(it.image) for it in part], [list(it.candidates) for it in part])
        for it, v in zip(part, verdicts):
            score = v.scores[v.candidates.index(it.target)]
            if cfg.score_normalisation == "sum":
                prompt = prompts.verdict_prompt(scorer.processor, v.candidates)
                n = len(
                    answer_token_ids(
                        scorer.processor.tokenizer,
                        prompt,
                        candidate_answer(prompt, it.target),
                        eos_id=scorer.end_of_turn_id,
                    )
                )
                score /= n
            truth.append(it.target)
            predicted.append(v.label)
            losses.append(-score)
            if it.target != prompts.OTHER_LABEL:
                breeds = [(s, c) for s, c in zip(v.scores, v.candidates) if c != prompts.OTHER_LABEL]
                among.append(max(breeds)[1] == it.target)
    metrics = classification_metrics(truth, predicted)
    metrics["candidate_accuracy"] = sum(among) / len(among) if among else None
    metrics["val_loss"] = float(sum(losses) / len(losses))
    metrics["eval_seconds"] = time.perf_counter() - t0
    if per_photo:
        metrics.update(photos=[it.image.name for it in items], truth=truth, predicted=predicted)
    return metrics


def evaluate_test(scorer: Any, items: Sequence[EvalItem], cfg: TrainConfig) -> dict[str, Any] | None:
    """One model's gating metrics on the test ``items`` (:func:`evaluate` with ``per_photo``,
    ``val_loss`` renamed ``loss``); ``None`` when there are no test photos."""
    if not items:
        return None
    m = evaluate(scorer, items, cfg, per_photo=True)
    m["loss"] = m.pop("val_loss")
    return m


def evaluate_adapter(
    base_model: str | Path,
    adapter_dir: str | Path | None,
    export_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    device: str = "auto",
    split: str = "validation",
) -> dict[str, Any]:
    """Metrics of ``base_model`` + ``adapter_dir`` (``None`` = no adapter) on an export's
    ``split``, with the candidate lists a round with ``cfg`` uses: ``"validation"``
    (:func:`evaluate`, the round's selection numbers) or ``"test"`` (:func:`evaluate_test`, the
    gate's numbers, with per-photo lists).

    Loads the model through the app's path (:class:`catreview.models.vlm.postclassifier.VLMPostClassifier` with
    ``VLMProfile(adapter=...)``), so the numbers are what the app would predict.
    """
    from catreview.config import VLMProfile
    from catreview.models.vlm.postclassifier import VLMPostClassifier

    cfg = cfg or TrainConfig()
    data = read_export(export_dir)
    if split == "validation":
        items = eval_items(subsample(data.validation, cfg.max_val_examples, cfg.seed), data.breeds, cfg)
    elif split == "test":
        items = eval_items(data.test, data.breeds, cfg)
    else:
        raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
    if not items:
        raise TrainingError(f"export {export_dir} has no {split} photos")
    profile = VLMProfile(
        model=str(base_model),
        adapter=Path(adapter_dir) if adapter_dir else None,
        device=device,
        batch_size=cfg.eval_batch_size,
        score_normalisation=cfg.score_normalisation,
    )
    scorer = VLMPostClassifier(profile, name="evaluate").load()
    try:
        return evaluate(scorer, items, cfg) if split == "validation" else evaluate_test(scorer, items, cfg)  # type: ignore[return-value]
    finally:
        scorer.unload()


__all__ = ["classification_metrics", "evaluate", "evaluate_adapter", "evaluate_test", "make_scorer"]
