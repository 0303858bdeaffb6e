"""Folder import throughput: ``python benchmarks/import_bench.py [--files N] [--workers K]``.

Makes ``N`` distinct real photo files (default 10,000) in a temporary folder from the shared cat
photos (``$CATREVIEW_SHARED_CATS`` or ``../shared/data/cats``): file ``i`` is shared photo
``i mod 330`` with a few unique bytes appended after the JPEG's end-of-image marker, so every
file has its own sha256 and still decodes to the same pixels. The files sit in one folder per
breed and are imported with ``--labels-from-folders`` semantics (so the import reviews are
written too), once inline (``workers=1``) and once with ``K`` worker processes (default: every
usable core), each into a fresh SQLite database, all in one run. Prints one JSON line:

``{"files", "cores", "workers", "inline_s", "inline_files_per_s", "pool_s", "pool_files_per_s",
"ratio", "extrapolated_127k_s", "extrapolated_127k_min"}``

``ratio`` is pool over inline files/s; the extrapolation divides 127,000 photos (the users'
collection) by the pool's files/s. The page cache is warmed before both runs (the files were
just written), so disk reads are not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
# catreview is imported inside the functions: each ``spawn`` worker of the pool imports this
# script again (as ``__mp_main__``), so its top level stays light (about 2 s of CPU per worker
# otherwise, for sqlmodel and friends, measured on the 2-core machine).

COLLECTION = 127_000


def make_files(src: Path, dest: Path, n: int) -> int:
    """Write ``n`` distinct JPEG files under ``dest/<Breed>/`` from the photos in ``src``; returns bytes written."""
    photos = sorted(src.glob("*/*.jpg"))
    if not photos:
        raise SystemExit(f"no photos in {src}: set CATREVIEW_SHARED_CATS to the shared cats folder")
    datas = [p.read_bytes() for p in photos]
    written = 0
    for i in range(n):
        k = i % len(photos)
        folder = dest / photos[k].parent.name
        folder.mkdir(parents=True, exist_ok=True)
        data = datas[k] + f"catreview-bench-{i}".encode()  # after the EOI marker: ignored by decoders
        (folder / f"{photos[k].stem}_{i}.jpg").write_bytes(data)
        written += len(data)
    return written


def timed_import(root: Path, db: Path, workers: int) -> float:
    """Seconds to import ``root`` into a fresh SQLite file ``db`` with ``workers`` processes."""
    from catreview.data.db import make_engine
    from catreview.data.importer import import_folder
    from catreview.data.labels import BreedVocabulary

    engine = make_engine(f"sqlite:///{db}")
    t0 = time.perf_counter()
    summary = import_folder(
        engine, root, vocabulary=BreedVocabulary.default(), labels_from_folders=True, workers=workers
    )
    seconds = time.perf_counter() - t0
    engine.dispose()
    if summary.failed or summary.duplicates or summary.added != summary.scanned:
        raise SystemExit(f"unexpected import result: {summary.lines()[:3]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=10_000, help="distinct photo files to import (default 10000)")
    p.add_argument("--workers", type=int, default=None, help="worker processes of the pool run (default: usable cores)")
    args = p.parse_args()
    from catreview.data.importer import usable_cores

    src = Path(os.environ.get("CATREVIEW_SHARED_CATS", REPO_ROOT.parent / "shared" / "data" / "cats"))
    workers = args.workers or usable_cores()
    with tempfile.TemporaryDirectory(prefix="catreview-import-bench-") as tmp:
        root = Path(tmp) / "photos"
        make_files(src, root, args.files)
        for path in root.glob("*/*.jpg"):  # warm the page cache for both runs alike
            path.read_bytes()
        inline_s = timed_import(root, Path(tmp) / "inline.db", 1)
        pool_s = timed_import(root, Path(tmp) / "pool.db", workers)
    inline_rate, pool_rate = args.files / inline_s, args.files / pool_s
    print(
        json.dumps(
            {
                "files": args.files,
                "cores": usable_cores(),
                "workers": workers,
                "inline_s": round(inline_s, 2),
                "inline_files_per_s": round(inline_rate, 1),
                "pool_s": round(pool_s, 2),
                "pool_files_per_s": round(pool_rate, 1),
                "ratio": round(pool_rate / inline_rate, 2),
                "extrapolated_127k_s": round(COLLECTION / pool_rate),
                "extrapolated_127k_min": round(COLLECTION / pool_rate / 60, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
