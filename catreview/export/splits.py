"""Split assignment, per-breed caps and train oversampling of an export (pure functions of the seed).

Split rules (:func:`assign_splits`): stratified 80/10/10 by breed, deterministic for a seed;
one record per photo *content* (sha256), so equal bytes can never sit in two splits; a photo
keeps its split across exports (table ``split_assignments``) unless ``resplit=True``; new photos
go wherever their breed is furthest below its target counts. ``SplitAssignment.split`` holds
``train``/``val``/``test`` (the column is 8 characters); folders use ``validation``.

Oversampling (:func:`oversample_copies`) repeats train records of minority breeds, up to the
largest breed's train count but at most :data:`OVERSAMPLE_MAX_FACTOR` times a breed's own
count; validation and test are never oversampled. :func:`cap_rows` keeps at most that many
photos of a breed (chosen by a seeded hash), before splitting.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

SPLITS = ("train", "validation", "test")
#: Folder split name -> value stored in ``SplitAssignment.split`` (an 8-character column).
DB_SPLIT = {"train": "train", "validation": "val", "test": "test"}
FROM_DB_SPLIT = {v: k for k, v in DB_SPLIT.items()}
FRACTIONS = (0.8, 0.1, 0.1)
OVERSAMPLE_MAX_FACTOR = 10


class Labelled(Protocol):
    """Anything with a photo's ``sha256`` and its ``label`` (a ``ReviewedRow``, a ``LabelledPhoto``)."""

    @property
    def sha256(self) -> str: ...

    @property
    def label(self) -> str: ...


P = TypeVar("P", bound=Labelled)


def _rank(seed: int, sha256: str, purpose: str) -> bytes:
    """Seeded pseudo-random sort key of a photo (same seed, same order on every machine)."""
    return hashlib.sha256(f"{purpose}:{seed}:{sha256}".encode()).digest()


def largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into integer counts proportional to ``fractions`` (summing to ``n``).

    Floors first, then the leftover items go to the largest remainders, earlier splits first
    on ties: 10 -> [8, 1, 1], 4 -> [3, 1, 0], 1 -> [1, 0, 0].
    """
    raw = [n * f for f in fractions]
    counts = [math.floor(x + 1e-9) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_splits(
    labels: Mapping[str, str],
    existing: Mapping[str, str] | None = None,
    *,
    seed: int = 0,
    fractions: Sequence[float] = FRACTIONS,
) -> dict[str, str]:
    """Stratified split assignment by breed.

    Args:
        labels: ``{sha256: breed}`` of the photos to export.
        existing: ``{sha256: split}`` sticky assignments (folder names); these are kept.
        seed: orders new photos (different seeds, different assignments).
        fractions: train/validation/test shares.

    Returns:
        ``{sha256: split}`` for every photo in ``labels``. Per breed, the targets are
        :func:`largest_remainder` of the breed's photo count; each new photo (in seeded hash
        order) goes to the split furthest below its target, ties to train, validation, test.
        Without existing assignments the targets are met exactly.
    """
    existing = existing or {}
    by_breed: dict[str, list[str]] = defaultdict(list)
    for sha, breed in labels.items():
        by_breed[breed].append(sha)
    out: dict[str, str] = {}
    for breed in sorted(by_breed):
        members = by_breed[breed]
        targets = largest_remainder(len(members), fractions)
        current: Counter[str] = Counter()
        for sha in members:
            if sha in existing:
                out[sha] = existing[sha]
                current[existing[sha]] += 1
        new = sorted((s for s in members if s not in existing), key=lambda s: _rank(seed, s, "split"))
        for sha in new:
            i = max(range(len(SPLITS)), key=lambda k: (targets[k] - current[SPLITS[k]], -k))
            out[sha] = SPLITS[i]
            current[SPLITS[i]] += 1
    return out


def cap_rows(rows: Sequence[P], cap: int | None, *, seed: int = 0) -> tuple[list[P], int]:
    """Keep at most ``cap`` photos per breed (seeded hash order); returns ``(kept, n_dropped)``,
    ``kept`` sorted by sha256 (``rows`` as given when ``cap`` is ``None``)."""
    if cap is None:
        return list(rows), 0
    by_breed: dict[str, list[P]] = defaultdict(list)
    for r in rows:
        by_breed[r.label].append(r)
    kept: list[P] = []
    for members in by_breed.values():
        kept += sorted(members, key=lambda r: _rank(seed, r.sha256, "cap"))[:cap]
    kept.sort(key=lambda r: r.sha256)
    return kept, len(rows) - len(kept)


def oversample_copies(
    train: Mapping[str, Sequence[str]], *, seed: int = 0, max_factor: int = OVERSAMPLE_MAX_FACTOR
) -> dict[str, int]:
    """Extra copies per photo that bring each breed's train count up to the largest one.

    Args:
        train: ``{breed: [sha256, ...]}`` of the train split.
        max_factor: a breed grows to at most ``max_factor`` times its own count.

    Returns:
        ``{sha256: extra copies}`` (only photos with at least one copy); copies are spread
        evenly, the remainder going to photos in seeded hash order.
    """
    if not train:
        return {}
    target = max(len(v) for v in train.values())
    copies: dict[str, int] = {}
    for shas in train.values():
        n = len(shas)
        if n == 0:
            continue
        extra = min(target, n * max_factor) - n
        if extra <= 0:
            continue
        ordered = sorted(shas, key=lambda s: _rank(seed, s, "oversample"))
        for i, sha in enumerate(ordered):
            k = extra // n + (1 if i < extra % n else 0)
            if k:
                copies[sha] = k
    return copies


__all__ = [
    "DB_SPLIT",
    "FRACTIONS",
    "FROM_DB_SPLIT",
    "OVERSAMPLE_MAX_FACTOR",
    "SPLITS",
    "Labelled",
    "assign_splits",
    "cap_rows",
    "largest_remainder",
    "oversample_copies",
]
