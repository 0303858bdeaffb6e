"""The fast path: reviewed rows straight to one LLaVA JSONL file, no image copying.

127K rows in ~4 s on 2 CPU cores (``benchmarks/export_bench.py``); the records are the ones
:func:`catreview.export.dataset.export_dataset` writes, with ``image`` relative to the photos' folder.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catreview.data.labels import BreedVocabulary, is_breed
from catreview.export.conversations import IMPORTED_CONFIDENCE, build_record
from catreview.export.rows import ReviewedRow
from catreview.export.traits import TraitTable, load_breed_traits
from catreview.files import write_jsonl


@dataclass
class JsonlResult:
    """What :func:`write_llava_jsonl` wrote: ``image_root`` is the folder image paths are
    relative to (LLaVA's ``--image_folder``), absolute but with symlinks kept as imported."""

    path: Path
    n_records: int
    image_root: Path
    skipped: dict[str, int] = field(default_factory=dict)


def write_llava_jsonl(
    rows: Iterable[ReviewedRow],
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    traits: TraitTable | None = None,
    vocabulary: BreedVocabulary | None = None,
    imported_confidence: float = IMPORTED_CONFIDENCE,
) -> JsonlResult:
    """Fast path: one LLaVA JSONL record per row, pointing at the original photos (no copying).

    Args:
        rows: reviewed rows (e.g. :func:`catreview.export.rows.iter_reviewed_rows`); rows whose
            label is not a breed are skipped and counted. Streamed when ``image_root`` is given
            (or ``rows`` is a sequence); an iterator without ``image_root`` is read into a list
            first, since the default root needs every path.
        path: output file (written atomically).
        image_root: folder the ``image`` paths are made relative to; default the deepest folder
            holding every photo. Photos outside it raise.
        traits: trait table (default ``assets/breed_traits.json``).

    Paths are taken as the photos were imported (``os.path.abspath``, symlinks **not**
    resolved), so the default ``image_root`` is the folder the user imported from, e.g.
    ``/tmp/shared/data/cats`` even when ``/tmp/shared`` links to ``/work/shared``: it is the
    path people know and pass to LLaVA's ``--image_folder``, and a photo folder that holds
    symlinked files keeps them inside it. An ``image_root`` given through another path to the same
    folder (the link's target, or a link to it) also works: a photo not under it by name is
    compared by resolved path.

    Raises:
        ValueError: a photo lies outside ``image_root``.
    """
    skipped: Counter[str] = Counter()
    table = traits or load_breed_traits()
    if image_root is None:
        rows = rows if isinstance(rows, Sequence) else list(rows)
        folders = {os.path.dirname(os.path.abspath(r.path)) for r in rows if is_breed(r.label)}
        root = os.path.commonpath(list(folders)) if folders else "."
    else:
        root = os.path.abspath(image_root)
    prefix = root.rstrip(os.sep) + os.sep
    real_prefix = os.path.realpath(root).rstrip(os.sep) + os.sep

    def relative(p: str) -> str | None:
        if p.startswith(prefix):
            return p[len(prefix) :]
        real = os.path.realpath(p)  # only for photos not under image_root by name (rare, slower)
        return real[len(real_prefix) :] if real.startswith(real_prefix) else None

    def records() -> Iterator[dict[str, Any]]:
        for r in rows:
            if not is_breed(r.label):
                skipped[r.label] += 1
                continue
            p = os.path.abspath(r.path)
            rel = relative(p)
            if rel is None:
                raise ValueError(f"photo {p} is outside image_root {root}")
            rel = rel.replace(os.sep, "/")
            yield build_record(r, rel, traits=table, vocabulary=vocabulary, imported_confidence=imported_confidence)

    n = write_jsonl(records(), path)
    return JsonlResult(Path(path), n, Path(root), dict(skipped))


__all__ = ["JsonlResult", "write_llava_jsonl"]
