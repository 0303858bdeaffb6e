"""The round's live progress log, ``progress.jsonl`` (read by the app through
:func:`catreview.adapters.runfolder.read_progress`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catreview.adapters.runfolder import read_progress
from catreview.files import atomic_write_bytes, jsonl_line


class ProgressLog:
    """Append-only ``progress.jsonl`` writer (a no-op on non-main processes)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "ab") as fh:
            fh.write(jsonl_line(row))
            fh.flush()

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps after ``step`` (written after the checkpoint a resume starts from)
        and a torn last line.

        Raises:
            catreview.adapters.runfolder.ProgressFileError: a line before the last one is damaged.
        """
        if not self.enabled or not self.path.is_file():
            return
        keep = [ln for ln in read_progress(self.path) if ln.get("step", 0) <= step]
        atomic_write_bytes(self.path, b"".join(jsonl_line(r) for r in keep))


__all__ = ["ProgressLog"]
