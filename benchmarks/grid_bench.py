"""Benchmark: grid pages (:func:`catreview.query.grid.grid_page`) at collection scale, in process.

Usage::

    python benchmarks/grid_bench.py --photos 1000 127000          # SQLite files in a temp folder

:func:`grid_timings` is the part ``benchmarks/scale_bench.py`` can call on the database it builds
(``grid_timings(engine, calls=...)`` returns ``{"grid_<filter>_p50_ms": .., "grid_<filter>_p95_ms": ..}``).
Standalone, this script builds each database with the project's schema (:func:`make_engine`):
N decodable image rows, 90% with a current label, and a ``photo_scores`` row each (labels drawn
from 67 classes with a Domestic-Short-Hair-heavy skew like the users' data, random scores),
written by bulk ``INSERT`` of the models' tables; then it times every filter kind of the grid on
random keyset positions (``after``), one JSON line per N, and with two sizes a line of p95 ratios
largest/smallest (goal, as the scale benchmark's: every p95 <= 100 ms at 127,000 photos and within
1.5x of the 1,000-photo p95, in the same run). Wall-clock timings on a noisy machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL_P95_MS = 100.0
GOAL_RATIO = 1.5


def _filters(labels: list[str]) -> dict[str, Any]:
    from catreview.query.grid import UNLABELLED, GridFilter

    rare, common = labels[-1], labels[0]
    return {
        "all": GridFilter(),
        "label_common": GridFilter(label=common),
        "label_rare": GridFilter(label=rare),
        "unlabelled": GridFilter(label=UNLABELLED),
        "predicted_rare": GridFilter(predicted=rare),
        "cell_common": GridFilter(label=common, predicted=common),
        "cell_off_diagonal": GridFilter(label=common, predicted=labels[1]),
        "queue_disagreement": GridFilter(queue="disagreement"),
        "queue_margin": GridFilter(queue="margin"),
        "queue_random": GridFilter(queue="random"),
        "queue_import": GridFilter(queue="import"),
    }


def grid_timings(engine: Any, *, calls: int = 50, seed: int = 0) -> dict[str, float]:
    """p50/p95 in ms of :func:`~catreview.query.grid.grid_page` (48 a page) for each filter kind,
    ``calls`` calls each from random ``after`` photos (10 warm-up calls first); labels are taken
    from the database (most and least frequent current labels)."""
    from sqlalchemy import func, select

    from catreview.data.db import ImageRecord
    from catreview.query.grid import grid_page

    rng = random.Random(seed)
    with engine.connect() as conn:
        top = max(conn.execute(select(func.max(ImageRecord.id))).scalar() or 1, 1)
        counts = conn.execute(
            select(ImageRecord.current_label, func.count())
            .where(ImageRecord.current_label.is_not(None))  # type: ignore[union-attr]
            .group_by(ImageRecord.current_label)
            .order_by(func.count().desc())
        ).all()
    labels = [c[0] for c in counts] or ["x", "y"]
    out: dict[str, float] = {}
    for name, flt in _filters(labels).items():
        for _ in range(10):
            grid_page(engine, flt, after=rng.randint(1, top))
        times = []
        for _ in range(calls):
            after = rng.randint(1, top)
            t0 = time.perf_counter()
            grid_page(engine, flt, after=after)
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        out[f"grid_{name}_p50_ms"] = round(statistics.median(times), 2)
        out[f"grid_{name}_p95_ms"] = round(times[max(0, int(0.95 * len(times)) - 1)], 2)
    return out


def build(url: str, n: int, seed: int = 0) -> Any:
    """A database of ``n`` synthetic photos with labels and score rows (see the module docstring)."""
    from sqlalchemy import insert

    from catreview.data.db import ImageRecord, PhotoScore, make_engine, utcnow
    from catreview.data.labels import BreedVocabulary

    engine = make_engine(url)
    rng = random.Random(seed)
    names = BreedVocabulary.default().names
    weights = [50.0 if "Domestic Short" in b else 1.0 / (1 + i) for i, b in enumerate(names)]
    now = utcnow()
    batch = 5000
    with engine.begin() as conn:
        for start in range(1, n + 1, batch):
            images, scores = [], []
            for i in range(start, min(n, start + batch - 1) + 1):
                sha = hashlib.sha256(str(i).encode()).hexdigest()
                label = rng.choices(names, weights)[0] if rng.random() < 0.9 else None
                pred = label if label and rng.random() < 0.7 else rng.choices(names, weights)[0]
                images.append(dict(id=i, sha256=sha, path=f"/photos/{i}.jpg", size=1, imported_at=now,
                                   current_label=label, current_review_id=i if label else None,
                                   current_source="import" if label else None))  # fmt: skip
                p = rng.random()
                scores.append(dict(image_id=i, open=True, stage1_label=pred, stage1_prob=p, fused_label=pred,
                                   fused_prob=p, fused_margin=rng.random(), disagreement=rng.random(),
                                   rarity=rng.random(), random_key=int(sha[:13], 16) / float(1 << 52),
                                   models="bench", updated_at=now))  # fmt: skip
            conn.execute(insert(ImageRecord), images)
            conn.execute(insert(PhotoScore), scores)
    return engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, nargs="+", default=[1000, 127000])
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.photos:
            t0 = time.perf_counter()
            engine = build(f"sqlite:///{tmp}/grid_{n}.db", n)
            built = time.perf_counter() - t0
            row = {"photos": n, "db": "sqlite", "build_s": round(built, 1), **grid_timings(engine, calls=args.calls)}
            engine.dispose()
            print(json.dumps(row), flush=True)
            results.append(row)
    if len(results) >= 2:
        small, big = results[0], results[-1]
        keys = [k for k in big if k.endswith("_p95_ms")]
        ratios = {k.replace("_p95_ms", "_ratio"): round(big[k] / max(small[k], 0.01), 2) for k in keys}
        met = all(big[k] <= GOAL_P95_MS for k in keys) and all(v <= GOAL_RATIO for v in ratios.values())
        print(json.dumps({"small": small["photos"], "large": big["photos"], **ratios, "goals_met": met}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
