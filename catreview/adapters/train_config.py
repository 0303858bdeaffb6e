"""Hyper-parameters of one LoRA round, in one explicit pydantic model (:class:`TrainConfig`).

Every field has a default that suits a 7B LLaVA on one GPU; the tests and the benchmark override a
few (steps, evaluation interval, learning rate). The same model is

* turned into command-line flags by :mod:`catreview.cli.train_flags` (built from
  ``TrainConfig.model_fields``, so a field ``grad_accum`` is the flag ``--grad-accum``),
* written to ``run_dir/train_config.json`` and stored with every adapter version (its
  ``hyperparams_json``), so a version says exactly how it was made.

Sources: LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685): rank ``r``, scaling ``alpha / r``; the common ``alpha = 2 r`` and ``q_proj`` /
``v_proj`` targets follow the paper's Table 5 and peft's examples
(https://huggingface.co/docs/peft/package_reference/lora).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from catreview.adapters.validation import ConfigModel

#: peft regex (``re.fullmatch`` on module names): the language model's attention q/v projections.
#: Module names in transformers 5.x: ``model.language_model.layers.N.self_attn.q_proj``; the
#: vision tower's ``model.vision_tower.encoder.layers.N.self_attn.q_proj`` does not match, so
#: the vision tower stays frozen.
DEFAULT_TARGET_MODULES = r".*language_model.*\.(q_proj|v_proj)"

#: The projector between vision tower and language model (LLaVA family). Trained as a full copy
#: (peft ``modules_to_save``) when :attr:`TrainConfig.train_projector` is set.
PROJECTOR_MODULE = "multi_modal_projector"


class TrainConfig(ConfigModel):
    """One LoRA round. Units: steps are *optimizer* steps (after gradient accumulation).

    A pydantic model: types, ranges and choices are declared on the fields and checked on
    construction (:class:`catreview.adapters.validation.InvalidConfigError`, a ``ValueError``,
    names the first bad field); :meth:`replace` validates too. ``extra`` holds free-form notes
    stored with the config (not used by the round).

    LoRA (peft ``LoraConfig``):
        rank: LoRA rank ``r`` (default 16).
        alpha: LoRA ``lora_alpha``; ``None`` -> ``2 * rank``. Update scale is ``alpha / rank``.
        dropout: ``lora_dropout`` on the LoRA input (default 0.05).
        target_modules: regex (full match) or comma-separated module-name suffixes; default
            :data:`DEFAULT_TARGET_MODULES` (language-model ``q_proj``/``v_proj`` only).
        train_projector: also train the multi-modal projector (peft ``modules_to_save``).
        unfreeze_tower_last_epoch: also train the vision tower (a full trainable copy, peft
            ``modules_to_save``; about 2x the tower's memory for weights, gradients and Adam
            state) during the round's last epoch (the epoch of its last optimizer step); frozen
            before. Default off. Its normalisation statistics stay frozen (eval-mode BatchNorm).
            One process only (a data-parallel round refuses it).
        tower_lr_scale: the unfrozen tower's learning rate as a multiple of ``lr`` (default 0.1,
            an AdamW parameter group of its own, same schedule). A pretrained tower moved at the
            LoRA/projector rate diverged in a small round (loss 4.1 -> 8.1); lower rates for the
            pretrained vision encoder are the usual practice (LLaVA-OneVision's training scripts:
            ``mm_vision_tower_lr`` 2e-6 with ``learning_rate`` 1e-5). Only used with
            ``unfreeze_tower_last_epoch``.

    Vision tower (FastVLM, whose timm tower output is the projector's input; see
    :mod:`training.tower`; ignored for other architectures):
        cache_tower_features: compute the frozen tower's output once per photo and reuse it
            (default on; exact: the tower is frozen and in eval mode). Off from the epoch the
            tower is unfrozen.
        standardize_tower_features: train the projector's first linear on per-channel
            standardised tower outputs (statistics of the training photos), folded back into
            plain weights before saving (default on; needs ``train_projector``). Measured in
            NOTES as what makes the projector learn fast.

    Optimisation (AdamW + ``transformers.get_cosine_schedule_with_warmup``):
        lr: peak learning rate (default 2e-4).
        projector_lr: peak learning rate of the trained projector copy (``train_projector``), an
            AdamW parameter group of its own on the same schedule; ``None`` (default) = ``lr``.
            A projector trained from scratch on standardised features takes a higher rate than
            the LoRA updates of the pretrained LM (measured on the built-in FastVLM, see
            :data:`BUILTIN_FIRST_ROUND`).
        weight_decay: AdamW decoupled weight decay (default 0).
        warmup_ratio: share of the total optimizer steps spent in linear warm-up (default 0.05).
        epochs: passes over the training split (default 3).
        max_steps: cap on optimizer steps (``None`` = epochs decide); the schedule is laid out
            over ``min(max_steps, steps of all epochs)``.
        batch_size: photos per process per micro-batch (default 4).
        grad_accum: micro-batches per optimizer step (default 1); effective batch =
            ``batch_size * grad_accum * processes``.
        max_grad_norm: gradient clipping (L2 norm); ``0`` disables.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        mixed_precision: ``"auto"`` (bf16 on a CUDA GPU that supports it, else ``"no"``),
            ``"no"``, ``"bf16"``, ``"fp16"`` -> ``accelerate.Accelerator(mixed_precision=...)``.
        dtype: dtype of the frozen base weights: ``"auto"`` (bf16 on CUDA, fp32 on CPU),
            ``"float32"``, ``"bfloat16"``, ``"float16"``. LoRA weights stay fp32 (peft
            ``autocast_adapter_dtype``).

    Data and target (see :mod:`training.data`):
        target: ``"verdict"`` (default: the app's verdict prompt, answer = the breed name),
            ``"conversation"`` (the export's LLaVA conversation), or ``"both"`` (each photo
            twice).
        candidate_source: ``"stage1"`` (default): verdict prompts list the photo's stage-1 top-k
            at review time when the export recorded it (the app's own lists; answer ``"other"``
            when the breed is missing), else sampled lists; ``"sampled"``: always sampled.
        n_candidates: breeds listed in a sampled verdict prompt (true breed + distractors),
            like stage 1's top-k (default 3); ``"other"`` is always appended.
        other_rate: share of training verdict prompts whose list leaves the true breed out, with
            the answer ``"other"`` (default 0.1); teaches the app's escape answer.
        balance: ``"sampler"`` (``WeightedRandomSampler``, weights ``1 / count(breed)``),
            ``"loss"`` (class-weighted loss: per-example weights ``N / (C * count(breed))``) or
            ``"none"``.
        loss: ``"cross_entropy"`` (default) or ``"focal"``: per answer token
            ``-(1 - p_t)^gamma * log p_t`` (Lin et al. 2017, "Focal Loss for Dense Object
            Detection", arXiv:1708.02002, eq. 4; the paper's alpha weighting is the class
            weights of ``balance="loss"``). An alternative to balanced sampling: use it with
            ``balance="none"`` or ``"loss"``.
        focal_gamma: the focusing parameter ``gamma`` (default 2, the paper's best value);
            ``0`` is cross-entropy.
        max_train_examples / max_val_examples: keep the first N (after a seeded shuffle);
            ``None`` = all.

    Evaluation, early stopping, checkpoints:
        eval_every: evaluate on validation every N optimizer steps (default 50), at step 0 and
            at the end.
        eval_candidates: ``"sampled"`` (per photo the true breed + ``n_candidates - 1`` seeded
            distractors, fixed for the whole round, like stage 1's top-k) or ``"all"`` (every
            breed of the export).
        eval_batch_size: photos per scoring batch.
        score_normalisation: ``"mean"`` or ``"sum"``, as :class:`catreview.config.VLMProfile`.
        early_stopping_patience: stop after this many evaluations without a better balanced
            accuracy (``0`` disables).
        min_delta: improvement in balanced accuracy that counts as better.
        save_every: write ``checkpoint-last`` every N optimizer steps (``None`` = ``eval_every``).
        log_every: write a training-loss row every N optimizer steps.

    Reproducibility:
        seed: seeds sampling, distractors, LoRA init and dropout.
        num_workers: ``DataLoader`` worker processes (0 = load in the training process).
        num_threads: CPU threads for the round's tensor maths (``torch.set_num_threads``);
            ``None`` = the process default, which is then recorded in the checkpoint and used
            again by a resumed round. The thread count changes how float sums are split, so two
            processes with different counts (another ``OMP_NUM_THREADS``, another launcher) drift
            apart by ~1e-7 per step, which Adam compounds.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN
            deterministic and a fixed cuBLAS workspace for the round (restored afterwards). CPU
            kernels are deterministic anyway; on GPUs this removes most run-to-run noise (a few
            kernels have no deterministic version and only warn), at some speed cost.
    """

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1)
    alpha: int | None = Field(None, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str = DEFAULT_TARGET_MODULES
    train_projector: bool = False
    unfreeze_tower_last_epoch: bool = False
    tower_lr_scale: float = Field(0.1, gt=0)
    cache_tower_features: bool = True
    standardize_tower_features: bool = True

    lr: float = Field(2e-4, gt=0)
    projector_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    target: Literal["verdict", "conversation", "both"] = "verdict"
    candidate_source: Literal["stage1", "sampled"] = "stage1"
    n_candidates: int = Field(3, ge=1)
    other_rate: float = Field(0.1, ge=0, lt=1)
    balance: Literal["sampler", "loss", "none"] = "sampler"
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: float = Field(2.0, ge=0)
    max_train_examples: int | None = Field(None, ge=1)
    max_val_examples: int | None = Field(None, ge=1)

    eval_every: int = Field(50, ge=1)
    eval_candidates: Literal["sampled", "all"] = "sampled"
    eval_batch_size: int = Field(8, ge=1)
    score_normalisation: Literal["mean", "sum"] = "mean"
    early_stopping_patience: int = Field(3, ge=0)
    min_delta: float = Field(0.0, ge=0)
    save_every: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)

    seed: int = 0
    num_workers: int = Field(0, ge=0)
    num_threads: int | None = Field(None, ge=1)
    deterministic: bool = True

    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("target_modules")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("target_modules is empty")
        return v

    # ------------------------------------------------------------------ derived values
    @property
    def lora_alpha(self) -> int:
        """``alpha`` or, when unset, ``2 * rank``."""
        return self.alpha if self.alpha is not None else 2 * self.rank

    @property
    def checkpoint_every(self) -> int:
        """Optimizer steps between ``checkpoint-last`` writes."""
        return self.save_every if self.save_every is not None else self.eval_every

    def target_modules_arg(self) -> str | list[str]:
        """``target_modules`` as peft wants it: a regex string, or a list of name suffixes when
        the value is a plain comma-separated list (``"q_proj,v_proj"``)."""
        if any(ch in self.target_modules for ch in ".*()|[]\\^$+?"):
            return self.target_modules
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (plus the resolved ``lora_alpha``)."""
        d = self.model_dump(mode="json")
        d["lora_alpha"] = self.lora_alpha
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` (derived keys are ignored)."""
        unknown = set(data) - set(cls.model_fields) - {"lora_alpha"}
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in cls.model_fields})

    def save(self, path: Path) -> None:
        """Write :meth:`to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """Read a file written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated)."""
        return type(self)(**{**self.model_dump(), **changes})


#: A LoRA round of a built-in FastVLM (SmolLM2-135M + EfficientNet-Lite tower) on a CPU. Every
#: round starts from the base model, whose image projector is random, so the first round and
#: each later one need it: the app's cold start and ``python -m catreview train`` on a built-in
#: profile use it (:func:`builtin_first_round`); flags still override it. The defaults of
#: :class:`TrainConfig` stay those of a 7B LLaVA on a GPU. Why each value (2-core CPU,
#: ``benchmarks/vlm_round.py``, ``tests/test_vlm_round_real.py``):
#:
#: * ``train_projector``: the projector is random; without it nothing maps the image into the LM.
#: * ``lr`` 2e-4 (the default) for the LoRA weights: at 1e-3 on every trainable weight the
#:   training loss spiked from 1.05 to 8.0 at step 4 (batch 8, shared photos).
#: * ``projector_lr`` 1e-3: the projector starts random and learns from scratch. With it at
#:   2e-4 too, the project's round stayed at chance (validation balanced accuracy 0.333 for 78
#:   steps); at 1e-3 (LoRA still 2e-4) 3-way accuracy on 105 held-out photos went 0.38 -> 0.57
#:   in 100 steps, and a standalone NOTES-style script on the same split reached 0.84 (session 8).
#: * no system turn in the built-in chat template (:attr:`catreview.models.offline.BuiltinVLM.system_prompt`)
#:   and ``epochs`` 6 (156 steps on 204 training photos, ~6 CPU minutes at 2.3 s/step): with both,
#:   3-way accuracy on the same 105 held-out photos went 0.40 -> 0.70 (4-way with "other"
#:   0.12 -> 0.65), best at step 150 of a 200-step run (validation 3-way 0.33 / 0.48 / 0.71 / 0.76
#:   at steps 0 / 50 / 100 / 150; session 9, ``/work/tools`` script, load average ~2).
#: * ``rank`` 8 (alpha 16), ``batch_size`` 8: the NOTES recipe (0.825 3-way accuracy on 217
#:   unseen photos after 411 steps). The rank barely changes a step's cost (the 135M LM's
#:   forward and backward dominate); batch 8 halves the optimizer steps per epoch.
#: * ``eval_every`` 20, ``max_val_examples`` 30: each evaluation scores every validation photo
#:   once (a forward as long as a training row); capped so evaluations stay a small share.
#: * ``mixed_precision`` / ``dtype`` stay ``"auto"`` (fp32 on a CPU): the 2-core machine (AMD EPYC,
#:   AVX2, no AVX512-BF16/AMX) has no native bf16 matrix product; ``benchmarks/vlm_round.py
#:   --only profile`` measures bf16 autocast against fp32 on the machine at hand.
BUILTIN_FIRST_ROUND: dict[str, Any] = {
    "train_projector": True,
    "lr": 2e-4,
    "projector_lr": 1e-3,
    "epochs": 6,
    "rank": 8,
    "batch_size": 8,
    "eval_batch_size": 8,
    "eval_every": 20,
    "max_val_examples": 30,
}


def builtin_first_round(**changes: Any) -> TrainConfig:
    """:class:`TrainConfig` of :data:`BUILTIN_FIRST_ROUND` with ``changes`` applied (validated).

    Raises:
        catreview.adapters.validation.InvalidConfigError: a bad value in ``changes``.
    """
    return TrainConfig(**{**BUILTIN_FIRST_ROUND, **changes})


__all__ = ["BUILTIN_FIRST_ROUND", "DEFAULT_TARGET_MODULES", "PROJECTOR_MODULE", "TrainConfig", "builtin_first_round"]
