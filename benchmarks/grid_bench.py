"""Benchmark: grid pages (:func:`catreview.query.grid.grid_page`) at collection scale, in process.

Usage::

    python benchmarks/grid_bench.py --photos 1000 127000               # SQLite files in a temp folder
    python benchmarks/grid_bench.py --photos 1000 127000 --postgres    # a throwaway local PostgreSQL server
    python benchmarks/grid_bench.py --photos 1000 127000 --db postgresql+psycopg://me@host/scratch

:func:`grid_timings` is the part ``benchmarks/scale_bench.py`` calls on the database it builds
(``grid_timings(engine, calls=...)`` returns ``{"grid_<filter>_p50_ms": .., "grid_<filter>_p95_ms": ..}``)
and :func:`grid_plans` the ``EXPLAIN`` of each filter's statements. Standalone, this script
builds each database with the project's schema (:func:`make_engine`) by bulk ``INSERT`` of the
models' tables: N decodable image rows, 90% with an (imported) current label, and a
``photo_scores`` row each, with distributions like the users' data: labels from 67 classes with
a Domestic-Short-Hair-heavy skew, the fused prediction equal to the label 70% of the time,
the VLM agreeing with stage 1 on 75% of the photos (``disagreement`` exactly 0 there: ties, as
in real scores), ``rarity`` from the predicted class counts (:func:`catreview.query.queues.rarity`:
one value per class, ties again), a label-issue score on a random 10%, other scores uniform.
Then, on PostgreSQL, ``ANALYZE`` (the statistics autovacuum gathers after a bulk load), and every
filter kind of the grid is timed on random keyset positions (``after``), all sizes
interleaved call by call (:func:`bench_common.interleaved`: load on the shared machine hits every
size alike), one JSON line per N, then with two sizes a line of p50 and p95 ratios largest/smallest (goal, as the scale benchmark's: every
p95 <= 100 ms at 127,000 photos and within 1.5x of the 1,000-photo p95, in the same run), then
a line with the plan findings at the largest size (scans of a growing table not along an index,
sorts; :func:`bench_common.plan_flags`). Wall-clock timings on a noisy machine.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import analyze, interleaved, plan_flags, postgres_server, scratch_database  # noqa: E402

GOAL_P95_MS = 100.0
GOAL_RATIO = 1.5


def grid_filters(engine: Any) -> dict[str, Any]:
    """The grid filters timed, named, with labels taken from the database: the most and least
    frequent current labels and fused predictions (``photo_scores``). ``cell_rare_in_common`` is
    the rarest current label inside the most common prediction (a small confusion cell in a big
    row: the cell filter walks the prediction's index and checks the label per row)."""
    from sqlalchemy import func, select
    from sqlmodel import col

    from catreview.data.db import ImageRecord, PhotoScore
    from catreview.query.grid import UNLABELLED, GridFilter
    from catreview.query.queues import QUEUE_KINDS

    with engine.connect() as conn:
        labels = [
            r[0]
            for r in conn.execute(
                select(col(ImageRecord.current_label), func.count())
                .where(col(ImageRecord.current_label).is_not(None))
                .group_by(col(ImageRecord.current_label))
                .order_by(func.count().desc(), col(ImageRecord.current_label))
            )
        ] or ["x", "y"]
        predicted = [
            r[0]
            for r in conn.execute(
                select(col(PhotoScore.fused_label), func.count())
                .group_by(col(PhotoScore.fused_label))
                .order_by(func.count().desc(), col(PhotoScore.fused_label))
            )
        ] or labels
    common, rare = labels[0], labels[-1]
    second = labels[1] if len(labels) > 1 else labels[0]
    out: dict[str, Any] = {
        "all": GridFilter(),
        "label_common": GridFilter(label=common),
        "label_rare": GridFilter(label=rare),
        "unlabelled": GridFilter(label=UNLABELLED),
        "predicted_common": GridFilter(predicted=predicted[0]),
        "predicted_rare": GridFilter(predicted=predicted[-1]),
        "cell_common": GridFilter(label=common, predicted=common),
        "cell_off_diagonal": GridFilter(label=common, predicted=second),
        "cell_rare_in_common": GridFilter(label=rare, predicted=predicted[0]),
    }
    out.update({f"queue_{kind}": GridFilter(queue=kind) for kind in QUEUE_KINDS})
    return out


def _top_id(engine: Any) -> int:
    from sqlalchemy import func, select

    from catreview.data.db import ImageRecord

    with engine.connect() as conn:
        return max(int(conn.execute(select(func.max(ImageRecord.id))).scalar() or 1), 1)


def grid_calls(engine: Any, *, seed: int = 0) -> dict[str, Callable[[], Any]]:
    """``{"grid_<filter>": call}``: each call serves one page (48) of that filter of
    :func:`grid_filters` from a random ``after`` photo (uniform over 1..max id)."""
    from catreview.query.grid import grid_page

    rng = random.Random(seed)
    top = _top_id(engine)

    def from_random(flt: Any) -> Callable[[], Any]:
        return lambda: grid_page(engine, flt, after=rng.randint(1, top))

    return {f"grid_{name}": from_random(flt) for name, flt in grid_filters(engine).items()}


def grid_timings(engine: Any, *, calls: int = 50, seed: int = 0) -> dict[str, float]:
    """p50/p95 in ms (:func:`bench_common.percentile`) of :func:`~catreview.query.grid.grid_page`
    (48 a page) for each filter of :func:`grid_filters` (:func:`grid_calls`), ``calls`` calls
    each after 10 warm-up calls. To compare sizes, time them together instead
    (:func:`bench_common.interleaved` over :func:`grid_calls` of each database)."""
    return interleaved({0: grid_calls(engine, seed=seed)}, calls)[0]


def grid_plans(engine: Any) -> dict[str, list[str]]:
    """``{filter name: flagged plan lines}`` (:func:`bench_common.plan_flags`) of one grid page
    from the middle photo, for each filter of :func:`grid_filters`; empty lists are clean."""
    from catreview.query.grid import grid_page

    middle = _top_id(engine) // 2
    return {
        name: plan_flags(engine, functools.partial(grid_page, engine, flt, after=middle))["flags"]
        for name, flt in grid_filters(engine).items()
    }


def build(url: str, n: int, seed: int = 0) -> Any:
    """A database of ``n`` synthetic photos with labels and score rows (see the module docstring)."""
    from sqlalchemy import insert

    from catreview.data.db import ImageRecord, PhotoScore, make_engine, utcnow
    from catreview.data.labels import BreedVocabulary
    from catreview.query.queues import random_key, rarity

    engine = make_engine(url)
    rng = random.Random(seed)
    names = BreedVocabulary.default().names
    weights = [50.0 if "Domestic Short" in b else 1.0 / (1 + i) for i, b in enumerate(names)]
    now = utcnow()
    labels = [rng.choices(names, weights)[0] if rng.random() < 0.9 else None for _ in range(n)]
    preds = [lab if lab and rng.random() < 0.7 else rng.choices(names, weights)[0] for lab in labels]
    freq = Counter(preds)
    batch = 5000
    with engine.begin() as conn:
        for start in range(0, n, batch):
            images, scores = [], []
            for k in range(start, min(n, start + batch)):
                i, label, pred = k + 1, labels[k], preds[k]
                sha = hashlib.sha256(str(i).encode()).hexdigest()
                images.append(dict(id=i, sha256=sha, path=f"/photos/{i}.jpg", size=1, imported_at=now,
                                   current_label=label, current_review_id=i if label else None,
                                   current_source="import" if label else None))  # fmt: skip
                p = rng.random()
                agree = rng.random() < 0.75
                vlm = pred if agree else rng.choice(names)
                scores.append(dict(image_id=i, open=True, stage1_label=pred, stage1_prob=p,
                                   vlm_label=vlm, vlm_prob=rng.random(), fused_label=pred, fused_prob=p,
                                   fused_margin=rng.random() * p, disagreement=0.0 if agree else rng.random(),
                                   rarity=rarity(freq[pred], n),
                                   label_issue=rng.random() if label and rng.random() < 0.1 else None,
                                   random_key=random_key(sha), models="bench", updated_at=now))  # fmt: skip
            conn.execute(insert(ImageRecord), images)
            conn.execute(insert(PhotoScore), scores)
    analyze(engine)
    return engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, nargs="+", default=[1000, 127000])
    ap.add_argument("--calls", type=int, default=50, help="timed pages per filter (default 50)")
    ap.add_argument("--db", help="a PostgreSQL URL to create scratch databases next to (default: SQLite files)")
    ap.add_argument("--postgres", action="store_true", help="start a throwaway local PostgreSQL server")
    args = ap.parse_args(argv)
    if args.db and not args.db.startswith("postgresql"):
        raise SystemExit("error: --db takes a PostgreSQL URL; SQLite databases are made in a temporary folder")
    with postgres_server(args.postgres) as started, tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        server_url = started or args.db
        kind = "postgresql" if server_url else "sqlite"
        sizes = sorted(args.photos)
        engines, built = {}, {}
        for n in sizes:
            url = stack.enter_context(scratch_database(server_url, n, Path(tmp)))
            t0 = time.perf_counter()
            engines[n] = build(url, n)
            stack.callback(engines[n].dispose)
            built[n] = round(time.perf_counter() - t0, 1)
        timed = interleaved({n: grid_calls(engines[n], seed=n) for n in sizes}, args.calls)
        results = [{"photos": n, "db": kind, "build_s": built[n], **timed[n]} for n in sizes]
        for row in results:
            print(json.dumps(row), flush=True)
        flags = grid_plans(engines[sizes[-1]])
        print(json.dumps({"photos": sizes[-1], "db": kind, "plan_flags": flags}), flush=True)
    if len(results) >= 2:
        small, big = results[0], results[-1]
        keys = [k for k in big if k.endswith("_ms")]
        ratios = {k.replace("_ms", "_ratio"): round(big[k] / max(small[k], 0.1), 2) for k in keys}
        met = all(big[k] <= GOAL_P95_MS for k in keys if "_p95_" in k) and all(
            v <= GOAL_RATIO for k, v in ratios.items() if "_p95_" in k
        )
        print(json.dumps({"db": kind, "small": small["photos"], "large": big["photos"], **ratios, "goals_met": met}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
