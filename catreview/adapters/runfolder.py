"""The run folder of a LoRA round: its file names and the readers of what the round writes there.

A light module (standard library only): :mod:`catreview.adapters.jobs`,
:mod:`catreview.adapters.rounds` and the Train tab read run folders through it without importing the
training code (:mod:`training.lora`, which pulls in NumPy and, when a round runs, torch). The
typed content of ``result.json`` is :class:`catreview.adapters.results.RoundResult`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from catreview.errors import CatreviewError

#: One JSON object per line (``kind`` train/eval/resume), appended while the round runs.
PROGRESS_FILE = "progress.jsonl"
#: Written last (atomically) by a finished round; its presence means the round finished.
RESULT_FILE = "result.json"
#: The round's :class:`catreview.adapters.train_config.TrainConfig` as JSON.
CONFIG_FILE = "train_config.json"
#: Folder of the latest complete checkpoint (``<name>.prev`` while it is being replaced).
CHECKPOINT_DIR = "checkpoint-last"
#: Folder of the best adapter so far (peft format).
BEST_DIR = "best"
#: ``RoundState`` + config + export hash inside a checkpoint folder.
STATE_FILE = "trainer_state.json"
#: The training process's stdout and stderr (written by :class:`catreview.adapters.jobs.TrainJobs`).
LOG_FILE = "train.log"
#: The job runner's notes on the run: phase, pid and its start time, export folder, command.
RUN_META_FILE = "run.json"
#: Characters of a log's end kept in a failed run's ``error``.
LOG_TAIL_CHARS = 4000


class ProgressFileError(CatreviewError, ValueError):
    """A ``progress.jsonl`` line that is not a JSON object and is not a torn last line."""


def read_progress(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``progress.jsonl``, in file order (``[]`` when the file does not exist).

    The writer appends each row as one JSON object plus ``"\\n"``. Only the final line can be
    incomplete: cut by a kill mid-write, or still being written while this reads it. A final
    line without its newline that is not valid JSON is therefore skipped (a resumed round
    rewrites the file without it). Blank lines carry no row and are ignored.

    Raises:
        ProgressFileError: any other line is not a JSON object (the file was damaged or edited);
            the message gives the file, the line number and the start of the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    # After a final "\n" the last element is b"" (complete file); otherwise it is an unfinished row.
    unfinished = len(lines)
    rows = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError
            if number == unfinished:
                continue  # torn by a kill or still being written: not a row yet
            raise ProgressFileError(f"{path}, line {number}: not valid JSON ({exc}): {raw[:80]!r}") from exc
        if not isinstance(row, dict):
            raise ProgressFileError(f"{path}, line {number}: expected a JSON object, got {raw[:80]!r}")
        rows.append(row)
    return rows


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    """``result.json`` of a finished round as written, or ``None`` while it is not finished
    (:meth:`catreview.adapters.results.RoundResult.read` gives the typed view)."""
    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``chars`` characters of a log file ('' when absent)."""
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - chars))
        return fh.read().decode("utf-8", errors="replace")


_ERROR_LINE = re.compile(r"(?:^|: )error: (.+)$")  # "error: ..." (python -m training), "prog: error: ..." (argparse)


def log_error_summary(path: Path, chars: int = 4 * LOG_TAIL_CHARS) -> str | None:
    """The error a failed round reported, read from the end of its log.

    The last ``error: ...`` line (``python -m training`` reports unusable inputs that way, exit
    status 2; argparse too), else the exception line that ends the last traceback
    (``RuntimeError: ...``); ``None`` when the log shows neither (a killed process, say).
    """
    lines = log_tail(path, chars).splitlines()
    for line in reversed(lines):
        m = _ERROR_LINE.search(line.strip())
        if m:
            return m.group(1).strip()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if starts:
        for line in lines[starts[-1] + 1 :]:
            if line.strip() and not line[:1].isspace():
                return line.strip()
    return None


def failure_text(summary: str, log: Path) -> str:
    """A failed run's ``error``: summary lines, a blank line, then the log's tail (what the UI
    shows is the part before the blank line, :attr:`catreview.adapters.status.RunStatus.summary`)."""
    tail = log_tail(log)
    return f"{summary}\n\n{tail}" if tail else summary


__all__ = [
    "BEST_DIR",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "LOG_FILE",
    "LOG_TAIL_CHARS",
    "PROGRESS_FILE",
    "RESULT_FILE",
    "RUN_META_FILE",
    "STATE_FILE",
    "ProgressFileError",
    "failure_text",
    "log_error_summary",
    "log_tail",
    "read_progress",
    "read_result",
]
