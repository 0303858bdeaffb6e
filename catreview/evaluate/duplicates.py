"""Exact and near duplicates among the photos, and those whose labels conflict.

Equal bytes are already one photo (one ``images`` row per sha256, the importer reports the
copies). Here a *duplicate* is another photo whose perceptual hash (``images.phash``,
:mod:`catreview.data.phash`) is equal (distance 0: "exact") or differs in at most
:data:`catreview.data.phash.MAX_DISTANCE` bits ("near"): a resized, re-encoded or lightly cropped
copy. Both are found with the banded search of :mod:`catreview.data.phash`, never all pairs.

* :func:`duplicates_of` (the review view, one photo): served by an in-process
  :class:`PhashIndex` of every hashed photo, built once (~3 s at 127K photos on 2 cores) and
  rebuilt when the set of hashed photos changed (checked by one aggregate query per call);
  a lookup is 4 x 17 bucket reads.
* :func:`conflicting_duplicates` (a list for reviewers): every duplicate group whose photos'
  current labels name different breeds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from catreview.data.counts import totals
from catreview.data.db import ImageRecord, Review
from catreview.data.labels import SPECIAL_LABELS
from catreview.data.phash import BAND_BITS, BANDS, MAX_DISTANCE, SEARCH_LIMIT, duplicate_groups, phash_int


@dataclass(frozen=True)
class DuplicateMember:
    """One photo of a duplicate relation.

    Attributes:
        image_id, path: the photo.
        label: its current label (``None``: unlabelled); ``source``: the current review's source
            (``"import"`` = an imported, unverified label).
        distance: Hamming distance (bits, 0..64) of its perceptual hash to the photo asked about
            (:func:`duplicates_of`) or to the group's first photo (:func:`conflicting_duplicates`).
    """

    image_id: int
    path: str
    label: str | None
    source: str | None
    distance: int

    @property
    def kind(self) -> str:
        """``"exact"`` (same perceptual hash) or ``"near"``."""
        return "exact" if self.distance == 0 else "near"


@dataclass
class DuplicateGroup:
    """Photos that chain within the distance threshold; ``labels``: the distinct breed labels."""

    members: list[DuplicateMember]
    labels: list[str] = field(default_factory=list)

    @property
    def conflicting(self) -> bool:
        """Two or more different breed labels among the members."""
        return len(self.labels) > 1


class PhashIndex:
    """Every hashed, decodable photo's perceptual hash, bucketed for near-duplicate lookups.

    Built from one streamed query; :meth:`near` finds the photos within ``max_distance`` bits
    (<= :data:`~catreview.data.phash.SEARCH_LIMIT`) of a hash with 4 bands x 17 probes.
    """

    def __init__(self, rows: Iterable[tuple[int, str]]) -> None:
        ids: list[int] = []
        values: list[int] = []
        for image_id, ph in rows:
            ids.append(int(image_id))
            values.append(phash_int(ph))
        self.ids = np.array(ids, dtype=np.int64)
        self.values = np.array(values, dtype=np.uint64)
        self._bands: list[tuple[np.ndarray, np.ndarray]] = []
        for band in range(BANDS):
            key = ((self.values >> np.uint64(band * BAND_BITS)) & np.uint64((1 << BAND_BITS) - 1)).astype(np.int64)
            order = np.argsort(key, kind="stable")
            starts = np.zeros((1 << BAND_BITS) + 1, dtype=np.int64)
            np.cumsum(np.bincount(key, minlength=1 << BAND_BITS), out=starts[1:])
            self._bands.append((order, starts))

    def __len__(self) -> int:
        return len(self.ids)

    def near(self, phash: str, max_distance: int = MAX_DISTANCE) -> list[tuple[int, int]]:
        """``(image_id, distance)`` of the indexed photos within ``max_distance`` bits of
        ``phash`` (the photo itself included, at distance 0), sorted by distance then id.

        Raises:
            ValueError: ``max_distance`` outside 0..7 or a malformed hash.
        """
        if not 0 <= max_distance <= SEARCH_LIMIT:
            raise ValueError(f"max_distance must be 0..{SEARCH_LIMIT}, got {max_distance}")
        v = phash_int(phash)
        hits: set[int] = set()
        for band, (order, starts) in enumerate(self._bands):
            key = (v >> (band * BAND_BITS)) & ((1 << BAND_BITS) - 1)
            for mask in [0] + [1 << b for b in range(BAND_BITS)]:
                probe = key ^ mask
                hits.update(order[starts[probe] : starts[probe + 1]].tolist())
        if not hits:
            return []
        pos = np.fromiter(hits, dtype=np.int64, count=len(hits))
        dist = np.bitwise_count(self.values[pos] ^ np.uint64(v)).astype(np.int64)
        ok = dist <= max_distance
        return sorted(zip(self.ids[pos[ok]].tolist(), dist[ok].tolist()), key=lambda t: (t[1], t[0]))


_HASHED = (col(ImageRecord.phash).is_not(None), col(ImageRecord.error).is_(None))
_indexes: dict[str, tuple[tuple[int, int, int], PhashIndex]] = {}
_lock = threading.Lock()


def phash_index(engine: Engine) -> PhashIndex:
    """The cached :class:`PhashIndex` of ``engine``'s database, rebuilt when its stamp changed
    since it was built: the stored number of decodable photos (one primary-key read), the largest
    hashed photo id and the smallest id without a hash (which a backfill, working in id order,
    moves). Two ``LIMIT``-style index reads per call, never a count over the table."""
    key = str(engine.url)
    with Session(engine) as s:
        photos = totals(s).photos
        top = s.execute(sa_select(func.max(col(ImageRecord.id))).where(*_HASHED)).scalar()
        unhashed = s.execute(sa_select(func.min(col(ImageRecord.id))).where(col(ImageRecord.phash).is_(None))).scalar()
        stamp = (int(photos), int(top or 0), int(unhashed or 0))
        with _lock:
            cached = _indexes.get(key)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        q = sa_select(col(ImageRecord.id), col(ImageRecord.phash)).where(*_HASHED).execution_options(yield_per=5000)
        index = PhashIndex((int(i), str(p)) for i, p in s.execute(q))
    with _lock:
        _indexes[key] = (stamp, index)
    return index


def _members(session: Session, hits: list[tuple[int, int]]) -> list[DuplicateMember]:
    """Members for ``(image_id, distance)`` hits, in that order, with current labels."""
    if not hits:
        return []
    q = (
        sa_select(col(ImageRecord.id), col(ImageRecord.path), col(Review.label), col(Review.source))
        .outerjoin(Review, col(Review.id) == col(ImageRecord.current_review_id))
        .where(col(ImageRecord.id).in_([i for i, _ in hits]))
    )
    info = {int(i): (p, lab, src) for i, p, lab, src in session.execute(q)}
    return [DuplicateMember(i, info[i][0], info[i][1], info[i][2], d) for i, d in hits if i in info]


def duplicates_of(engine: Engine, image_id: int, max_distance: int = MAX_DISTANCE) -> list[DuplicateMember]:
    """The other photos whose perceptual hash is within ``max_distance`` bits of photo
    ``image_id``'s (exact first, then by distance and id); ``[]`` when the photo has no hash
    (not decodable, or imported before hashes: run :func:`catreview.data.phash.backfill_phashes`).

    Raises:
        ValueError: no photo with ``image_id``, or ``max_distance`` outside 0..7.
    """
    with Session(engine) as s:
        row = s.get(ImageRecord, image_id)
        if row is None:
            raise ValueError(f"no photo with id {image_id}")
        phash = row.phash if row.error is None else None
    if phash is None:
        return []
    hits = [(i, d) for i, d in phash_index(engine).near(phash, max_distance) if i != image_id]
    with Session(engine) as s:
        return _members(s, hits)


def duplicate_line(members: list[DuplicateMember], label: str | None) -> str:
    """One line for the review view: ``""`` without duplicates, else e.g. ``"2 duplicates:
    #12 (exact, Ragdoll: conflicts), #40 (near 4 bits, Birman)"``; a duplicate whose breed label
    differs from ``label`` is marked ``conflicts``."""
    if not members:
        return ""
    parts = []
    for m in members:
        what = "exact" if m.distance == 0 else f"near {m.distance} bits"
        lab = m.label or "unlabelled"
        clash = (
            m.label is not None
            and label is not None
            and m.label != label
            and m.label not in SPECIAL_LABELS
            and label not in SPECIAL_LABELS
        )
        parts.append(f"#{m.image_id} ({what}, {lab}{': conflicts' if clash else ''})")
    noun = "duplicate" if len(members) == 1 else "duplicates"
    return f"{len(members)} {noun}: " + ", ".join(parts)


def duplicate_groups_with_labels(
    engine: Engine, max_distance: int = MAX_DISTANCE, *, conflicting_only: bool = True
) -> list[DuplicateGroup]:
    """Duplicate groups of all hashed photos (:func:`catreview.data.phash.duplicate_groups`:
    chained within ``max_distance``), each member's distance measured to the group's first
    photo; with ``conflicting_only``, only groups whose members carry different breed labels.
    Sorted by the first member's id."""
    with Session(engine) as s:
        q = sa_select(col(ImageRecord.id), col(ImageRecord.phash)).where(*_HASHED).execution_options(yield_per=5000)
        hashes = {int(i): str(p) for i, p in s.execute(q)}
        groups = duplicate_groups(hashes, max_distance)
        out = []
        for ids in groups:
            ref = phash_int(hashes[ids[0]])
            hits = [(i, (phash_int(hashes[i]) ^ ref).bit_count()) for i in ids]
            members = _members(s, hits)
            labels = sorted({m.label for m in members if m.label is not None and m.label not in SPECIAL_LABELS})
            group = DuplicateGroup(members, labels)
            if group.conflicting or not conflicting_only:
                out.append(group)
    return out


def conflicting_duplicates(engine: Engine, max_distance: int = MAX_DISTANCE) -> list[DuplicateGroup]:
    """Duplicate groups whose photos' current labels name different breeds (for reviewers)."""
    return duplicate_groups_with_labels(engine, max_distance, conflicting_only=True)


__all__ = [
    "DuplicateGroup",
    "DuplicateMember",
    "PhashIndex",
    "conflicting_duplicates",
    "duplicate_groups_with_labels",
    "duplicate_line",
    "duplicates_of",
    "phash_index",
]
