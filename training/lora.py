"""One LoRA fine-tuning round of the stage-2 VLM (peft + accelerate), with evaluation by the
app's own candidate scoring, early stopping, best-adapter selection and crash-safe resume.

Run it::

    python -m training --export db/exports/E --base llava-hf/llava-1.5-7b-hf --out db/runs/R
    accelerate launch --num_processes 4 -m training --export db/exports/E \\
        --base llava-hf/llava-1.5-7b-hf --out db/runs/R --mixed-precision bf16

The second command runs the same round data-parallel on 4 GPUs (``accelerate config`` or flags
choose the processes; each process gets ``--batch-size`` photos per micro-batch). Device
placement, DDP wrapping, gradient accumulation and autocast all come from
``accelerate.Accelerator(mixed_precision=..., gradient_accumulation_steps=...)``.

What is trained (Hu et al. 2021, LoRA; peft ``LoraConfig``/``get_peft_model``): rank-``r``
updates ``W + (alpha / r) B A`` on the language model's ``q_proj``/``v_proj`` (regex
:data:`catreview.adapters.train_config.DEFAULT_TARGET_MODULES`; the vision tower matches nothing and stays
frozen), optionally a full trainable copy of the projector (``modules_to_save``). ``B`` starts
at zero, so the untrained adapter *is* the base model: the evaluation at step 0 measures the base
model ("no adapter").

The loss is the mean token cross-entropy of each row's answer (+ EOS), averaged over rows with
the row weights (1, or the class weights of ``balance="loss"``): each photo counts once whatever
the length of its breed's name, like the scorer's ``"mean"`` normalisation. Only the logits of
the answer positions are computed (``logits_to_keep``), so the vocabulary projection over the
~600 image + prompt positions is skipped.

Evaluation (every ``eval_every`` optimizer steps, at step 0 and at the end) scores the fixed
validation candidate lists (:func:`training.data.eval_items`) with
:meth:`catreview.models.vlm.postclassifier.VLMPostClassifier.score_candidates` -- the exact code the app predicts with
-- on the adapter being trained: balanced accuracy, accuracy, macro-F1 and per-breed accuracy
(:mod:`catreview.evaluate.calibration`; predicting ``"other"`` counts as wrong). ``val_loss`` is read off
the same scores: the mean over photos of the per-token NLL of the true breed's answer, i.e. the
training loss on the validation rows, with no extra forward pass. Every process evaluates the
whole validation split (identical numbers), so early-stopping decisions agree without
communication; only the main process writes files.

Gating data (:func:`catreview.adapters.versions.gate`). The best checkpoint is the best of several
validation evaluations, an optimistically biased number, so it is never what a new version is
gated on. The export's **test** split, which neither training nor model selection sees, is scored
with the same scorer exactly once per model: the base model (the untrained adapter at step 0,
``initial_test_metrics``), the active adapter when one is given (``baseline["test_metrics"]``)
and, after the last step, the selected best checkpoint (``test_metrics``). These metrics carry
the per-photo lists ``photos``/``truth``/``predicted`` for the gate's paired bootstrap, and
``loss`` (mean per-token NLL of the correct answer). They are not written to ``progress.jsonl``.

Files in ``run_dir`` (written by the main process):

* ``progress.jsonl``: one JSON object per line -- ``{"kind": "train", "step", "total_steps",
  "epoch", "loss", "lr", "samples", "elapsed"}`` every ``log_every`` steps and ``{"kind": "eval", "step",
  "val_loss", "val_balanced_accuracy", "val_accuracy", "val_macro_f1"}`` at each evaluation.
* ``checkpoint-last/``: adapter (current and best so far), optimizer, scheduler, RNG states and
  ``trainer_state.json``; written to a temporary folder and renamed into place (the previous one
  is kept as ``checkpoint-last.prev`` until the rename is done), so a kill at any moment leaves a
  complete checkpoint. A new round in the same ``run_dir`` resumes from it (same config and export
  required) and reproduces the uninterrupted round bit for bit on CPU: data order, prompts, the
  dropout RNG (CPU, CUDA and the accelerator device's own generator, e.g. MPS) and the thread
  count (recorded; float sums are split by thread) all continue where they stopped. Rounds run
  under :func:`pinned_numerics` (deterministic algorithms). On GPUs, bf16 autocast plus the few
  kernels without a deterministic version can still leave a resumed round slightly apart.
* ``best/``: the best adapter (highest validation balanced accuracy, ties -> lower val loss),
  loadable with ``PeftModel.from_pretrained`` / ``VLMProfile(adapter=...)``.
* ``result.json``: written last (atomically); its presence means the round finished. Besides the
  validation numbers (``metrics``: the best checkpoint, ``initial_metrics``: step 0) it holds the
  test-split numbers above (``test_metrics``, ``initial_test_metrics``, ``baseline.test_metrics``)
  and ``n_test``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catreview.adapters.runfolder import (  # the run folder's file names live in the light catreview.adapters.runfolder
    BEST_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    PROGRESS_FILE,
    RESULT_FILE,
    STATE_FILE,
    read_progress,
)
from catreview.adapters.train_config import PROJECTOR_MODULE, TrainConfig
from catreview.data.images import load_rgb
from catreview.errors import CatreviewError
from catreview.evaluate.calibration import balanced_accuracy, macro_f1, per_class_accuracy
from catreview.files import atomic_write_text, complete_dir, write_dir_atomically
from catreview.models.vlm import prompts
from training.data import Collator, EvalItem, ExportData, TrainDataset, eval_items, model_inputs, read_export, subsample

if TYPE_CHECKING:
    import torch


EventCallback = Callable[[dict[str, Any]], None]


class TrainingError(CatreviewError, RuntimeError):
    """A round that cannot run (bad export, model not found, checkpoint of another config)."""


# --------------------------------------------------------------------------------------------
# Small file helpers: atomic folders and files
# --------------------------------------------------------------------------------------------


class ProgressLog:
    """Append-only ``progress.jsonl`` writer (a no-op on non-main processes)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps after ``step`` (written after the checkpoint a resume starts from)
        and a torn last line.

        Raises:
            catreview.adapters.runfolder.ProgressFileError: a line before the last one is damaged.
        """
        if not self.enabled or not self.path.is_file():
            return
        keep = [ln for ln in read_progress(self.path) if ln.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def resolve_precision(cfg: TrainConfig) -> tuple[str, torch.dtype]:
    """``(accelerate mixed_precision, base weights dtype)`` for ``cfg`` on this machine.

    ``"auto"``: bf16 autocast + bf16 base weights on a CUDA GPU with bf16 support, otherwise no
    autocast and fp32 (CPU, also when ``ACCELERATE_USE_CPU=1`` keeps the round off the GPU).
    """
    import torch
    from accelerate.utils import parse_flag_from_env

    cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    dt = cfg.dtype
    if dt == "auto":
        dt = "bfloat16" if cuda else "float32"
    return mp, getattr(torch, dt)


def load_base_model(base_model: str | Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """``(processor, model)`` of a checkpoint, on ``device``, weights in ``dtype``.

    Raises:
        TrainingError: not found locally / in the cache (offline).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from catreview.models.vlm.postclassifier import _not_found_message

    try:
        processor = AutoProcessor.from_pretrained(str(base_model))
        model = AutoModelForImageTextToText.from_pretrained(str(base_model), dtype=dtype)
    except OSError as exc:
        raise TrainingError(_not_found_message(str(base_model))) from exc
    return processor, model.to(device)


def lora_config(cfg: TrainConfig):
    """The peft ``LoraConfig`` of ``cfg`` (rank, alpha, dropout, targets, optional projector)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules_arg(),
        modules_to_save=[PROJECTOR_MODULE] if cfg.train_projector else None,
        bias="none",
    )


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter (``get_peft_model`` modifies ``model`` in place).

    Raises:
        TrainingError: ``target_modules`` matches no module.
    """
    from peft import get_peft_model

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        return get_peft_model(model, lora_config(cfg))
    except ValueError as exc:
        raise TrainingError(f"LoRA target_modules {cfg.target_modules!r} do not fit this model: {exc}") from exc


def lora_module_names(model: Any) -> list[str]:
    """Names of the modules that carry LoRA weights (for the record and for checks)."""
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n})


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean over rows of the mean answer-token cross-entropy.

    Args:
        logits: ``(B, K, V)`` logits of the **last** ``K`` positions of the sequence (any float).
        labels: ``(B, L)`` int64 targets, ``-100`` where nothing is learned; ``L >= K``.
        weights: ``(B,)`` float row weights.

    Returns:
        ``(loss, per_row)``: scalar float32 loss and ``(B,)`` per-row mean NLL (nats/token).
        Rows without answer tokens get 0 and do not count.
    """
    import torch
    import torch.nn.functional as F

    k = logits.shape[1]
    targets = labels[:, labels.shape[1] - k + 1 :]  # (B, K-1): tokens predicted by logits[:, :-1]
    ce = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    counted = (targets != -100).float()
    n_tokens = counted.sum(dim=1)
    per_row = (ce * counted).sum(dim=1) / n_tokens.clamp(min=1)
    w = weights.float() * (n_tokens > 0).float()
    loss = (per_row * w).sum() / w.sum().clamp(min=torch.finfo(torch.float32).tiny)
    return loss, per_row


def batch_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``batch`` (from :class:`training.data.Collator`) and return :func:`answer_loss`.

    Only the logits from the position before the earliest answer token onwards are computed.
    """
    keep = batch["input_ids"].shape[1] - int(batch["answer_start"].min()) + 1
    out = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep)
    return answer_loss(out.logits, batch["labels"], batch["weights"])


# --------------------------------------------------------------------------------------------
# Evaluation with the app's scorer
# --------------------------------------------------------------------------------------------


def make_scorer(model: Any, processor: Any, base_model: str | Path, cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    """A :class:`catreview.models.vlm.postclassifier.VLMPostClassifier` that scores with an already loaded ``model``.

    The classifier's own loading is bypassed (the model is the adapter in training), its scoring
    code is used unchanged. ``model_version`` is the fixed string ``"training-eval"``.
    """
    from catreview.config import VLMProfile
    from catreview.models.vlm.postclassifier import VLMPostClassifier

    profile = VLMProfile(model=str(base_model), batch_size=cfg.eval_batch_size, score_normalisation=cfg.score_normalisation)
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
        :func:`classification_metrics` plus ``val_loss`` (mean per-token NLL of the correct
        answer, nats) and ``eval_seconds``.
    """
    from catreview.models.vlm.postclassifier import answer_token_ids, candidate_answer

    t0 = time.perf_counter()
    scorer.model.eval()
    truth, predicted, losses = [], [], []
    chunk = max(cfg.eval_batch_size, 1)
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        verdicts = scorer.score_candidates([load_rgb(it.image) for it in part], [list(it.candidates) for it in part])
        for it, v in zip(part, verdicts):
            score = v.scores[v.candidates.index(it.target)]
            if cfg.score_normalisation == "sum":
                prompt = prompts.verdict_prompt(scorer.processor, v.candidates)
                n = len(answer_token_ids(scorer.processor.tokenizer, prompt, candidate_answer(prompt, it.target), eos_id=scorer.end_of_turn_id))
                score /= n
            truth.append(it.target)
            predicted.append(v.label)
            losses.append(-score)
    metrics = classification_metrics(truth, predicted)
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
        model=str(base_model), adapter=Path(adapter_dir) if adapter_dir else None, device=device,
        batch_size=cfg.eval_batch_size, score_normalisation=cfg.score_normalisation,
    )
    scorer = VLMPostClassifier(profile, name="evaluate").load()
    try:
        return evaluate(scorer, items, cfg) if split == "validation" else evaluate_test(scorer, items, cfg)  # type: ignore[return-value]
    finally:
        scorer.unload()


# --------------------------------------------------------------------------------------------
# Round state and checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class RoundState:
    """Everything besides tensors needed to continue a round (``trainer_state.json``).

    Steps are optimizer steps; ``batch_in_epoch`` counts this process's micro-batches consumed
    in the current epoch; ``train_seconds`` excludes evaluation and checkpoint time.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    total_steps: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0
    best_step: int | None = None
    best_metrics: dict[str, Any] | None = None
    last_metrics: dict[str, Any] | None = None
    evals_since_best: int = 0
    initial_metrics: dict[str, Any] | None = None
    initial_test_metrics: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    stopped_early: bool = False
    resumed_from_step: list[int] = field(default_factory=list)
    num_threads: int | None = None


def _device_rng_module(device_type: str) -> Any:
    """``torch.<device_type>`` when it has its own default generator (mps, xpu, npu ...), else
    ``None`` (cpu, whose generator is ``torch.get_rng_state``; cuda is saved for every GPU)."""
    import torch

    if device_type in ("cpu", "cuda", "meta"):
        return None
    try:
        module = torch.get_device_module(device_type)
    except (RuntimeError, AttributeError):
        return None
    return module if hasattr(module, "get_rng_state") and hasattr(module, "set_rng_state") else None


def _rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every generator the round draws from: Python, NumPy, torch CPU, all CUDA GPUs and the
    accelerator ``device``'s own generator (dropout on an MPS/XPU/NPU device draws from it, not
    from the CPU one).

    Only plain containers, ``str``/``int``/``float``/``None`` and tensors (the NumPy key array as
    a list of ints), so ``torch.load(..., weights_only=True)`` reads the saved file back.
    """
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    module = _device_rng_module(device.type) if device is not None else None
    if module is not None:
        state["device"] = {"type": device.type, "state": module.get_rng_state()}
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`_rng_state`.

    Raises:
        TrainingError: the checkpoint holds a device generator this process cannot restore
            (resumed on another kind of device): dropout would not continue where it stopped.
    """
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "device" in state:
        kind = state["device"]["type"]
        module = _device_rng_module(kind)
        if module is None or not (hasattr(module, "is_available") and module.is_available()):
            raise TrainingError(f"the checkpoint was made on a {kind} device; resume it on one")
        module.set_rng_state(state["device"]["state"])


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """CPU copy of the adapter's weights (``peft.get_peft_model_state_dict``)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def save_adapter_weights(model: Any, weights: dict[str, torch.Tensor] | None, out_dir: Path) -> None:
    """Save ``model``'s adapter (``adapter_config.json`` + ``adapter_model.safetensors``) to
    ``out_dir``; with ``weights`` (a :func:`trainable_state` snapshot, same keys as the saved
    file), those weights replace the current ones in the file."""
    from safetensors.torch import save_file

    model.save_pretrained(str(out_dir))
    if weights is not None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_checkpoint(
    run_dir: Path, model: Any, best_weights: dict[str, torch.Tensor] | None, optimizer: Any, scheduler: Any,
    state: RoundState, cfg: TrainConfig, export_hash: str, process_index: int, is_main: bool,
    device: torch.device | None = None,
) -> None:
    """Write ``run_dir/checkpoint-last`` atomically (main process; each process's RNG state is
    written by that process into ``rng-<i>.pt`` of the same folder *before* the rename, so with
    several processes call :func:`save_rng` first and synchronise)."""
    import torch

    def fill(tmp: Path) -> None:
        save_adapter_weights(model, None, tmp / "adapter")
        if best_weights is not None:
            save_adapter_weights(model, best_weights, tmp / "best")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for f in run_dir.glob(".rng-*.pt"):
            shutil.move(str(f), tmp / f.name.lstrip("."))
        torch.save(_rng_state(device), tmp / f"rng-{process_index}.pt")
        meta = {"state": asdict(state), "config": cfg.to_dict(), "export_hash": export_hash}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    if is_main:
        write_dir_atomically(run_dir / CHECKPOINT_DIR, fill)


def save_rng(run_dir: Path, process_index: int, device: torch.device | None = None) -> None:
    """Non-main processes: park this process's RNG state for the next checkpoint."""
    import torch

    torch.save(_rng_state(device), run_dir / f".rng-{process_index}.pt")


def load_checkpoint(
    ckpt: Path, model: Any, optimizer: Any, scheduler: Any, cfg: TrainConfig, export_hash: str, process_index: int,
) -> tuple[RoundState, dict[str, torch.Tensor] | None]:
    """Restore a checkpoint into the objects; returns ``(state, best weights or None)``.

    Raises:
        TrainingError: the checkpoint was made with another config or export.
    """
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    try:  # fields added since the checkpoint was written compare as their defaults
        saved = TrainConfig.from_dict(meta["config"]).to_dict()
    except (ValueError, TypeError):
        saved = dict(meta["config"])
    now = cfg.to_dict()
    saved.pop("extra", None), now.pop("extra", None)
    if saved != now or meta["export_hash"] != export_hash:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise TrainingError(
            f"{ckpt} belongs to a round with another config ({diff}) or export "
            f"({meta['export_hash'][:12]} vs {export_hash[:12]}); use a new run folder"
        )
    weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    best = load_file(str(ckpt / "best" / "adapter_model.safetensors")) if (ckpt / "best").is_dir() else None
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng_file = ckpt / f"rng-{process_index}.pt"
    if rng_file.is_file():
        # Plain containers + tensors only (see _rng_state), so the safe loader reads it.
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return RoundState(**meta["state"]), best


# --------------------------------------------------------------------------------------------
# The round
# --------------------------------------------------------------------------------------------


def _is_better(metrics: dict[str, Any], best: dict[str, Any] | None, min_delta: float) -> bool:
    """Higher balanced accuracy by more than ``min_delta``; on an exact tie, lower val loss."""
    if best is None:
        return True
    if metrics["balanced_accuracy"] > best["balanced_accuracy"] + min_delta:
        return True
    return metrics["balanced_accuracy"] == best["balanced_accuracy"] and metrics["val_loss"] < best["val_loss"]


def _eval_row(step: int, m: dict[str, Any], elapsed: float) -> dict[str, Any]:
    return {
        "kind": "eval", "step": step, "val_loss": m["val_loss"], "val_balanced_accuracy": m["balanced_accuracy"],
        "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"], "elapsed": elapsed,
    }


def _make_sampler(ds: TrainDataset, cfg: TrainConfig, generator: Any):
    from torch.utils.data import RandomSampler, WeightedRandomSampler

    if cfg.balance == "sampler":
        return WeightedRandomSampler(ds.sampling_weights(), num_samples=len(ds), replacement=True, generator=generator)
    return RandomSampler(ds, generator=generator)


def train_round(
    export_dir: str | Path,
    base_model: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    baseline_adapter: str | Path | None = None,
    resume: bool = True,
    on_event: EventCallback | None = None,
) -> dict[str, Any]:
    """Run (or resume) one LoRA round; see the module docstring for files and semantics.

    Args:
        export_dir: curated export folder (:mod:`training.data` layout).
        base_model: hub id or folder of the VLM (``AutoModelForImageTextToText``).
        run_dir: output folder (created); holds progress, checkpoints, ``best/``, ``result.json``.
        cfg: hyper-parameters (default :class:`TrainConfig`).
        baseline_adapter: the currently active adapter, evaluated once on the same validation
            items and once on the test items, so gating compares like with like
            (``result["baseline"]``: ``adapter``, ``metrics``, ``test_metrics``).
        resume: continue from ``run_dir/checkpoint-last`` when present.
        on_event: called with every progress row (main process), e.g. for a progress bar.

    Returns:
        The ``result.json`` content: ``metrics`` (best validation metrics), ``initial_metrics``
        (step 0 = base model), ``test_metrics`` (the best checkpoint on the test split, scored
        once after training), ``initial_test_metrics`` (the base model on the test split),
        ``baseline``, ``n_test``, ``best_step``, ``steps``, ``samples_per_second`` (training
        only), ``config``, ``export_hash``, ``adapter_dir`` ... Test metrics are ``None`` when
        the export has no test photos (the gate then refuses to decide).

    Raises:
        TrainingError, training.data.ExportFormatError: unusable inputs.
    """
    cfg = cfg or TrainConfig()
    with pinned_numerics(cfg.deterministic):
        return _train_round(
            export_dir, base_model, run_dir, cfg, baseline_adapter=baseline_adapter, resume=resume, on_event=on_event
        )


def _train_round(
    export_dir: str | Path,
    base_model: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig,
    *,
    baseline_adapter: str | Path | None,
    resume: bool,
    on_event: EventCallback | None,
) -> dict[str, Any]:
    """:func:`train_round` inside :func:`pinned_numerics`."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mixed, dtype = resolve_precision(cfg)
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=cfg.grad_accum)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise TrainingError(
            f"launched as {launched} processes but accelerate runs {accelerator.num_processes}: every process would "
            "write the same files. On CPUs set ACCELERATE_USE_CPU=1 (gloo backend); on GPUs check the accelerate config."
        )
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    log = ProgressLog(run_dir / PROGRESS_FILE, is_main)

    def emit(row: dict[str, Any]) -> None:
        log.write(row)
        if on_event is not None and is_main:
            on_event(row)

    data: ExportData = read_export(export_dir)
    train_examples = subsample(data.train, cfg.max_train_examples, cfg.seed)
    items = eval_items(subsample(data.validation, cfg.max_val_examples, cfg.seed), data.breeds, cfg)
    if not items:
        raise TrainingError(f"export {export_dir} has no validation photos: a round needs them to select its best checkpoint")
    # Scored once per model, never for selection: the gate's held-out numbers.
    test_items = eval_items(data.test, data.breeds, cfg)
    if is_main:
        cfg.save(run_dir / CONFIG_FILE)

    ckpt = complete_dir(run_dir / CHECKPOINT_DIR) if resume else None
    # Same thread count as the round being resumed (float sums are split by thread), whatever
    # this process's default is; a fresh round records the count it uses.
    threads = cfg.num_threads or _saved_threads(ckpt) or torch.get_num_threads()
    torch.set_num_threads(threads)
    baseline = _saved_baseline(ckpt, baseline_adapter)
    if baseline_adapter is not None and baseline is None:
        baseline = _evaluate_baseline(Path(baseline_adapter), items, test_items, cfg, base_model, accelerator.device, dtype)
    set_seed(cfg.seed)
    processor, model = load_base_model(base_model, dtype, accelerator.device)
    model = add_lora(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]

    ds = TrainDataset(train_examples, data.breeds, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    # The loader gets its own generator too: creating an iterator draws a worker base seed, which
    # must not come from the global RNG (dropout's), or a resumed round's dropout masks would shift.
    loader = DataLoader(
        ds, batch_size=cfg.batch_size, sampler=_make_sampler(ds, cfg, generator),
        collate_fn=Collator(processor), num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
    )
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    # Stepped by hand once per optimizer step (not prepared), so its length is in optimizer steps.
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)

    raw = accelerator.unwrap_model(model)
    scorer = make_scorer(raw, processor, base_model, cfg, accelerator.device, dtype)
    state = RoundState(total_steps=total, baseline=baseline, num_threads=threads)
    best_weights: dict[str, torch.Tensor] | None = None
    if ckpt is not None:
        state, best_weights = load_checkpoint(ckpt, raw, optimizer, scheduler, cfg, data.content_hash, rank)
        state.baseline, state.num_threads = baseline, threads
        state.resumed_from_step.append(state.step)
        log.truncate_after(state.step)
        emit({"kind": "resume", "step": state.step, "num_threads": threads, "elapsed": 0.0})
    else:
        if is_main and (run_dir / PROGRESS_FILE).exists():
            (run_dir / PROGRESS_FILE).unlink()
        state.initial_metrics = evaluate(scorer, items, cfg)
        state.initial_test_metrics = evaluate_test(scorer, test_items, cfg)  # the base model (B = 0)
        emit(_eval_row(0, state.initial_metrics, time.perf_counter() - t_start))

    def checkpoint() -> None:
        if not is_main:
            save_rng(run_dir, rank, accelerator.device)
        accelerator.wait_for_everyone()
        save_checkpoint(
            run_dir, raw, best_weights, optimizer, scheduler, state, cfg, data.content_hash, rank, is_main, accelerator.device
        )
        accelerator.wait_for_everyone()

    def run_eval() -> None:
        nonlocal best_weights
        m = evaluate(scorer, items, cfg)
        m["step"] = state.step
        state.last_metrics = m
        emit(_eval_row(state.step, m, time.perf_counter() - t_start))
        if _is_better(m, state.best_metrics, cfg.min_delta):
            state.best_metrics, state.best_step, state.evals_since_best = m, state.step, 0
            best_weights = trainable_state(raw)
        else:
            state.evals_since_best += 1
            if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
                state.stopped_early = True
        model.train()

    model.train()
    done = state.step >= total or state.stopped_early
    while not done:
        ds.select_epoch(state.epoch)
        generator.manual_seed(cfg.seed * 1_000_003 + state.epoch)
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        step_losses: list[torch.Tensor] = []
        t_step = time.perf_counter()
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                loss, _ = batch_loss(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            state.samples_seen += batch["input_ids"].shape[0] * accelerator.num_processes
            step_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            state.train_seconds += time.perf_counter() - t_step
            mean_loss = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean").item()
            step_losses = []
            if state.step % cfg.log_every == 0 or state.step == total:
                emit({
                    "kind": "train", "step": state.step, "total_steps": total, "epoch": state.epoch, "loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0], "samples": state.samples_seen, "elapsed": time.perf_counter() - t_start,
                })
            evaluated = state.step % cfg.eval_every == 0 or state.step == total
            if evaluated:
                run_eval()
            done = state.step >= total or state.stopped_early
            if evaluated or done or state.step % cfg.checkpoint_every == 0:
                checkpoint()
            if done:
                break
            t_step = time.perf_counter()
        else:
            state.epoch += 1
            state.batch_in_epoch = 0

    if state.last_metrics is None or state.last_metrics.get("step") != state.step:
        run_eval()  # a resumed round that had already finished its steps
        checkpoint()
    test_metrics = _evaluate_selected_on_test(scorer, raw, best_weights, state, test_items, cfg)
    result = _finish(
        run_dir, raw, best_weights, state, cfg, data, base_model, baseline_adapter, accelerator, mixed, dtype, t_start,
        test_metrics=test_metrics, n_test=len(test_items),
    )
    accelerator.wait_for_everyone()
    return result


def _saved_baseline(ckpt: Path | None, adapter: str | Path | None) -> dict[str, Any] | None:
    """The baseline stored in a checkpoint when it was measured for the same adapter folder
    (a resumed round does not evaluate it again), else ``None``."""
    if ckpt is None or adapter is None:
        return None
    saved = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))["state"].get("baseline")
    # A checkpoint written before test-split gating has no "test_metrics": evaluate it again.
    if saved and "test_metrics" in saved and Path(saved["adapter"]).resolve() == Path(adapter).resolve():
        return saved
    return None


def _saved_threads(ckpt: Path | None) -> int | None:
    """The thread count recorded in a checkpoint (``None``: none, or written before it was recorded)."""
    if ckpt is None:
        return None
    try:
        value = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))["state"].get("num_threads")
    except (OSError, ValueError, KeyError):
        return None
    return int(value) if isinstance(value, int) and value >= 1 else None


@contextmanager
def pinned_numerics(deterministic: bool = True) -> Iterator[None]:
    """Run a round with reproducible numerics, then give the caller its settings back.

    With ``deterministic``: ``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN
    deterministic (no benchmarking) and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already set;
    cuBLAS reads it when the first handle is made). The round itself sets the thread count
    (:attr:`TrainConfig.num_threads`). On exit the thread count, the determinism flags and the
    environment variable are what they were, so a round run inside another program (the tests,
    a notebook) does not change that program's numerics.
    """
    import torch

    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn
    cudnn_flags = (cudnn.deterministic, cudnn.benchmark)
    set_env = deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        if deterministic:
            if set_env:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
            torch.use_deterministic_algorithms(True, warn_only=True)
            cudnn.deterministic, cudnn.benchmark = True, False
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        cudnn.deterministic, cudnn.benchmark = cudnn_flags
        if set_env:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _evaluate_baseline(
    adapter: Path, items: Sequence[EvalItem], test_items: Sequence[EvalItem], cfg: TrainConfig, base_model: str | Path,
    device: torch.device, dtype: torch.dtype,
) -> dict[str, Any]:
    """Metrics of the active adapter on this round's validation items and (once, for the gate)
    its test items, on a model of its own that is freed afterwards. (Not on the training model:
    ``unload()`` after ``PeftModel.from_pretrained`` keeps a ``modules_to_save`` projector copy in
    the base model.)"""
    import gc

    import torch
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise TrainingError(f"baseline adapter {adapter} has no adapter_config.json")
    processor, model = load_base_model(base_model, dtype, device)
    wrapped = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    scorer = make_scorer(wrapped, processor, base_model, cfg, device, dtype)
    metrics = evaluate(scorer, items, cfg)
    test_metrics = evaluate_test(scorer, test_items, cfg)
    del wrapped, model, scorer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"adapter": str(adapter), "metrics": metrics, "test_metrics": test_metrics}


def _evaluate_selected_on_test(
    scorer: Any, raw: Any, best_weights: dict[str, torch.Tensor] | None, state: RoundState,
    test_items: Sequence[EvalItem], cfg: TrainConfig,
) -> dict[str, Any] | None:
    """The gate's held-out numbers, scored after the last step: the selected (best) checkpoint on
    the test items, once. Its weights are loaded into the training model (which is not trained
    any further; ``checkpoint-last`` already holds the last weights). Also scores the base model
    when a checkpoint from before test-split gating left ``state.initial_test_metrics`` unset
    (adapter disabled: ``B = 0`` is the identity).
    """
    from peft import set_peft_model_state_dict

    if not test_items:
        return None
    if state.initial_test_metrics is None:
        with raw.disable_adapter():
            state.initial_test_metrics = evaluate_test(scorer, test_items, cfg)
    if best_weights is not None:
        set_peft_model_state_dict(raw, best_weights)
    return evaluate_test(scorer, test_items, cfg)


def _finish(
    run_dir: Path, raw: Any, best_weights: dict[str, torch.Tensor] | None, state: RoundState, cfg: TrainConfig,
    data: ExportData, base_model: str | Path, baseline_adapter: str | Path | None, accelerator: Any,
    mixed: str, dtype: torch.dtype, t_start: float, *, test_metrics: dict[str, Any] | None, n_test: int,
) -> dict[str, Any]:
    """Write ``best/`` and then ``result.json`` (main process); return the result."""
    result = {
        "status": "succeeded",
        "base_model": str(base_model),
        "export_dir": str(data.root),
        "export_hash": data.content_hash,
        "config": cfg.to_dict(),
        "adapter_dir": BEST_DIR,
        "metrics": state.best_metrics,
        "best_step": state.best_step,
        "initial_metrics": state.initial_metrics,
        "final_metrics": state.last_metrics,
        "test_metrics": test_metrics,
        "initial_test_metrics": state.initial_test_metrics,
        "baseline": state.baseline,
        "baseline_adapter": str(baseline_adapter) if baseline_adapter else None,
        "steps": state.step,
        "total_steps": state.total_steps,
        "epochs_completed": state.epoch,
        "stopped_early": state.stopped_early,
        "resumed_from_step": state.resumed_from_step,
        "samples_seen": state.samples_seen,
        "train_seconds": state.train_seconds,
        "samples_per_second": state.samples_seen / state.train_seconds if state.train_seconds else None,
        "wall_seconds": time.perf_counter() - t_start,
        "n_train": len(data.train),
        "n_val": state.best_metrics["n"] if state.best_metrics else 0,
        "n_test": n_test,
        "breeds": data.breeds,
        "mixed_precision": mixed,
        "dtype": str(dtype).removeprefix("torch."),
        "num_processes": accelerator.num_processes,
        "trainable_parameters": sum(p.numel() for p in raw.parameters() if p.requires_grad),
        "lora_modules": len(lora_module_names(raw)),
    }
    if accelerator.is_main_process:
        write_dir_atomically(run_dir / BEST_DIR, lambda d: save_adapter_weights(raw, best_weights, d))
        atomic_write_text(run_dir / RESULT_FILE, json.dumps(result, indent=1))
    return result


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    """``result.json`` of a finished round, or ``None`` while it is not finished."""
    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
