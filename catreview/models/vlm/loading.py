"""Loading a stage-2 VLM: device, dtype, 4-bit quantization, ``from_pretrained``, adapters, versions.

A profile's ``model`` is a Hugging Face hub id or a local folder; both go through
``AutoProcessor`` + ``AutoModelForImageTextToText`` (the tiny offline models of
:mod:`catreview.models.tiny_llava` load through the same path). A LoRA adapter folder is wrapped
on top with peft. :func:`model_version_string` names what a profile would load without loading
it (the ``model_version`` stored with every prediction).

Errors a user can act on are raised as :class:`~catreview.models.vlm.types.VLMError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from catreview.config import VLMProfile
from catreview.files import sha256_file
from catreview.models.vlm.prompts import PROMPT_VERSION
from catreview.models.vlm.types import VLMError

if TYPE_CHECKING:  # heavy imports stay lazy: importing this module must not import torch
    import torch


class LoadedVLM(NamedTuple):
    """What :func:`load_processor_and_model` returns (unpacks as a 4-tuple)."""

    processor: Any  # the checkpoint's ProcessorMixin (tokenizer + image processor + chat template)
    model: Any  # PreTrainedModel (or peft PeftModel) in eval mode on ``device``
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when available else ``cpu``; anything else is passed to torch.

    Raises:
        VLMError: a CUDA device was asked for and CUDA is not available.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VLMError(f'device {device!r} was asked for but CUDA is not available here; use device = "cpu"')
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA, float32 on CPU; else the named torch dtype."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved: torch.dtype = getattr(torch, dtype)
    return resolved


def quantization_config(profile: VLMProfile, device: torch.device, dtype: torch.dtype) -> Any:
    """``BitsAndBytesConfig`` (4-bit NF4) when ``profile.load_in_4bit``, else ``None``.

    Raises:
        VLMError: 4-bit asked on a non-CUDA device, or bitsandbytes is not installed.
    """
    if not profile.load_in_4bit:
        return None
    if device.type != "cuda":
        raise VLMError(
            f"load_in_4bit needs a CUDA GPU (bitsandbytes), but this profile runs on {device.type!r}. "
            "Set load_in_4bit = false to run in full precision on CPU, or run on a machine with a GPU."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise VLMError("load_in_4bit needs the bitsandbytes package: pip install bitsandbytes") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA ``OutOfMemoryError`` or a CPU allocation failure)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def not_found_message(model: str) -> str:
    """One-line message for a checkpoint ``model`` (hub id or folder) that cannot be found.

    Says whether it was taken for a folder or a hub id, whether ``HF_HUB_OFFLINE`` limited the
    search to the local cache, and how to get the model.
    """
    if _looks_like_path(model):
        return f"VLM model folder {model!r} not found or incomplete (needs config.json, weights and processor files)"
    hint = (
        "HF_HUB_OFFLINE=1 is set, so only the local Hugging Face cache is searched"
        if _offline()
        else "the Hugging Face hub could not be reached or has no such repository"
    )
    return (
        f"VLM model {model!r} is not a local folder and is not in the local Hugging Face cache ({hint}). "
        f"Download it where there is internet (`hf download {model}`) and copy the cache, "
        "or set the profile's model to a local folder."
    )


def load_processor_and_model(profile: VLMProfile) -> LoadedVLM:
    """Load ``profile.model`` (+ optional peft adapter) for inference.

    Returns:
        ``(processor, model, device, dtype)``; the model is in eval mode on ``device``.

    Raises:
        VLMError: model or adapter not found (offline), not an image-text-to-text checkpoint,
            4-bit without CUDA/bitsandbytes, out of memory.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(profile.device)
    dtype = resolve_dtype(profile.dtype, device)
    quant = quantization_config(profile, device, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}  # load straight onto the GPU
    try:
        processor = AutoProcessor.from_pretrained(profile.model)
        model = AutoModelForImageTextToText.from_pretrained(profile.model, **kwargs)
    except OSError as exc:
        raise VLMError(not_found_message(profile.model)) from exc
    except ValueError as exc:  # e.g. "Unrecognized configuration class ... for AutoModelForImageTextToText"
        raise VLMError(
            f"{profile.model!r} cannot be loaded as an image-text-to-text model with this transformers version: {exc}"
        ) from exc
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if is_oom(exc):
            raise VLMError(
                f"out of memory loading {profile.model!r} on {device}: use load_in_4bit = true (CUDA), "
                "a smaller model, or unload the other profile first"
            ) from exc
        raise
    if device.type != "cuda":
        model = model.to(device)
    if profile.adapter is not None:
        model = load_adapter(model, Path(profile.adapter))
    model.eval()
    return LoadedVLM(processor, model, device, dtype)


def _check_adapter_folder(adapter: Path) -> None:
    if not (adapter / "adapter_config.json").is_file():
        raise VLMError(f"adapter folder {str(adapter)!r} not found or has no adapter_config.json")


def load_adapter(model: Any, adapter: Path) -> Any:
    """Wrap ``model`` with the peft adapter in ``adapter`` (inference only).

    Raises:
        VLMError: the folder has no ``adapter_config.json``.
    """
    _check_adapter_folder(adapter)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)


def adapter_identity(adapter: Path) -> str:
    """sha256 over an adapter folder's config and weight files (adapters are a few MB).

    Raises:
        VLMError: the folder has no ``adapter_config.json``.
    """
    _check_adapter_folder(adapter)
    files = sorted(p for p in adapter.iterdir() if p.name.startswith("adapter_") and p.is_file())
    return hashlib.sha256("".join(f"{p.name}:{sha256_file(p)};" for p in files).encode()).hexdigest()


def model_identity(model: str) -> str:
    """Identity of a checkpoint without loading it: sha256 of its ``config.json`` plus, for a hub
    checkpoint in the local cache, the snapshot commit.

    Raises:
        VLMError: no ``config.json`` locally or in the cache.
    """
    from transformers.utils import cached_file

    try:
        config_path = cached_file(model, "config.json")
    except OSError as exc:
        raise VLMError(not_found_message(model)) from exc
    if config_path is None:
        raise VLMError(not_found_message(model))
    path = Path(config_path)
    commit = path.parent.name if path.parent.parent.name == "snapshots" else ""
    return hashlib.sha256(path.read_bytes() + commit.encode()).hexdigest()


def model_version_string(profile: VLMProfile) -> str:
    """``"<name>[+<adapter>]@<10 hex>-<PROMPT_VERSION>"``, stable across runs and machines.

    The hash covers the checkpoint identity (:func:`model_identity`), the adapter's files,
    ``load_in_4bit`` and ``score_normalisation`` (both change the probabilities) and
    :data:`~catreview.models.vlm.prompts.PROMPT_VERSION`. dtype and device are left out on purpose.
    """
    parts = {
        "model": model_identity(profile.model),
        "adapter": adapter_identity(Path(profile.adapter)) if profile.adapter else None,
        "load_in_4bit": profile.load_in_4bit,
        "score_normalisation": profile.score_normalisation,
        "prompt": PROMPT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    stem = Path(profile.model.rstrip("/")).name
    if profile.adapter:
        stem += "+" + Path(profile.adapter).name
    return f"{stem}@{digest}-{PROMPT_VERSION}"
