"""Memory of one model's inference: weights resident plus the working memory it needed.

Memory figures (:class:`MemoryReading`): *peak* = the model's parameter + buffer bytes (weights
resident during inference) + *working* memory, the largest increase during inference over the
level just before it:

* CUDA: ``torch.cuda.max_memory_allocated(device)`` after ``reset_peak_memory_stats`` minus
  ``memory_allocated`` before (tensors allocated by PyTorch on that device);
* CPU: the process's resident set size (``psutil``), sampled every 5 ms in a thread, minus the
  RSS before. It is process-wide (other threads' allocations count) and allocator caching can
  hide growth that an earlier call already caused, so read it as an estimate.

Loading is timed separately and kept out of the meter, so weights are not counted twice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

MEMORY_SAMPLE_S = 0.005
"""RSS sampling interval of :class:`MemoryMeter` on CPU (seconds)."""


def model_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers (tied/shared tensors counted once)."""
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@dataclass(frozen=True)
class MemoryReading:
    """Peak memory of one model's inference, in bytes (see the module docstring).

    Attributes:
        device: ``"cpu"`` or ``"cuda:N"``.
        weights_bytes: parameters + buffers of the model (:func:`model_bytes`).
        working_bytes: largest increase above the level before inference (>= 0).
        method: how ``working_bytes`` was measured, in words.
    """

    device: str
    weights_bytes: int
    working_bytes: int
    method: str

    @property
    def peak_bytes(self) -> int:
        """Weights + working memory (bytes)."""
        return self.weights_bytes + self.working_bytes

    def text(self) -> str:
        """One line: ``"peak <MiB> = weights <MiB> + working <MiB> (<method>)"``."""
        mb = 1024 * 1024
        return (
            f"peak {self.peak_bytes / mb:.1f} MiB = weights {self.weights_bytes / mb:.1f} MiB + "
            f"working {self.working_bytes / mb:.1f} MiB ({self.method})"
        )


class MemoryMeter:
    """Context manager measuring the working-memory increase of the code inside it.

    CUDA: resets the device's peak statistics on entry and reads
    ``max_memory_allocated - memory_allocated(before)`` on exit. CPU: samples the process RSS
    every :data:`MEMORY_SAMPLE_S` seconds in a daemon thread. Use :meth:`reading` after the block.
    """

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self._before = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        """How the working memory is measured on this device, in words."""
        if self.device.type == "cuda":
            return "CUDA: torch.cuda.max_memory_allocated over inference"
        return f"CPU: process RSS growth over inference, sampled every {MEMORY_SAMPLE_S * 1000:.0f} ms"

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self._before = self._peak = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(MEMORY_SAMPLE_S):
                    self._peak = max(self._peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, name="catreview-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self._peak = torch.cuda.max_memory_allocated(self.device)
        else:
            import psutil

            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._peak = max(self._peak, psutil.Process().memory_info().rss)

    @property
    def working_bytes(self) -> int:
        """Largest increase over the level at entry (>= 0), valid after the block."""
        return max(0, self._peak - self._before)

    def reading(self, model: Any) -> MemoryReading:
        """The reading for ``model`` (its weights are added to the working memory)."""
        return MemoryReading(str(self.device), model_bytes(model), self.working_bytes, self.method)


__all__ = ["MEMORY_SAMPLE_S", "MemoryMeter", "MemoryReading", "model_bytes"]
