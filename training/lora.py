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

The pieces are recipe modules of their own: :mod:`training.model` (precision, base model,
LoRA), :mod:`training.loss`, :mod:`training.evaluation` (the app's scorer), :mod:`training.checkpoint`
(state, RNGs, save/resume), :mod:`training.progress` and :mod:`training.numerics`; this module is
the loop. Every process evaluates the whole validation split (identical numbers), so
early-stopping decisions agree without communication; only the main process writes files.

Gating data (:func:`catreview.adapters.gate.gate`). The best checkpoint is the best of several
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
  "val_loss", "val_balanced_accuracy", "val_accuracy", "val_macro_f1", "val_candidate_accuracy"}`` at
  each evaluation; FastVLM rounds add ``{"kind": "tower", "cached", "standardized", ...}`` before
  the first step and ``{"kind": "tower", "cache_hits", "cache_misses"}`` (photos served from /
  computed by the frozen tower's output cache, training and evaluation together) at the end.
* ``checkpoint-last/``: adapter (current and best so far), optimizer, scheduler, RNG states and
  ``trainer_state.json``; written to a temporary folder and renamed into place (the previous one
  is kept as ``checkpoint-last.prev`` until the rename is done), so a kill at any moment leaves a
  complete checkpoint. A new round in the same ``run_dir`` resumes from it (same config and export
  required) and reproduces the uninterrupted round bit for bit on CPU: data order, prompts, the
  dropout RNG (CPU, CUDA and the accelerator device's own generator, e.g. MPS) and the thread
  count (recorded; float sums are split by thread) all continue where they stopped. Rounds run
  under :func:`training.numerics.pinned_numerics` (deterministic algorithms). On GPUs, bf16 autocast plus the few
  kernels without a deterministic version can still leave a resumed round slightly apart.
* ``best/``: the best adapter (highest validation balanced accuracy, ties -> lower val loss),
  loadable with ``PeftModel.from_pretrained`` / ``VLMProfile(adapter=...)``.
* ``result.json``: written last (atomically); its presence means the round finished
  (:class:`catreview.adapters.results.RoundResult`, the typed contract the app reads). Besides the
  validation numbers (``metrics``: the best checkpoint, ``initial_metrics``: step 0) it holds the
  test-split numbers above (``test_metrics``, ``initial_test_metrics``, ``baseline.test_metrics``)
  and ``n_test``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catreview.adapters.results import RoundResult
from catreview.adapters.runfolder import BEST_DIR, CHECKPOINT_DIR, CONFIG_FILE, PROGRESS_FILE, RESULT_FILE
from catreview.adapters.train_config import TrainConfig
from catreview.files import atomic_write_text, complete_dir, write_dir_atomically
from training.checkpoint import (
    RoundState,
    load_checkpoint,
    save_adapter_weights,
    save_checkpoint,
    save_rng,
    saved_baseline,
    saved_threads,
    trainable_state,
)
from training.data import Collator, EvalItem, ExportData, TrainDataset, eval_items, read_export, subsample
from training.errors import TrainingError
from training.evaluation import evaluate, evaluate_test, make_scorer
from training.loss import batch_loss
from training.model import add_lora, load_base_model, lora_module_names, resolve_precision
from training.numerics import pinned_numerics
from training.progress import ProgressLog
from training.tower import (
    Architecture,
    ProjectorStandardization,
    TowerFeatureCache,
    active_module,
    architecture,
    channel_stats,
    keep_towers_in_eval,
    projector_linear_key,
    set_tower_trainable,
    tower_features,
    wants_cache,
    wants_standardization,
)

if TYPE_CHECKING:
    import torch


EventCallback = Callable[[dict[str, Any]], None]


def _is_better(metrics: dict[str, Any], best: dict[str, Any] | None, min_delta: float) -> bool:
    """Higher balanced accuracy by more than ``min_delta``; on an exact tie, lower val loss."""
    if best is None:
        return True
    if metrics["balanced_accuracy"] > best["balanced_accuracy"] + min_delta:
        return True
    return metrics["balanced_accuracy"] == best["balanced_accuracy"] and metrics["val_loss"] < best["val_loss"]


def _eval_row(step: int, m: dict[str, Any], elapsed: float) -> dict[str, Any]:
    return {
        "kind": "eval",
        "step": step,
        "val_loss": m["val_loss"],
        "val_balanced_accuracy": m["balanced_accuracy"],
        "val_accuracy": m["accuracy"],
        "val_macro_f1": m["macro_f1"],
        "val_candidate_accuracy": m.get("candidate_accuracy"),
        "elapsed": elapsed,
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
    """:func:`train_round` inside :func:`training.numerics.pinned_numerics`."""
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
    if cfg.unfreeze_tower_last_epoch and accelerator.num_processes > 1:
        # DDP registers only the parameters that require grad when the model is wrapped; the
        # tower copy is frozen then, so its last-epoch gradients would not be averaged.
        raise TrainingError("unfreeze_tower_last_epoch runs in one process only (not data-parallel yet)")
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
        raise TrainingError(
            f"export {export_dir} has no validation photos: a round needs them to select its best checkpoint"
        )
    # Scored once per model, never for selection: the gate's held-out numbers.
    test_items = eval_items(data.test, data.breeds, cfg)
    if is_main:
        cfg.save(run_dir / CONFIG_FILE)

    ckpt = complete_dir(run_dir / CHECKPOINT_DIR) if resume else None
    # Same thread count as the round being resumed (float sums are split by thread), whatever
    # this process's default is; a fresh round records the count it uses.
    threads = cfg.num_threads or saved_threads(ckpt) or torch.get_num_threads()
    torch.set_num_threads(threads)
    baseline = saved_baseline(ckpt, baseline_adapter)
    if baseline_adapter is not None and baseline is None:
        baseline = _evaluate_baseline(
            Path(baseline_adapter), items, test_items, cfg, base_model, accelerator.device, dtype
        )
    set_seed(cfg.seed)
    processor, model = load_base_model(base_model, dtype, accelerator.device)
    model = add_lora(model, cfg)
    arch = architecture(model)
    tower = _RoundTower(model, arch, cfg)
    tower_row = tower.prepare(processor, [e.image for e in train_examples], accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad] + tower.frozen_trainable

    ds = TrainDataset(train_examples, data.breeds, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    # The loader gets its own generator too: creating an iterator draws a worker base seed, which
    # must not come from the global RNG (dropout's), or a resumed round's dropout masks would shift.
    loader = DataLoader(
        ds,
        batch_size=cfg.batch_size,
        sampler=_make_sampler(ds, cfg, generator),
        collate_fn=Collator(processor),
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
    )
    groups = _param_groups(model, arch, cfg)
    if tower.frozen_trainable:  # the tower copy learns at lr * tower_lr_scale (same schedule)
        groups.append({"params": tower.frozen_trainable, "lr": cfg.lr * cfg.tower_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    if tower_row is not None:
        emit({**tower_row, "step": state.step, "elapsed": time.perf_counter() - t_start})

    def checkpoint() -> None:
        if not is_main:
            save_rng(run_dir, rank, accelerator.device)
        accelerator.wait_for_everyone()
        save_checkpoint(
            run_dir,
            raw,
            best_weights,
            optimizer,
            scheduler,
            state,
            cfg,
            data.content_hash,
            rank,
            is_main,
            accelerator.device,
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
        tower.train_mode(model)

    tower.train_mode(model)
    focal_gamma = cfg.focal_gamma if cfg.loss == "focal" else None
    tower_grad_norm = 0.0
    last_epoch = (total - 1) // max(steps_per_epoch, 1)  # the epoch of the last optimizer step
    done = state.step >= total or state.stopped_early
    while not done:
        if cfg.unfreeze_tower_last_epoch and state.epoch >= last_epoch:
            tower.unfreeze()
        ds.select_epoch(state.epoch)
        generator.manual_seed(cfg.seed * 1_000_003 + state.epoch)
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        step_losses: list[torch.Tensor] = []
        t_step = time.perf_counter()
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                loss, _ = batch_loss(model, batch, focal_gamma=focal_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.unfreeze_tower_last_epoch:
                    tower_grad_norm = tower.grad_norm()
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
                row = {
                    "kind": "train",
                    "step": state.step,
                    "total_steps": total,
                    "epoch": state.epoch,
                    "loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "samples": state.samples_seen,
                    "elapsed": time.perf_counter() - t_start,
                }
                if cfg.unfreeze_tower_last_epoch:  # L2 norm of the tower copy's gradient (0: none)
                    row.update(tower_trainable=tower.unfrozen, tower_grad_norm=tower_grad_norm)
                emit(row)
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
    if tower.cache is not None:  # each photo through the frozen tower once: misses = distinct photos
        emit(
            {
                "kind": "tower",
                "step": state.step,
                "cache_hits": tower.cache.hits,
                "cache_misses": tower.cache.misses,
                "elapsed": time.perf_counter() - t_start,
            }
        )
    result = _finish(
        run_dir,
        raw,
        tower.saved_weights(raw, best_weights),
        state,
        cfg,
        data,
        base_model,
        baseline_adapter,
        accelerator,
        mixed,
        dtype,
        t_start,
        test_metrics=test_metrics,
        n_test=len(test_items),
    )
    accelerator.wait_for_everyone()
    return result


def _param_groups(model: Any, arch: Architecture, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: the LoRA weights at ``cfg.lr``, then
    (when ``cfg.projector_lr`` is set and the projector is trained) the projector copy at
    ``cfg.projector_lr``; one group when both rates are the same."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.projector_lr is None or not cfg.train_projector:
        return [{"params": [p for _, p in named]}]
    marker = f".{arch.projector}."
    projector = [p for n, p in named if marker in f".{n}"]
    rest = [p for n, p in named if marker not in f".{n}"]
    if not projector:
        raise TrainingError(f"projector_lr is set but the model has no trainable {arch.projector!r}")
    return [{"params": rest}, {"params": projector, "lr": cfg.projector_lr}]


class _RoundTower:
    """The vision tower's part in one round (:mod:`training.tower`): eval mode while training,
    the output cache, the projector's feature standardisation, the last-epoch unfreezing."""

    def __init__(self, model: Any, arch: Architecture, cfg: TrainConfig) -> None:
        self.arch = arch
        self.cfg = cfg
        self.cache: TowerFeatureCache | None = None
        self.standardization: ProjectorStandardization | None = None
        self.key_prefix = ""
        self.unfrozen = False
        self.model = model
        #: the tower copy's parameters, given to the optimizer from the start (no gradient
        #: before the last epoch, so AdamW leaves them alone until then)
        self.frozen_trainable: list[Any] = (
            list(active_module(model, arch.vision_tower).parameters()) if cfg.unfreeze_tower_last_epoch else []
        )

    def prepare(self, processor: Any, train_images: Sequence[Path], device: Any) -> dict[str, Any] | None:
        """Install the cache and the standardisation (FastVLM); returns a progress row or ``None``."""
        keep_towers_in_eval(self.model, self.arch)
        if wants_cache(self.cfg, self.arch):
            self.cache = TowerFeatureCache(active_module(self.model, self.arch.vision_tower))
        if not wants_standardization(self.cfg, self.arch):
            return None if self.cache is None else {"kind": "tower", "cached": True, "standardized": False}
        linear, self.key_prefix = projector_linear_key(self.model, self.arch)
        t0 = time.perf_counter()
        batches = tower_features(self.model, processor, list(train_images), self.cfg.eval_batch_size, device)
        mu, sigma = channel_stats(batches)
        self.standardization = ProjectorStandardization(linear, mu, sigma)
        self.standardization.install()
        return {
            "kind": "tower",
            "cached": self.cache is not None,
            "standardized": True,
            "photos": len(train_images),
            "stats_seconds": time.perf_counter() - t0,
        }

    def train_mode(self, model: Any) -> None:
        """``model.train()`` with every tower kept in eval mode."""
        model.train()
        keep_towers_in_eval(self.model, self.arch)

    def unfreeze(self) -> None:
        """Start training the tower copy (idempotent); its outputs are no longer cached."""
        if self.unfrozen:
            return
        if self.cache is not None:
            self.cache.remove()
            self.cache = None
        set_tower_trainable(self.model, self.arch, True)
        self.unfrozen = True

    def grad_norm(self) -> float:
        """L2 norm of the gradients on the tower copy's parameters (0.0 when none has one)."""
        grads = [p.grad.detach().float().pow(2).sum() for p in self.frozen_trainable if p.grad is not None]
        return float(sum(grads) ** 0.5) if grads else 0.0

    def saved_weights(self, raw: Any, best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """The adapter weights ``best/`` gets: ``best`` (or the current ones) with the
        standardisation folded into the projector (plain weights the app loads as they are)."""
        if self.standardization is None:
            return best
        return self.standardization.fold(best if best is not None else trainable_state(raw), self.key_prefix)


def _evaluate_baseline(
    adapter: Path,
    items: Sequence[EvalItem],
    test_items: Sequence[EvalItem],
    cfg: TrainConfig,
    base_model: str | Path,
    device: torch.device,
    dtype: torch.dtype,
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
    scorer: Any,
    raw: Any,
    best_weights: dict[str, torch.Tensor] | None,
    state: RoundState,
    test_items: Sequence[EvalItem],
    cfg: TrainConfig,
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
    run_dir: Path,
    raw: Any,
    best_weights: dict[str, torch.Tensor] | None,
    state: RoundState,
    cfg: TrainConfig,
    data: ExportData,
    base_model: str | Path,
    baseline_adapter: str | Path | None,
    accelerator: Any,
    mixed: str,
    dtype: torch.dtype,
    t_start: float,
    *,
    test_metrics: dict[str, Any] | None,
    n_test: int,
) -> dict[str, Any]:
    """Write ``best/`` and then ``result.json`` (main process); return the result
    (:meth:`catreview.adapters.results.RoundResult.to_dict`)."""
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
    typed = RoundResult.model_validate(result)  # the contract the app reads; refuses drift at once
    if accelerator.is_main_process:
        write_dir_atomically(run_dir / BEST_DIR, lambda d: save_adapter_weights(raw, best_weights, d))
        atomic_write_text(run_dir / RESULT_FILE, typed.to_json())
    return typed.to_dict()


__all__ = ["EventCallback", "train_round"]
