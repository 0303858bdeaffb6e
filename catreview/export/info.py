"""``export.json`` of an export folder and the content hash it records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from catreview.files import sha256_file

FORMAT_VERSION = 1
#: Files not covered by the content hash (they hold the time and the hash itself).
UNHASHED_FILES = frozenset({"README.md", "export.json"})


def tree_hash(root: Path) -> str:
    """sha256 over ``relative/path\\0sha256(bytes)\\n`` of every file except README/export.json."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in UNHASHED_FILES:
            h.update(f"{rel}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def export_info(out_dir: str | Path) -> dict[str, Any]:
    """The ``export.json`` of an export folder. Raises ``FileNotFoundError`` if absent."""
    return json.loads((Path(out_dir) / "export.json").read_text(encoding="utf-8"))


__all__ = ["FORMAT_VERSION", "UNHASHED_FILES", "export_info", "tree_hash"]
