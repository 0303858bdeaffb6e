"""Reproducible numerics for a round, restored afterwards (:func:`pinned_numerics`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def pinned_numerics(deterministic: bool = True) -> Iterator[None]:
    """Run a round with reproducible numerics, then give the caller its settings back.

    With ``deterministic``: ``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN
    deterministic (no benchmarking) and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already set;
    cuBLAS reads it when the first handle is made). The round itself sets the thread count
    (:attr:`catreview.adapters.train_config.TrainConfig.num_threads`). On exit the thread count, the determinism flags and the
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


__all__ = ["pinned_numerics"]
