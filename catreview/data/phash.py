"""Perceptual hashes of the photos and a bucketed near-duplicate search.

* :func:`phash_hex`: ``str(imagehash.phash(img))``, the 64-bit DCT perceptual hash of the
  ImageHash library (grayscale, 32x32 LANCZOS, 2-D DCT, the 8x8 lowest frequencies against
  their median; https://github.com/JohannesBuchner/imagehash) as 16 hex characters, stored in
  ``images.phash``. The importer computes it from the decode it does anyway
  (:func:`catreview.data.images.scan_file`); :func:`backfill_phashes` fills photos imported before.
* :func:`near_duplicate_pairs` / :func:`duplicate_groups`: photos whose hashes differ in at most
  :data:`MAX_DISTANCE` of the 64 bits (Hamming distance), found without comparing all pairs:
  the hash is cut into 4 bands of 16 bits; two hashes within distance 7 share one band with at
  most one differing bit (pigeonhole: four bands with >= 2 differing bits each make >= 8), so
  each hash is looked up, per band, at its own band value and the 16 values one bit away (a
  sorted-array join, vectorised with NumPy), and only those candidates get the full distance.
  Cost ~ 4 x 17 lookups per distinct hash plus the candidates (for spread-out hashes, about
  2 per lookup at 127K photos), not N^2 / 2.

:data:`MAX_DISTANCE` = 6, measured on the 330 shared photos (``imagehash.phash``): a photo and its
resized (0.3-0.8x) and re-encoded (JPEG quality 50-90) copies differ by 0-2 bits; a 3% crop on
each side by 2-14 (median 6); two different shared photos by at least 12 (1 pair of 54,285 at
12, 3 at 14). 6 keeps re-encodes and most light crops, well below what different photos reach.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from PIL import Image
    from sqlalchemy.engine import Engine
    from sqlmodel import Session

PHASH_BITS = 64
PHASH_HEX = 16
#: Largest Hamming distance (bits of 64) at which two photos count as near duplicates (module docstring).
MAX_DISTANCE = 6
#: Largest ``max_distance`` the 4-band, 1-bit-probe search is exact for (pigeonhole bound).
SEARCH_LIMIT = 7
BANDS = 4
BAND_BITS = PHASH_BITS // BANDS

K = TypeVar("K", int, str)  # keys of duplicate_groups: image ids or sha256


def phash_hex(img: Image.Image) -> str:
    """``str(imagehash.phash(img))``: the 64-bit perceptual hash of a decoded photo, 16 lowercase hex."""
    import imagehash

    return str(imagehash.phash(img))


def phash_int(text: str) -> int:
    """A stored 16-hex hash as an unsigned 64-bit integer.

    Raises:
        ValueError: not 16 hex characters.
    """
    if len(text) != PHASH_HEX:
        raise ValueError(f"a perceptual hash has {PHASH_HEX} hex characters, got {text!r}")
    return int(text, 16)


def hamming(a: str, b: str) -> int:
    """Bits (0..64) in which two 16-hex hashes differ.

    Raises:
        ValueError: either is not 16 hex characters.
    """
    return (phash_int(a) ^ phash_int(b)).bit_count()


def near_duplicate_pairs(hashes: Sequence[str], max_distance: int = MAX_DISTANCE) -> list[tuple[int, int, int]]:
    """Pairs of positions ``(i, j, distance)``, ``i < j``, whose hashes differ in at most
    ``max_distance`` bits (identical hashes included, distance 0), sorted.

    The bucketed search of the module docstring, exact for ``max_distance <=`` :data:`SEARCH_LIMIT`.

    Raises:
        ValueError: ``max_distance`` outside 0..7, or a hash that is not 16 hex characters.
    """
    if not 0 <= max_distance <= SEARCH_LIMIT:
        raise ValueError(f"max_distance must be 0..{SEARCH_LIMIT} for the banded search, got {max_distance}")
    values = np.array([phash_int(h) for h in hashes], dtype=np.uint64)
    if len(values) < 2:
        return []
    uniq, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.reshape(-1)
    pairs: list[tuple[int, int, int]] = []
    # identical hashes: every pair of positions within one distinct value
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    for members in np.split(order, bounds):
        if len(members) > 1:
            m = sorted(int(x) for x in members)
            pairs += [(a, b, 0) for k, a in enumerate(m) for b in m[k + 1 :]]
    near = _distinct_pairs(uniq, max_distance)
    if near:
        positions = np.split(order, bounds)  # positions of each distinct value, in value order
        for u, v, d in near:
            pairs += [(min(int(a), int(b)), max(int(a), int(b)), d) for a in positions[u] for b in positions[v]]
    return sorted(pairs)


def _distinct_pairs(uniq: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """``(u, v, distance)``, ``u < v``, of distinct sorted uint64 values within ``max_distance`` (0 < d)."""
    n = len(uniq)
    if n < 2 or max_distance == 0:
        return []
    found: set[tuple[int, int]] = set()
    out: list[tuple[int, int, int]] = []
    idx = np.arange(n)
    masks = [0] + [1 << b for b in range(BAND_BITS)]
    for band in range(BANDS):
        key = ((uniq >> np.uint64(band * BAND_BITS)) & np.uint64((1 << BAND_BITS) - 1)).astype(np.int64)
        order = np.argsort(key, kind="stable")
        # bucket starts of the 2^16 band values (counting sort): a probe's matches are
        # order[starts[v]:starts[v + 1]], found by two gathers instead of a binary search
        starts = np.zeros((1 << BAND_BITS) + 1, dtype=np.int64)
        np.cumsum(np.bincount(key, minlength=1 << BAND_BITS), out=starts[1:])
        for mask in masks:
            probe = key ^ mask
            lo = starts[probe]
            cnt = starts[probe + 1] - lo
            total = int(cnt.sum())
            if total == 0:
                continue
            src = np.repeat(idx, cnt)
            offset = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            dst = order[np.repeat(lo, cnt) + offset]
            keep = src < dst
            src, dst = src[keep], dst[keep]
            dist = np.bitwise_count(uniq[src] ^ uniq[dst]).astype(np.int64)
            ok = dist <= max_distance
            for u, v, d in zip(src[ok].tolist(), dst[ok].tolist(), dist[ok].tolist()):
                if (u, v) not in found:
                    found.add((u, v))
                    out.append((u, v, d))
    return out


def duplicate_groups(hashes: Mapping[K, str], max_distance: int = MAX_DISTANCE) -> list[list[K]]:
    """Groups (connected components) of keys whose hashes chain within ``max_distance`` bits;
    only groups of 2 or more, each sorted, the groups sorted by their first key.

    Chaining is on purpose: if A~B and B~C, A, B and C are one group even when A and C differ
    more (an exporter keeping a group in one split must keep all three together).

    Args:
        hashes: ``{key: 16-hex phash}`` (keys: sha256 or image ids).

    Raises:
        ValueError: as :func:`near_duplicate_pairs`.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keys = list(hashes)
    if len(keys) < 2:
        return []
    if not 0 <= max_distance <= SEARCH_LIMIT:
        raise ValueError(f"max_distance must be 0..{SEARCH_LIMIT} for the banded search, got {max_distance}")
    values = np.array([phash_int(hashes[k]) for k in keys], dtype=np.uint64)
    uniq, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.reshape(-1)
    near = _distinct_pairs(uniq, max_distance)  # components over distinct values; equal hashes share one
    if near:
        a = np.array([p[0] for p in near])
        b = np.array([p[1] for p in near])
        graph = coo_matrix((np.ones(len(near)), (a, b)), shape=(len(uniq), len(uniq)))
        _, comp = connected_components(graph, directed=False)
    else:
        comp = np.arange(len(uniq))
    members: dict[int, list[K]] = {}
    for key, u in zip(keys, inverse.tolist()):
        members.setdefault(int(comp[u]), []).append(key)
    groups = [sorted(m) for m in members.values() if len(m) > 1]
    return sorted(groups, key=lambda g: g[0])


def stored_groups(
    session: Session, shas: Iterable[str] | None = None, max_distance: int = MAX_DISTANCE
) -> list[list[str]]:
    """Near-duplicate groups (sha256 lists, :func:`duplicate_groups`) of the stored photos that
    have a perceptual hash, restricted to ``shas`` when given (one streamed query)."""
    from sqlmodel import col, select

    from catreview.data.db import ImageRecord

    wanted = set(shas) if shas is not None else None
    q = (
        select(col(ImageRecord.sha256), col(ImageRecord.phash))
        .where(col(ImageRecord.phash).is_not(None))
        .execution_options(yield_per=5000)
    )
    hashes = {sha: ph for sha, ph in session.exec(q) if ph is not None and (wanted is None or sha in wanted)}
    return duplicate_groups(hashes, max_distance)


def phash_file(path: str) -> tuple[str | None, str | None]:
    """``(phash, None)`` of the photo at ``path`` decoded like every photo
    (:func:`catreview.data.images.load_rgb`), or ``(None, reason)`` when it cannot be decoded."""
    from catreview.data.images import ImageDecodeError, load_rgb

    try:
        return phash_hex(load_rgb(path)), None
    except ImageDecodeError as exc:
        return None, str(exc)


def backfill_phashes(
    engine: Engine,
    *,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, list[tuple[str, str]]]:
    """Compute ``images.phash`` for decodable photos that have none (imported before the importer
    computed it), ``batch_size`` photos per transaction (keyset by id, so a stopped run resumes).

    Returns:
        ``(photos hashed, [(path, reason)] of photos whose file no longer decodes)``; those keep
        ``phash`` ``None`` (their stored ``error`` is the importer's to set, not changed here).
    """
    from sqlalchemy import update
    from sqlmodel import Session, col, func, select

    from catreview.data.db import ImageRecord

    todo = (col(ImageRecord.phash).is_(None), col(ImageRecord.error).is_(None))
    with Session(engine) as s:
        total = int(s.exec(select(func.count()).select_from(ImageRecord).where(*todo)).one())
    done = 0
    failed: list[tuple[str, str]] = []
    last = 0
    while True:
        with Session(engine) as s:
            q = (
                select(col(ImageRecord.id), col(ImageRecord.path))
                .where(*todo, col(ImageRecord.id) > last)
                .order_by(col(ImageRecord.id))
                .limit(batch_size)
            )
            batch = [(int(i), p) for i, p in s.exec(q) if i is not None]
            if not batch:
                break
            for image_id, path in batch:
                ph, reason = phash_file(path)
                if ph is None:
                    failed.append((path, reason or "cannot decode"))
                    continue
                s.exec(
                    update(ImageRecord)
                    .where(col(ImageRecord.id) == image_id, col(ImageRecord.phash).is_(None))
                    .values(phash=ph)
                )
                done += 1
            s.commit()
            last = batch[-1][0]
        if progress:
            progress(done + len(failed), total)
    return done, failed


__all__ = [
    "BANDS",
    "BAND_BITS",
    "MAX_DISTANCE",
    "PHASH_HEX",
    "SEARCH_LIMIT",
    "backfill_phashes",
    "duplicate_groups",
    "hamming",
    "near_duplicate_pairs",
    "phash_file",
    "phash_hex",
    "phash_int",
    "stored_groups",
]
