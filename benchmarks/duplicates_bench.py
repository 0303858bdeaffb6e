"""Benchmark: perceptual hashes at import, and the banded near-duplicate search at the users' scale.

Usage::

    python benchmarks/duplicates_bench.py                    # 127,000 synthetic hashes, the shared photos
    python benchmarks/duplicates_bench.py --hashes 20000     # another size
    python benchmarks/duplicates_bench.py --photos DIR       # decode cost on other photos

Printed, one JSON line each (ratios are measured in this one run, so a busy machine slows both sides):

* ``scan``: :func:`catreview.data.images.scan_file` (hash + decode, what the importer runs per
  file) with the perceptual hash against the same decode without it (``decoded_size``), over
  the photos in ``--photos`` (default: the shared photos): seconds of each and the ratio.
* ``search``: :func:`catreview.data.phash.duplicate_groups` on N random 64-bit hashes with 100
  planted near copies (0-7 bits away): seconds, groups found (100 expected), and the seconds of an
  all-pairs NumPy distance computation on the first 5,000 hashes scaled to N (N^2 / 2 pairs).
* ``lookup``: :meth:`catreview.evaluate.duplicates.PhashIndex.near` per photo (build seconds,
  mean milliseconds per lookup over 1,000 lookups).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from catreview.data.images import decoded_size, iter_image_files, scan_file  # noqa: E402
from catreview.data.phash import duplicate_groups  # noqa: E402
from catreview.evaluate.duplicates import PhashIndex  # noqa: E402


def bench_scan(folder: Path) -> dict[str, object]:
    files = [str(p) for p in iter_image_files(folder, on_error=lambda exc: None)]
    for f in files[:5]:  # warm up both paths (the first phash imports ImageHash and SciPy, ~1 s)
        scan_file(f)
        decoded_size(io.BytesIO(Path(f).read_bytes()), f)
    t0 = time.perf_counter()
    for f in files:
        scan_file(f)
    with_hash = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in files:
        decoded_size(io.BytesIO(Path(f).read_bytes()), f)
    without = time.perf_counter() - t0
    return {
        "bench": "scan",
        "files": len(files),
        "scan_with_phash_s": round(with_hash, 3),
        "decode_only_s": round(without, 3),
        "ratio": round(with_hash / without, 3),
    }


def synthetic(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vals = rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, size=n, dtype=np.uint64)
    hashes = [f"{int(v):016x}" for v in vals]
    for i in range(100):
        v = int(vals[i])
        for b in rng.choice(64, size=i % 8, replace=False):
            v ^= 1 << int(b)
        hashes.append(f"{v:016x}")
    return hashes


def bench_search(n: int) -> dict[str, object]:
    hashes = synthetic(n)
    t0 = time.perf_counter()
    groups = duplicate_groups(dict(enumerate(hashes)), 7)
    banded = time.perf_counter() - t0
    m = min(5000, len(hashes))
    v = np.array([int(h, 16) for h in hashes[:m]], dtype=np.uint64)
    t0 = time.perf_counter()
    for i in range(m):
        np.bitwise_count(v[i + 1 :] ^ v[i])
    pairs_s = (time.perf_counter() - t0) * (len(hashes) / m) ** 2
    return {
        "bench": "search",
        "hashes": len(hashes),
        "banded_s": round(banded, 3),
        "groups": len(groups),
        "all_pairs_estimated_s": round(pairs_s, 1),
        "speedup": round(pairs_s / banded, 1),
    }


def bench_lookup(n: int) -> dict[str, object]:
    hashes = synthetic(n)
    t0 = time.perf_counter()
    index = PhashIndex(enumerate(hashes))
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for h in hashes[:1000]:
        index.near(h)
    per = (time.perf_counter() - t0) / 1000
    return {"bench": "lookup", "hashes": len(hashes), "build_s": round(build, 3), "lookup_ms": round(per * 1000, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hashes", type=int, default=127_000)
    p.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "cats")
    args = p.parse_args(argv)
    if args.photos.is_dir():
        print(json.dumps(bench_scan(args.photos)))
    print(json.dumps(bench_search(args.hashes)))
    print(json.dumps(bench_lookup(args.hashes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
