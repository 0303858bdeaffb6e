"""File utilities written once: atomic writes, sha256 of a file, JSONL and JSON files.

Atomic writes follow the usual POSIX recipe (write a temporary sibling, ``fsync`` it,
``os.replace`` it over the target, ``fsync`` the folder), so a reader sees the old or the new
file, never half of one, and a crash leaves the old file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "COMPLETE"  # written last into a folder made by :func:`write_dir_atomically`


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames) to disk; a no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling + ``os.replace`` (never half-written).

    The parent folder must exist (``FileNotFoundError`` otherwise).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when the file does not exist (yet).

    Raises:
        json.JSONDecodeError: the file exists but is not JSON.
    """
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_json(path: str | Path, data: Any, *, indent: int | None = 1) -> None:
    """Write ``data`` as JSON to ``path`` atomically (:func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(data, indent=indent))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 (64 characters) of a file's bytes, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_dir_atomically(final: Path, fill: Callable[[Path], None]) -> None:
    """Create folder ``final`` with ``fill(tmp)`` so that a complete version always exists.

    ``fill`` writes into ``.<name>.tmp``; a :data:`COMPLETE_MARKER` file is added; then the old
    ``final`` (if any) is renamed to ``<name>.prev``, the temporary folder renamed to ``final``
    and the old one removed. A kill between the renames leaves ``<name>.prev`` complete;
    :func:`complete_dir` finds it.
    """
    tmp = final.with_name(f".{final.name}.tmp")
    prev = final.with_name(f"{final.name}.prev")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    (tmp / COMPLETE_MARKER).write_text("ok")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        if prev.exists():
            shutil.rmtree(prev)
        final.rename(prev)
    tmp.rename(final)
    fsync_dir(final.parent)
    if prev.exists():
        shutil.rmtree(prev)


def complete_dir(final: Path) -> Path | None:
    """``final`` if it holds the :data:`COMPLETE_MARKER`, else ``<name>.prev`` if that does, else ``None``."""
    for cand in (final, final.with_name(f"{final.name}.prev")):
        if (cand / COMPLETE_MARKER).is_file():
            return cand
    return None


# json.dumps(ensure_ascii=False) escapes C0 controls (\n, \r, \x0b, \x0c, \x1c-\x1e) but leaves
# NEL and the Unicode line/paragraph separators raw; str.splitlines() and many JSONL readers
# (JavaScript ones in particular) split on them.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def jsonl_line(obj: Any) -> bytes:
    """One JSONL line as UTF-8 bytes, ending in ``b"\\n"``.

    ``ensure_ascii=False`` keeps text readable; U+0085, U+2028 and U+2029 are escaped so no
    line-based reader ever splits a record. Strings with lone surrogates (undecodable file names,
    say) fall back to ASCII escapes for that line instead of failing.

    Raises:
        TypeError: ``obj`` holds something JSON cannot encode.
    """
    text = json.dumps(obj, ensure_ascii=False)
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        text = text.translate(_LINE_BREAKS)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True).encode("ascii") + b"\n"


def write_jsonl(records: Iterable[Any], path: str | Path) -> int:
    """Write ``records`` to ``path``, one JSON object a line (:func:`jsonl_line`); returns the count.

    The file is written to a temporary sibling and renamed into place, so a failure never
    leaves a half-written file at ``path`` (an older file there stays intact).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    n = 0
    try:
        with open(tmp, "wb", buffering=1 << 20) as f:
            for rec in records:
                f.write(jsonl_line(rec))
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def iter_jsonl_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` for each line of a UTF-8 file, numbers from 1.

    Lines are split on ``\\n`` only (``open(newline="\\n")``): U+2028, U+0085 and a lone ``\\r``
    inside a record never split it, unlike ``str.splitlines()``. The text keeps no ``\\n``.
    """
    with open(path, encoding="utf-8", newline="\n") as f:
        for i, line in enumerate(f, start=1):
            yield i, line.removesuffix("\n")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed object)`` for each non-blank line (numbers from 1).

    Lines are split on ``\\n`` only (:func:`iter_jsonl_lines`).

    Raises:
        ValueError: a line is not JSON (the message names the file and line).
    """
    for i, line in iter_jsonl_lines(path):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None


__all__ = [
    "COMPLETE_MARKER",
    "atomic_write_bytes",
    "atomic_write_text",
    "complete_dir",
    "fsync_dir",
    "iter_jsonl_lines",
    "jsonl_line",
    "read_json",
    "read_jsonl",
    "sha256_file",
    "write_dir_atomically",
    "write_json",
    "write_jsonl",
]
