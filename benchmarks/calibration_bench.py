"""Benchmark: the calibration fit (:func:`catreview.evaluate.calibration.calibrate`) at the users' scale.

Usage::

    python benchmarks/calibration_bench.py                       # 10,000 and 127,000 photos
    python benchmarks/calibration_bench.py --photos 127000       # one size (repeat --photos for more)
    python benchmarks/calibration_bench.py --reference 0         # skip the per-record reference

Synthetic reviewed photos shaped like the users' data: the 67 classes, long-tailed (Domestic Short
Hair most frequent, weight 1/rank); stage 1 over-confident (softmax of logits / 0.5, the true breed's
logit raised), its top 3 stored; the VLM's probabilities over those 3 candidates + "other", noisy
and under-confident, skipped (routed past) when stage 1's top-1 probability exceeds 0.9.

Printed, one JSON line per size N: ``seconds`` and ``photos_per_s`` of ``calibrate`` on the
photos as :class:`~catreview.evaluate.calibration.CandidateArrays` (what
:func:`catreview.evaluate.store.fit_and_store` passes, 5 folds, 101 weights, 15 bins),
``cpu_seconds`` (this process's CPU time: on a shared machine the wall time also holds other
processes' turns), and ``records_seconds`` for the same photos given as a list of
:class:`~catreview.evaluate.calibration.ReviewRecord` (the public record API, encoding included).
With ``--reference N`` (default 2,000; 0 skips), one more line compares, on N photos in the same
run, the per-record implementation the fit had before it was vectorised
(``tests/calibration_reference.py``) with this one: both times, the speed-up, and whether the two
reports are equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from catreview.data.labels import BreedVocabulary  # noqa: E402
from catreview.evaluate.calibration import CandidateArrays, calibrate  # noqa: E402
from catreview.predict.fusion import OTHER  # noqa: E402


def synthetic_photos(n: int, seed: int = 0) -> CandidateArrays:
    """``n`` reviewed photos as arrays (see the module docstring); built in array operations."""
    rng = np.random.default_rng(seed)
    names = sorted(BreedVocabulary.default().names, key=lambda b: b != "Domestic Short Hair")
    c = len(names)
    freq = 1.0 / np.arange(1, c + 1)
    truth = rng.choice(c, size=n, p=freq / freq.sum())
    logits = rng.normal(0.0, 1.0, (n, c))
    logits[np.arange(n), truth] += rng.normal(2.5, 1.0, n)
    z = logits / 0.5
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top = np.argsort(-p, axis=1)[:, :3]
    top_p = np.take_along_axis(p, top, axis=1)
    target = np.where(top == truth[:, None], np.arange(3), 3).min(axis=1)  # candidate column, else other
    x = rng.normal(0.0, 1.0, (n, 4))
    x[np.arange(n), target] += 1.5
    v = np.exp(x / 2.0)
    v /= v.sum(axis=1, keepdims=True)
    has_vlm = top_p[:, 0] <= 0.9
    other = c  # the code of OTHER, after the breeds
    vlm_labels = np.where(has_vlm[:, None], np.hstack([top, np.full((n, 1), other)]), -1)
    return CandidateArrays(
        labels=[*names, OTHER],
        human=truth.astype(np.int32),
        stage1_labels=top.astype(np.int32),
        stage1_probs=top_p,
        vlm_labels=vlm_labels.astype(np.int32),
        vlm_probs=np.where(has_vlm[:, None], v, np.nan),
        has_vlm=has_vlm,
    )


def timed(fn, *args):  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, action="append", help="photos (repeatable; default 10000 and 127000)")
    ap.add_argument("--reference", type=int, default=2000, help="photos for the per-record comparison (0: skip)")
    args = ap.parse_args()
    sizes = args.photos or [10_000, 127_000]
    if min(sizes) < 30 or args.reference < 0:
        ap.error("--photos must be >= 30 (calibration's minimum) and --reference >= 0")
    warnings.simplefilter("ignore", RuntimeWarning)  # a temperature at its bound says so; not timed
    calibrate(synthetic_photos(300, seed=1))  # imports and first calls (scikit-learn, numpy), untimed
    for n in sizes:
        data = synthetic_photos(n)
        report, wall, cpu = timed(calibrate, data)
        records = data.records()
        again, rec_wall, _ = timed(calibrate, records)
        same = [(r.weight, r.stage1_temperature, r.stage1, r.vlm, r.fused) for r in (report, again)]
        line = {
            "photos": n,
            "seconds": round(wall, 3),
            "photos_per_s": round(n / wall),
            "cpu_seconds": round(cpu, 3),
            "records_seconds": round(rec_wall, 3),
            "records_photos_per_s": round(n / rec_wall),
            "records_same_fit": same[0] == same[1],
            "weight": report.weight,
            "t_stage1": round(report.stage1_temperature, 4),
            "t_vlm": None if report.vlm_temperature is None else round(report.vlm_temperature, 4),
            "t_fused": round(report.fused_temperature, 4),
        }
        print(json.dumps(line), flush=True)
    if args.reference:
        from tests.calibration_reference import assert_reports_equal, reference_calibrate

        records = synthetic_photos(args.reference, seed=2).records()
        new, new_wall, _ = timed(calibrate, records)
        old, old_wall, _ = timed(reference_calibrate, records)
        try:
            assert_reports_equal(new, old, tol=0.0)
            equal = True
        except AssertionError:
            equal = False
        line = {
            "photos": args.reference,
            "reference_seconds": round(old_wall, 3),
            "seconds": round(new_wall, 3),
            "speedup": round(old_wall / new_wall, 1),
            "reports_equal": equal,
        }
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
