"""The training process as the job runner sees it: is it still ours and alive, and stopping it.

A round runs in a process of its own (its own session and process group, see
:class:`catreview.adapters.jobs.TrainJobs`); the runner records its pid and start time in the
run folder, so a later app process can tell whether that pid is still the round -- pids are
reused -- or has gone (crash recovery).
"""

from __future__ import annotations

import os
import signal

import psutil

#: Start times of one process read twice agree exactly; allow for float noise only.
_CREATE_TIME_TOLERANCE_S = 1e-3


def process_create_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch, ``psutil.Process.create_time``), ``None``
    when it does not exist or cannot be read."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def process_alive(pid: int | None, create_time: float | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if given, started at ``create_time``
    (:func:`process_create_time`: the same pid now running another program reads ``False``)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        return create_time is None or abs(proc.create_time() - create_time) < _CREATE_TIME_TOLERANCE_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # exists, owned by someone else


def terminate_group(pid: int) -> None:
    """SIGTERM the process group led by ``pid`` (the round and, under accelerate, its workers)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # already gone
    except PermissionError:
        os.kill(pid, signal.SIGTERM)


__all__ = ["process_alive", "process_create_time", "terminate_group"]
