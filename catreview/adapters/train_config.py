"""Hyper-parameters of one LoRA round, in one explicit dataclass (:class:`TrainConfig`).

Every field has a default that suits a 7B LLaVA on one GPU; the tests and the benchmark override a
few (steps, evaluation interval, learning rate). The same dataclass is

* turned into command-line flags (:func:`add_config_arguments` / :func:`config_from_args`, so a
  field ``grad_accum`` is the flag ``--grad-accum``),
* written to ``run_dir/train_config.json`` and stored with every adapter version (its
  ``hyperparams_json``), so a version says exactly how it was made.

Sources: LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685): rank ``r``, scaling ``alpha / r``; the common ``alpha = 2 r`` and ``q_proj`` /
``v_proj`` targets follow the paper's Table 5 and peft's examples
(https://huggingface.co/docs/peft/package_reference/lora).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

#: peft regex (``re.fullmatch`` on module names): the language model's attention q/v projections.
#: Module names in transformers 5.x: ``model.language_model.layers.N.self_attn.q_proj``; the
#: vision tower's ``model.vision_tower.encoder.layers.N.self_attn.q_proj`` does not match, so
#: the vision tower stays frozen.
DEFAULT_TARGET_MODULES = r".*language_model.*\.(q_proj|v_proj)"

#: The projector between vision tower and language model (LLaVA family). Trained as a full copy
#: (peft ``modules_to_save``) when :attr:`TrainConfig.train_projector` is set.
PROJECTOR_MODULE = "multi_modal_projector"


@dataclass
class TrainConfig:
    """One LoRA round. Units: steps are *optimizer* steps (after gradient accumulation).

    LoRA (peft ``LoraConfig``):
        rank: LoRA rank ``r`` (default 16).
        alpha: LoRA ``lora_alpha``; ``None`` -> ``2 * rank``. Update scale is ``alpha / rank``.
        dropout: ``lora_dropout`` on the LoRA input (default 0.05).
        target_modules: regex (full match) or comma-separated module-name suffixes; default
            :data:`DEFAULT_TARGET_MODULES` (language-model ``q_proj``/``v_proj`` only).
        train_projector: also train the multi-modal projector (peft ``modules_to_save``).

    Optimisation (AdamW + ``transformers.get_cosine_schedule_with_warmup``):
        lr: peak learning rate (default 2e-4).
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
            ``"loss"`` (per-example loss weights ``N / (C * count(breed))``) or ``"none"``.
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

    rank: int = 16
    alpha: int | None = None
    dropout: float = 0.05
    target_modules: str = DEFAULT_TARGET_MODULES
    train_projector: bool = False

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    target: Literal["verdict", "conversation", "both"] = "verdict"
    candidate_source: Literal["stage1", "sampled"] = "stage1"
    n_candidates: int = 3
    other_rate: float = 0.1
    balance: Literal["sampler", "loss", "none"] = "sampler"
    max_train_examples: int | None = None
    max_val_examples: int | None = None

    eval_every: int = 50
    eval_candidates: Literal["sampled", "all"] = "sampled"
    eval_batch_size: int = 8
    score_normalisation: Literal["mean", "sum"] = "mean"
    early_stopping_patience: int = 3
    min_delta: float = 0.0
    save_every: int | None = None
    log_every: int = 1

    seed: int = 0
    num_workers: int = 0
    num_threads: int | None = None
    deterministic: bool = True

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes stored with the config (not used by the round)."""

    def __post_init__(self) -> None:
        self.validate()

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

    # ------------------------------------------------------------------ checks and I/O
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        positive = ("rank", "epochs", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "log_every", "n_candidates")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        checks = [
            ("lr", self.lr > 0),
            ("dropout", 0 <= self.dropout < 1),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1),
            ("other_rate", 0 <= self.other_rate < 1),
            ("max_grad_norm", self.max_grad_norm >= 0),
            ("weight_decay", self.weight_decay >= 0),
            ("early_stopping_patience", self.early_stopping_patience >= 0),
            ("min_delta", self.min_delta >= 0),
            ("num_workers", self.num_workers >= 0),
            ("num_threads", self.num_threads is None or self.num_threads >= 1),
            ("max_steps", self.max_steps is None or self.max_steps >= 1),
            ("save_every", self.save_every is None or self.save_every >= 1),
            ("alpha", self.alpha is None or self.alpha > 0),
            ("max_train_examples", self.max_train_examples is None or self.max_train_examples >= 1),
            ("max_val_examples", self.max_val_examples is None or self.max_val_examples >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}: {getattr(self, name)!r}")
        for name in ("mixed_precision", "dtype", "target", "candidate_source", "balance", "eval_candidates", "score_normalisation"):
            allowed = typing.get_args(_field_types()[name])
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.target_modules.strip():
            raise ValueError("target_modules is empty")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (plus the resolved ``lora_alpha``)."""
        d = asdict(self)
        d["lora_alpha"] = self.lora_alpha
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` (derived keys are ignored)."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names - {"lora_alpha"}
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: Path) -> None:
        """Write :meth:`to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """Read a file written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """``(base type, optional)`` of a field annotation (``int | None`` -> ``(int, True)``)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`TrainConfig` field (default ``None`` = keep the dataclass default).

    ``bool`` fields become ``--name/--no-name``; ``Literal`` fields get ``choices``; optional
    numbers accept ``none``.
    """
    group = parser.add_argument_group("training hyper-parameters (see catreview.adapters.train_config.TrainConfig)")
    hints = _field_types()
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        tp, optional = _scalar_type(hints[f.name])
        default = f.default
        if tp is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=f"default {default}")
        elif typing.get_origin(tp) is Literal:
            group.add_argument(_flag(f.name), choices=typing.get_args(tp), default=None, help=f"default {default}")
        else:
            conv = _optional(tp) if optional else tp
            group.add_argument(_flag(f.name), type=conv, default=None, metavar=tp.__name__.upper(), help=f"default {default}")


class _NoneValue:
    """Marker for an optional flag given as ``none`` (argparse's ``None`` means "not given")."""

    def __repr__(self) -> str:
        return "none"


NONE_VALUE = _NoneValue()


def _optional(tp: Any):
    def convert(text: str) -> Any:
        return NONE_VALUE if text.lower() == "none" else tp(text)

    convert.__name__ = tp.__name__
    return convert


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """:class:`TrainConfig` from ``base`` (default: the defaults) with every flag that was given.

    An optional field given as ``none`` is set to ``None``.
    """
    base = base or TrainConfig()
    changes = {}
    for f in fields(TrainConfig):
        if f.name == "extra" or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is NONE_VALUE:
            changes[f.name] = None
        elif value is not None:
            changes[f.name] = value
    return base.replace(**changes)
