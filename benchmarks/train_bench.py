"""Training throughput and peak memory: our LoRA round vs a bare peft + torch loop.

Both sides train the same LoRA (:func:`training.model.lora_config`: r=16, alpha=32, q/v of the
language model) on the same model (a tiny LLaVA from :mod:`catreview.models.tiny_llava`, default the 14M
one at 336 px = llava-1.5's 576 image tokens) and the same photos with the same verdict prompts,
batch size and number of steps:

* **round**: :func:`training.lora.train_round` -- accelerate, weighted sampler, cosine schedule,
  gradient clipping, progress rows, evaluation at step 0 and at the end, one checkpoint at the end.
* **bare**: the loop a tutorial would write -- ``get_peft_model``, ``AdamW``, the processor on
  ``prompt + answer + EOS``, labels masked up to the prompt length, ``model(**inputs,
  labels=labels).loss.backward()``, ``step``, ``zero_grad``; nothing else.

Throughput is ``samples / seconds`` over steps 2..N (the first step, with its one-off allocations,
is excluded on both sides); for the round it is read from the ``elapsed`` of its progress rows,
which lie outside its evaluations (evaluation and checkpoint time are reported separately, as
``round_wall_s``). Each side runs in its own process, so peak memory is that process's maximum
resident set size (``resource.getrusage``), plus ``torch.cuda.max_memory_allocated`` on a GPU.
Sides alternate (round, bare, round, bare ...) and medians are reported, because other work on
a shared machine makes single timings noisy.

Usage::

    python benchmarks/train_bench.py [--size 14m] [--steps 12] [--batch-size 4] [--repeats 2] [--json OUT]

The goal is round >= 0.9x bare samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BREEDS = {"Bombay": 6, "Abyssinian": 6, "American_Shorthair": 6}
VAL_PER_BREED = 2


def make_inputs(work: Path, size: str) -> tuple[Path, Path]:
    """Build (once) the tiny LLaVA and an export of real photos under ``work``."""
    from catreview.models.tiny_llava import build_tiny_llava
    from catreview.models.vlm import prompts
    from tests.export_builder import write_export

    base = work / f"llava-{size}"
    if not (base / "config.json").is_file():
        build_tiny_llava(base, size=size)
    export = work / "export"
    if not (export / "export.json").is_file():
        root = Path(os.environ.get("CATREVIEW_SHARED_CATS", REPO_ROOT.parent / "shared" / "data" / "cats"))
        rows = []
        for folder, n in BREEDS.items():
            files = sorted((root / folder).glob("*.jpg"))
            breed = prompts.display_name(folder)
            rows += [(f, breed, "train") for f in files[:n]] + [
                (f, breed, "validation") for f in files[-VAL_PER_BREED:]
            ]
        write_export(rows, export)
    return base, export


def peak_memory() -> dict[str, float]:
    """Peak RSS of this process (MiB) and, on CUDA, peak allocated GPU memory (MiB)."""
    import torch

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"peak_rss_mib": rss_kib / 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def bench_config(steps: int, batch_size: int):
    from catreview.adapters.train_config import TrainConfig

    return TrainConfig(
        max_steps=steps,
        epochs=1000,
        batch_size=batch_size,
        eval_every=10**6,
        save_every=10**6,
        early_stopping_patience=0,
        candidate_source="sampled",
        other_rate=0.0,
    )


def run_round(base: Path, export: Path, steps: int, batch_size: int) -> dict[str, float]:
    """One round; throughput over steps 2..N from its progress rows."""
    from catreview.adapters.runfolder import PROGRESS_FILE, read_progress
    from training.lora import train_round

    run_dir = Path(tempfile.mkdtemp(prefix="bench-round-"))
    t0 = time.perf_counter()
    result = train_round(export, base, run_dir, bench_config(steps, batch_size), resume=False)
    wall = time.perf_counter() - t0
    train = {r["step"]: r for r in read_progress(run_dir / PROGRESS_FILE) if r["kind"] == "train"}
    seconds = train[steps]["elapsed"] - train[1]["elapsed"]
    return {
        "samples_per_s": (steps - 1) * batch_size / seconds,
        "round_wall_s": wall,
        "samples_per_s_incl_first": result["samples_per_second"],
    }


def run_bare(base: Path, export: Path, steps: int, batch_size: int) -> dict[str, float]:
    """The plain peft + torch loop (see the module docstring)."""
    import random

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from catreview.data.images import load_rgb
    from catreview.models.vlm import prompts
    from catreview.models.vlm.scoring import candidate_answer
    from training.data import read_export, sample_candidates
    from training.model import lora_config

    torch.manual_seed(0)
    cfg = bench_config(steps, batch_size)
    processor = AutoProcessor.from_pretrained(base)
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), lora_config(cfg))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    data = read_export(export)
    rng = random.Random(0)
    eos = processor.tokenizer.eos_token
    tok = processor.tokenizer
    model.train()
    marks = []
    for _ in range(steps):
        batch = [rng.choice(data.train) for _ in range(batch_size)]
        texts, answer_lens, images = [], [], []
        for ex in batch:
            cands = prompts.with_other(sample_candidates(ex.breed, data.breeds, 3, rng))
            prompt = prompts.verdict_prompt(processor, cands)
            text = prompt + candidate_answer(prompt, ex.breed) + eos
            answer_lens.append(
                len(tok(text, add_special_tokens=False)["input_ids"])
                - len(tok(prompt, add_special_tokens=False)["input_ids"])
            )
            texts.append(text)
            images.append(load_rgb(ex.image))
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="right")
        labels = torch.full_like(inputs["input_ids"], -100)
        for i, n in enumerate(answer_lens):  # learn only the last n real tokens: answer + EOS
            end = int(inputs["attention_mask"][i].sum())
            labels[i, end - n : end] = inputs["input_ids"][i, end - n : end]
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        marks.append(time.perf_counter())
    return {"samples_per_s": (steps - 1) * batch_size / (marks[-1] - marks[0])}


def child(mode: str, work: Path, size: str, steps: int, batch_size: int) -> None:
    base, export = make_inputs(work, size)
    fn = run_round if mode == "round" else run_bare
    out = fn(base, export, steps, batch_size)
    out.update(peak_memory(), mode=mode)
    print("RESULT " + json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="14m", choices=["demo", "14m"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=REPO_ROOT / ".cache" / "train-bench")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--child", choices=["round", "bare"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, args.work, args.size, args.steps, args.batch_size)
        return 0
    make_inputs(args.work, args.size)
    runs: dict[str, list[dict]] = {"round": [], "bare": []}
    for _ in range(args.repeats):
        for mode in ("round", "bare"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--size",
                args.size,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--work",
                str(args.work),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    summary = {
        mode: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        for mode, rs in runs.items()
    }
    ratio = summary["round"]["samples_per_s"] / summary["bare"]["samples_per_s"]
    report = {
        "size": args.size,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "ratio_round_over_bare": ratio,
        "median": summary,
        "runs": runs,
        "load_avg": os.getloadavg(),
    }
    print(f"model {args.size}, batch {args.batch_size}, {args.steps} steps, {args.repeats} repeats (medians)")
    print(f"{'':6s} {'samples/s':>10s} {'peak RSS MiB':>13s}")
    for mode in ("round", "bare"):
        print(f"{mode:6s} {summary[mode]['samples_per_s']:10.2f} {summary[mode]['peak_rss_mib']:13.0f}")
    print(
        f"round / bare = {ratio:.2f}x (goal >= 0.9x); round wall incl. 2 evaluations + checkpoint: "
        f"{summary['round']['round_wall_s']:.1f} s; load average {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
