"""The model a round trains: precision, the base VLM, and the LoRA adapter put on it (peft).

What is trained (Hu et al. 2021, LoRA; peft ``LoraConfig``/``get_peft_model``): rank-``r``
updates ``W + (alpha / r) B A`` on the language model's ``q_proj``/``v_proj`` (regex
:data:`catreview.adapters.train_config.DEFAULT_TARGET_MODULES`; the vision tower matches nothing and stays
frozen), optionally a full trainable copy of the projector (``modules_to_save``) and of the
vision tower (``unfreeze_tower_last_epoch``; trainable in the last epoch only, see
:mod:`training.tower`). Module names per architecture are :func:`training.tower.architecture`'s
(LLaVA family and FastVLM: ``model.multi_modal_projector``, ``model.vision_tower``; the default
target regex matches their language models' ``q_proj``/``v_proj`` and nothing in a CLIP, SigLIP
or timm tower). ``B`` starts at zero, so the untrained adapter *is* the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from catreview.adapters.train_config import TrainConfig
from training.errors import TrainingError
from training.tower import Architecture

if TYPE_CHECKING:
    import torch


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

    from catreview.models.vlm.loading import not_found_message

    try:
        processor = AutoProcessor.from_pretrained(str(base_model))
        model = AutoModelForImageTextToText.from_pretrained(str(base_model), dtype=dtype)
    except OSError as exc:
        raise TrainingError(not_found_message(str(base_model))) from exc
    return processor, model.to(device)


def lora_config(cfg: TrainConfig, arch: Architecture | None = None):
    """The peft ``LoraConfig`` of ``cfg`` (rank, alpha, dropout, targets, optional projector and
    vision tower copies, named as in ``arch``; default: the LLaVA names)."""
    from peft import LoraConfig

    arch = arch or Architecture("llava")
    save = [arch.projector] if cfg.train_projector else []
    if cfg.unfreeze_tower_last_epoch:
        save.append(arch.vision_tower)
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules_arg(),
        modules_to_save=save or None,
        bias="none",
    )


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter (``get_peft_model`` modifies ``model`` in place).
    With ``unfreeze_tower_last_epoch`` the tower copy starts frozen (``requires_grad=False``).

    Raises:
        TrainingError: ``target_modules`` matches no module, or a module to save is missing.
    """
    from peft import get_peft_model

    from training.tower import architecture, set_tower_trainable

    arch = architecture(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        wrapped = get_peft_model(model, lora_config(cfg, arch))
    except ValueError as exc:
        raise TrainingError(f"LoRA target_modules {cfg.target_modules!r} do not fit this model: {exc}") from exc
    if cfg.unfreeze_tower_last_epoch:
        set_tower_trainable(wrapped, arch, False)
    return wrapped


def lora_module_names(model: Any) -> list[str]:
    """Names of the modules that carry LoRA weights (for the record and for checks)."""
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n})


__all__ = ["add_lora", "load_base_model", "lora_config", "lora_module_names", "resolve_precision"]
