"""Names of the files a LoRA round writes in its run folder, and the reader of its progress log.

A light module (standard library only): :mod:`catreview.adapters.jobs` and
:mod:`catreview.adapters.versions` read run folders through it without importing the training code
(:mod:`training.lora`, which pulls in NumPy and, when a round runs, torch).
"""

from __future__ import annotations

import json
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
