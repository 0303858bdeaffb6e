"""Crash-safe checkpoints of a round: adapter, optimizer, scheduler, every RNG, and the round state.

``checkpoint-last/`` is written to a temporary folder and renamed into place (the previous one is
kept as ``checkpoint-last.prev`` until the rename is done), so a kill at any moment leaves a
complete checkpoint. RNG states hold only plain containers and tensors, so they load with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catreview.adapters.runfolder import CHECKPOINT_DIR, STATE_FILE
from catreview.adapters.train_config import TrainConfig
from catreview.files import write_dir_atomically
from training.errors import TrainingError

if TYPE_CHECKING:
    import torch


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

    np_state: Any = np.random.get_state()  # the legacy tuple (kind, keys, pos, has_gauss, cached)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    module = _device_rng_module(device.type) if device is not None else None
    if module is not None and device is not None:
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
        save_file(
            {k: v.contiguous() for k, v in weights.items()},
            str(out_dir / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )


def save_checkpoint(
    run_dir: Path,
    model: Any,
    best_weights: dict[str, torch.Tensor] | None,
    optimizer: Any,
    scheduler: Any,
    state: RoundState,
    cfg: TrainConfig,
    export_hash: str,
    process_index: int,
    is_main: bool,
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
    ckpt: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    cfg: TrainConfig,
    export_hash: str,
    process_index: int,
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


def saved_baseline(ckpt: Path | None, adapter: str | Path | None) -> dict[str, Any] | None:
    """The baseline stored in a checkpoint when it was measured for the same adapter folder
    (a resumed round does not evaluate it again), else ``None``."""
    if ckpt is None or adapter is None:
        return None
    saved = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))["state"].get("baseline")
    # A checkpoint written before test-split gating has no "test_metrics": evaluate it again.
    if saved and "test_metrics" in saved and Path(saved["adapter"]).resolve() == Path(adapter).resolve():
        return saved
    return None


def saved_threads(ckpt: Path | None) -> int | None:
    """The thread count recorded in a checkpoint (``None``: none, or written before it was recorded)."""
    if ckpt is None:
        return None
    try:
        value = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))["state"].get("num_threads")
    except (OSError, ValueError, KeyError):
        return None
    return int(value) if isinstance(value, int) and value >= 1 else None


__all__ = [
    "RoundState",
    "load_checkpoint",
    "save_adapter_weights",
    "save_checkpoint",
    "save_rng",
    "saved_baseline",
    "saved_threads",
    "trainable_state",
]
