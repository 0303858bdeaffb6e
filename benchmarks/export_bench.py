"""Benchmark: reviewed rows -> LLaVA JSONL (the ``jsonl_only`` fast path, no image copying).

Usage::

    python benchmarks/export_bench.py                 # 10,000 and 127,000 synthetic rows
    python benchmarks/export_bench.py --with-db       # also: rows read from a SQLite database

Rows are synthetic but shaped like the users' data: the 67 classes with a long-tailed
distribution (Domestic Short Hair dominates, as in the Petfinder-derived set), half the reviews
carrying a model snapshot (stage-1 top-3, VLM probabilities, fused label), a few notes with
newlines and U+2028. Timed: :func:`catreview.export.llava_jsonl.write_llava_jsonl` (record building + JSON +
atomic write); with ``--with-db`` also :func:`catreview.export.rows.collect_reviewed_rows` on a
database holding the same rows. Goal: under 10 s for 127,000 rows.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catreview.data.labels import BreedVocabulary
from catreview.export.llava_jsonl import write_llava_jsonl
from catreview.export.rows import ReviewedRow, collect_reviewed_rows
from catreview.export.traits import load_breed_traits

GOAL_S = 10.0


def synthetic_rows(n: int, seed: int = 0) -> list[ReviewedRow]:
    """``n`` reviewed rows over the 67 classes, Zipf-like class frequencies."""
    rng = random.Random(seed)
    names = BreedVocabulary.default().names
    weights = [1.0 / (i + 1) for i in range(len(names))]
    order = sorted(names, key=lambda n: n != "Domestic Short Hair")  # DSH first: most frequent
    labels = rng.choices(order, weights=weights, k=n)
    rows = []
    for i, label in enumerate(labels):
        sha = hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()
        snapshot = None
        if i % 2:
            cands = rng.sample(names, 3)
            pred = label if i % 3 else cands[0]
            snapshot = {
                "stage1": [[c, round(rng.random(), 4)] for c in cands],
                "vlm": {cands[0]: 0.5, cands[1]: 0.3, "other": 0.2},
                "fused": {"label": pred, "probability": 0.61},
                "model_versions": {"stage1": "convnext_tiny@3f2a", "vlm": "llava-1.5-7b@p1"},
            }
        note = "first line\nsecond\u2028third" if i % 97 == 0 else None
        source, annotator = ("import", "import") if i % 4 == 0 else ("ui", f"annotator{i % 5}")
        rows.append(
            ReviewedRow(
                i, sha, f"/data/cats/{label.replace(' ', '_')}/{i}.jpg", label, annotator, source, note, snapshot
            )
        )
    return rows


def bench_write(n: int, out_dir: Path) -> float:
    rows = synthetic_rows(n)
    traits = load_breed_traits()
    t0 = time.perf_counter()
    res = write_llava_jsonl(rows, out_dir / f"rows{n}.jsonl", traits=traits)
    dt = time.perf_counter() - t0
    size = (out_dir / f"rows{n}.jsonl").stat().st_size
    assert res.n_records == n
    print(f"write_llava_jsonl  {n:>7,} rows: {dt:6.2f} s  {n / dt:>9,.0f} rows/s  ({size / 1e6:.0f} MB)")
    return dt


def bench_db(n: int, out_dir: Path) -> float:
    import json

    from sqlmodel import Session

    from catreview.data.db import ImageRecord, Review, make_engine

    engine = make_engine(f"sqlite:///{out_dir / 'bench.db'}")
    rows = synthetic_rows(n)
    t0 = time.perf_counter()
    with Session(engine) as s:
        s.add_all(
            ImageRecord(id=r.image_id + 1, sha256=r.sha256, path=r.path, size=1, width=500, height=375) for r in rows
        )
        s.flush()
        s.add_all(
            Review(image_id=r.image_id + 1, annotator=r.annotator, label=r.label, source=r.source, note=r.note,
                   model_snapshot_json=json.dumps(r.snapshot) if r.snapshot else None)
            for r in rows
        )  # fmt: skip
        s.commit()
    print(f"(setup: inserted {n:,} images + reviews in {time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    with Session(engine) as s:
        got, _ = collect_reviewed_rows(s)
    t1 = time.perf_counter()
    write_llava_jsonl(got, out_dir / "db.jsonl")
    t2 = time.perf_counter()
    print(
        f"DB -> JSONL        {n:>7,} rows: {t2 - t0:6.2f} s  {n / (t2 - t0):>9,.0f} rows/s  "
        f"(collect_reviewed_rows {t1 - t0:.2f} s, write {t2 - t1:.2f} s)"
    )
    return t2 - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 127_000])
    ap.add_argument("--with-db", action="store_true", help="also time reading the rows from SQLite")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        times = {n: bench_write(n, Path(d)) for n in args.sizes}
        if args.with_db:
            times[-max(args.sizes)] = bench_db(max(args.sizes), Path(d))
    worst = max(times.values())
    print(f"goal: under {GOAL_S:.0f} s for 127,000 rows -> {'met' if worst < GOAL_S else 'NOT met'}")
    return 0 if worst < GOAL_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
