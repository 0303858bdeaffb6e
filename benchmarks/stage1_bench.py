"""Stage-1 throughput: the prediction pipeline (decoding included) against a bare timm forward.

Measured in one run, on the same photos (the shared photos, ``--photos N`` cycling them), the same
model and batch size, after one warm-up batch:

* ``bare``: the timm model alone on tensors decoded and transformed beforehand (batches stacked
  in advance, in pinned memory on CUDA): ``model(x.to(device))`` and the logits back to the CPU.
* ``pipeline``: what ``predict`` runs: :func:`catreview.predict.loader.photo_loader` (DataLoader
  workers decode with ``load_rgb`` and apply the timm eval transform), then
  ``Stage1Classifier.forward_batch`` + top-k in this process. Worker start-up is included
  (``pipeline_first_batch_s`` says how long the first batch took; the ``after_first_batch``
  numbers leave it out: the steady state of a long run).
* ``runner``: the pipeline plus the database writes (:func:`catreview.predict.runner.compute_stage1`
  into a fresh SQLite file whose N image rows point at the photos).

``bare`` and ``pipeline`` run ``--repeats`` times interleaved (order alternating), each followed by
``runner``; the JSON line has medians, and each pair's ratio in ``ratios``. Prints one JSON line: photos/s of each,
``ratio`` = pipeline / bare throughput (goal >= 0.9),
``ratio_after_first_batch`` (the same without worker start-up) and ``runner_ratio`` = runner / bare.

Models: the demo classifier (``convnext_atto``, random weights, by default), the classifier of
``--config FILE``, or ``--model NAME``: any timm architecture built with random weights (speed
only; no download), e.g. ``convnext_tiny``, closer to the users' model than the tiny demo one.

    python benchmarks/stage1_bench.py                       # demo classifier, all 330 photos
    python benchmarks/stage1_bench.py --model convnext_tiny --photos 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without install

import timm
import torch
from sqlmodel import Session

from catreview.config import load_settings
from catreview.data.db import ImageRecord, make_engine
from catreview.data.images import load_rgb
from catreview.data.labels import BREEDS67_FILE, read_label_file
from catreview.models.classifier import Stage1Classifier, resolve_device
from catreview.models.registry import ModelRegistry
from catreview.predict.loader import PhotoItem, default_workers, photo_loader
from catreview.predict.runner import PredictSummary, compute_stage1

DEFAULT_CATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cats"


def shared_photos() -> list[Path]:
    """The shared photos (``$CATREVIEW_SHARED_CATS`` or ``../shared/data/cats``), sorted.

    Raises:
        SystemExit: the folder has no photos.
    """
    root = Path(os.environ.get("CATREVIEW_SHARED_CATS", DEFAULT_CATS))
    paths = sorted(root.glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"no photos in {root}/<Breed>/*.jpg; set CATREVIEW_SHARED_CATS")
    return paths


def random_classifier(name: str, batch_size: int, device: str) -> Stage1Classifier:
    """A timm ``name`` with random weights and the 67 classes, wrapped like a loaded classifier."""
    labels = read_label_file(BREEDS67_FILE)
    model = timm.create_model(name, pretrained=False, num_classes=len(labels))
    dev = resolve_device(device)
    model.eval().to(dev)
    cfg = timm.data.resolve_data_config({}, model=model)
    return Stage1Classifier(
        model, labels, timm.data.create_transform(**cfg), dev, name, "random", batch_size, dict(cfg)
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare(clf: Stage1Classifier, batches: list[torch.Tensor]) -> float:
    """Seconds for the model alone over pre-made batches (the logits copied back each time)."""
    sync(clf.device)
    t0 = time.perf_counter()
    for x in batches:
        clf.model(x.to(clf.device, non_blocking=True)).float().cpu()
    sync(clf.device)
    return time.perf_counter() - t0


def pipeline(clf: Stage1Classifier, items: list[PhotoItem], workers: int) -> tuple[float, float, int, int]:
    """``(seconds, seconds to the end of the first batch, photos in it, photos)`` of DataLoader
    decoding + forward + top-k."""
    t0 = time.perf_counter()
    first, first_n, n = 0.0, 0, 0
    for batch in photo_loader(items, batch_size=clf.batch_size, num_workers=workers, data_config=clf.data_config):
        if batch.pixels is not None:
            clf.topk_from_logits(clf.forward_batch(batch.pixels), 3)
            n += len(batch.items)
        if not first:
            first, first_n = time.perf_counter() - t0, n
    return time.perf_counter() - t0, first, first_n, n


def runner(clf: Stage1Classifier, paths: list[str], workers: int, folder: Path) -> float:
    """Seconds of :func:`compute_stage1` (pipeline + database writes) over fresh image rows."""
    engine = make_engine(f"sqlite:///{folder / 'bench.db'}")
    with Session(engine) as s:
        rows = [ImageRecord(sha256=f"{i:064x}", path=p, size=0) for i, p in enumerate(paths)]
        s.add_all(rows)
        s.commit()
        items = [PhotoItem(int(r.id or 0), r.path) for r in rows]
        summary = PredictSummary()
        t0 = time.perf_counter()
        compute_stage1(s, clf, items, summary, top_k=3, num_workers=workers)
        dt = time.perf_counter() - t0
    if summary.stage1_computed != len(items) or summary.failed:
        raise SystemExit(f"runner computed {summary.stage1_computed} of {len(items)}; failed: {summary.failed[:3]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=None, help="photos to run (default: every shared photo once)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPUs - 1, at most 16)")
    ap.add_argument("--model", help="a timm architecture with random weights instead of the demo classifier")
    ap.add_argument("--config", help="settings file whose classifier to use")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved bare/pipeline pairs (medians reported)")
    args = ap.parse_args()

    photos = shared_photos()
    n = args.photos or len(photos)
    paths = [str(photos[i % len(photos)]) for i in range(n)]
    workers = default_workers() if args.workers is None else args.workers
    with tempfile.TemporaryDirectory(prefix="stage1-bench-") as tmp:
        if args.model:
            clf = random_classifier(args.model, args.batch_size, args.device)
        else:
            settings = load_settings(args.config)  # no --config: the demo classifier (.cache/demo-models/)
            settings = settings.model_copy(
                update={
                    "classifier": settings.classifier.model_copy(
                        update={"batch_size": args.batch_size, "device": args.device}
                    )
                }
            )
            clf = ModelRegistry(settings, engine=make_engine(f"sqlite:///{tmp}/settings.db")).classifier()

        # Decoded and transformed once per distinct photo; batches stacked beforehand.
        tensors = {p: clf.transform(load_rgb(p)) for p in sorted(set(paths))}
        seq = [tensors[p] for p in paths]
        batches = [torch.stack(seq[i : i + clf.batch_size]) for i in range(0, n, clf.batch_size)]
        if clf.device.type == "cuda":
            batches = [b.pin_memory() for b in batches]
        bare(clf, batches[:1])  # warm-up (allocator, kernels)

        runs = []  # (bare s, pipeline s, first-batch s, photos in the first batch)
        runner_times = []
        items = [PhotoItem(i, p) for i, p in enumerate(paths)]
        for r in range(args.repeats):  # interleaved, the order alternating, against drift
            if r % 2 == 0:
                b_s = bare(clf, batches)
                p_s, first_s, first_n, done = pipeline(clf, items, workers)
            else:
                p_s, first_s, first_n, done = pipeline(clf, items, workers)
                b_s = bare(clf, batches)
            if done != n:
                raise SystemExit(f"the pipeline predicted {done} of {n} photos")
            runs.append((b_s, p_s, first_s, first_n))
            folder = Path(tmp) / f"run{r}"
            folder.mkdir()
            runner_times.append(runner(clf, paths, workers, folder))
    med = statistics.median
    runner_s = med(runner_times)
    bare_s = med(r[0] for r in runs)
    steady = [(n - fn) / (p - f) for _, p, f, fn in runs]  # photos/s after the first batch
    out = {
        "model": clf.model_id,
        "device": str(clf.device),
        "photos": n,
        "batch_size": clf.batch_size,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "bare_photos_per_s": round(n / bare_s, 1),
        "pipeline_photos_per_s": round(n / med(r[1] for r in runs), 1),
        "pipeline_first_batch_s": round(med(r[2] for r in runs), 2),
        "pipeline_after_first_batch_photos_per_s": round(med(steady), 1),
        "runner_photos_per_s": round(n / runner_s, 1),
        "ratio": round(med(b / p for b, p, _, _ in runs), 3),
        "ratios": [round(b / p, 3) for b, p, _, _ in runs],
        "ratio_after_first_batch": round(med(st * b / n for st, (b, _, _, _) in zip(steady, runs)), 3),
        "runner_ratio": round(bare_s / runner_s, 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":  # DataLoader workers are spawned: they import this file without running main()
    main()
