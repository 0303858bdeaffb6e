"""Split assignment, per-breed caps and train oversampling of an export (pure functions of the seed).

Split rules (:func:`assign_splits`): stratified 80/10/10 by breed, deterministic for a seed;
one record per photo *content* (sha256), so equal bytes can never sit in two splits; a photo
keeps its split across exports (table ``split_assignments``) unless ``resplit=True``; new photos
go wherever their breed is furthest below its target counts; a group of near duplicates (same
perceptual hash within a few bits) is placed as one unit, so a photo and its resized or re-encoded
copy never sit in two splits. ``SplitAssignment.split`` holds
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
from collections.abc import Iterable, Mapping, Sequence
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
    groups: Iterable[Iterable[str]] | None = None,
) -> dict[str, str]:
    """Stratified split assignment by breed, near-duplicate groups kept in one split.

    Args:
        labels: ``{sha256: breed}`` of the photos to export.
        existing: ``{sha256: split}`` sticky assignments (folder names); these are kept, except
            inside a group whose members were assigned to different splits (below).
        seed: orders new photos (different seeds, different assignments).
        fractions: train/validation/test shares.
        groups: sets of sha256 that must share a split (near duplicates by perceptual hash,
            :func:`catreview.data.phash.duplicate_groups`); members not in ``labels`` are ignored.

    Returns:
        ``{sha256: split}`` for every photo in ``labels``. Per breed, the targets are
        :func:`largest_remainder` of the breed's photo count. Units (a group, or a photo in no
        group) are placed in seeded hash order (a group's key: its smallest member's); a new unit
        goes to the split furthest below its targets summed over its members' breeds, ties to
        train, validation, test (for a single photo: exactly the per-breed rule). A group with
        sticky members takes their split; if they disagree it takes ``train`` when any member is
        in train (a model may have been fitted on that photo, so none of its near copies may be
        held out), else the split most of them hold (ties in split order), and the other
        members' assignments change. Without groups and existing assignments the targets are met
        exactly.
    """
    existing = existing or {}
    unit_of: dict[str, int] = {}
    units: list[list[str]] = []
    for group in groups or ():
        members = sorted({sha for sha in group if sha in labels and sha not in unit_of})  # first group wins
        if len(members) < 2:
            continue
        for sha in members:
            unit_of[sha] = len(units)
        units.append(members)
    for sha in sorted(labels):
        if sha not in unit_of:
            unit_of[sha] = len(units)
            units.append([sha])
    targets: dict[str, list[int]] = {}
    counts = Counter(labels.values())
    for breed, n in counts.items():
        targets[breed] = largest_remainder(n, fractions)
    current: dict[str, Counter[str]] = defaultdict(Counter)
    out: dict[str, str] = {}
    new: list[list[str]] = []
    for members in units:
        held = [existing[sha] for sha in members if sha in existing]
        if not held:
            new.append(members)
            continue
        if len(set(held)) == 1:
            split = held[0]
        elif "train" in held:
            split = "train"
        else:
            split = max(SPLITS, key=lambda sp: (held.count(sp), -SPLITS.index(sp)))
        for sha in members:
            out[sha] = split
            current[labels[sha]][split] += 1
    new.sort(key=lambda m: min(_rank(seed, sha, "split") for sha in m))
    for members in new:
        breeds = [labels[sha] for sha in members]

        def deficit(k: int, breeds: list[str] = breeds) -> tuple[int, int]:
            return sum(targets[b][k] - current[b][SPLITS[k]] for b in breeds), -k

        split = SPLITS[max(range(len(SPLITS)), key=deficit)]
        for sha, breed in zip(members, breeds):
            out[sha] = split
            current[breed][split] += 1
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
