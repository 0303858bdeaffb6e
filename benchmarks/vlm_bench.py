"""Benchmark the ways of getting a stage-2 verdict, on the same model and photos, in one run.

Rows (per photo; best and median of ``--repeats`` interleaved runs after one warm-up):

* ``score, shared prefill (1 photo/call)`` -- :meth:`VLMPostClassifier.score_candidates`: one
  prefill of image + prompt, then all candidates packed into one row (4D attention mask)
* ``score, shared prefill, batched (N/call)`` -- the same with all N photos in one prefill
* ``score, 1 forward per candidate`` -- :meth:`VLMPostClassifier.score_candidates_reference`
* ``generate K tokens + match`` -- :meth:`VLMPostClassifier.generate_verdict` (greedy; random
  weights emit no EOS, so exactly K tokens), with ``--max-new-tokens`` (default 20: a breed name
  plus a confidence) and with just enough tokens for the longest candidate answer (the best case
  for generate)
* ``prefill only`` -- one forward over image + prompt filling the KV cache: the floor every
  method pays

Columns: best and median ms per photo; ``vs generate`` (best time / best time of ``generate
--max-new-tokens``; the goal is <= 0.5 for shared-prefill scoring); ``vs 1-at-a-time`` (against
shared-prefill scoring of one photo per call); ``ms above prefill`` (best time minus the prefill
floor). The fast path's scores are also checked against the reference (max |score difference|).

Models: ``tiny:demo`` and ``tiny:14m`` (built offline into a temporary folder, see
:mod:`catreview.models.tiny_llava`), ``tiny:llava-next``, ``tiny:qwen2-vl``, ``tiny:idefics3``,
``tiny:llava-onevision``, ``tiny:pixtral`` (test-only builders in ``tests/tiny_vlms.py``), or any local folder / cached hub id (e.g.
``llava-hf/llava-1.5-7b-hf`` on a GPU machine).

    HF_HUB_OFFLINE=1 python benchmarks/vlm_bench.py --models tiny:demo tiny:14m
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without install

from catreview.config import VLMProfile
from catreview.models.tiny_llava import build_tiny_llava
from catreview.models.vlm import prompts
from catreview.models.vlm.postclassifier import VLMPostClassifier
from catreview.models.vlm.scoring import answer_token_ids, candidate_answer
from tests import tiny_vlms

PHOTO_BREEDS = ["Bengal", "Maine_Coon", "Persian", "Siamese", "Ragdoll", "Sphynx", "Bombay", "Birman"]
TINY = {
    "tiny:demo": lambda d: build_tiny_llava(d, size="demo"),
    "tiny:14m": lambda d: build_tiny_llava(d, size="14m"),
    "tiny:llava-next": tiny_vlms.build_tiny_llava_next,
    "tiny:qwen2-vl": tiny_vlms.build_tiny_qwen2_vl,
    "tiny:idefics3": tiny_vlms.build_tiny_idefics3,
    "tiny:llava-onevision": tiny_vlms.build_tiny_llava_onevision,
    "tiny:pixtral": tiny_vlms.build_tiny_pixtral,
}


ONE_AT_A_TIME = "score, shared prefill (1 photo/call)"
PREFILL = "prefill only (image+prompt, floor of every method)"


def generate_row(max_new_tokens: int) -> str:
    return f"generate {max_new_tokens} tokens + match"


def load_photos(root: Path, n: int):
    """``n`` photos (first of each breed folder) and stage-1-like top-3 candidate lists."""
    from PIL import Image

    breeds = PHOTO_BREEDS[:n]
    images, candidates = [], []
    for i, breed in enumerate(breeds):
        path = sorted((root / breed).glob("*.jpg"))[0]
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
        others = [b for b in PHOTO_BREEDS if b != breed]
        candidates.append([breed, others[i % len(others)], others[(i + 3) % len(others)]])
    return images, candidates


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times (seconds) of each method, run round-robin ``repeats`` times after one warm-up.

    Interleaving makes every method see the same background load (shared CPUs); compare the
    minimum, the run least disturbed by other processes.
    """
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return times


def longest_answer_tokens(vlm: VLMPostClassifier, candidates: list[list[str]]) -> int:
    tok = vlm.processor.tokenizer
    longest = 0
    for cands in candidates:
        labels = prompts.with_other(cands)
        prompt = prompts.verdict_prompt(vlm.processor, labels)
        for c in labels:
            ids = answer_token_ids(tok, prompt, candidate_answer(prompt, c), eos_id=tok.eos_token_id)
            longest = max(longest, len(ids))
    return longest


def bench_model(
    model: str, images, candidates, *, repeats: int, max_new_tokens: int, label: str | None = None
) -> list[tuple[str, float, float]]:
    """Rows ``(method, best seconds per photo, median seconds per photo)``; prints a consistency
    check first."""
    n = len(images)
    single = VLMPostClassifier(VLMProfile(model=model, batch_size=1), name="bench").load()

    fast = single.score_candidates(images, candidates)
    fast_b = single.score_candidates(images, candidates, batch_size=n)
    ref = [single.score_candidates_reference(im, c) for im, c in zip(images, candidates)]
    diff = max(abs(a - b) for f, r in zip(fast, ref) for a, b in zip(f.scores, r.scores))
    diff_b = max(abs(a - b) for f, r in zip(fast_b, fast) for a, b in zip(f.scores, r.scores))
    n_params = sum(p.numel() for p in single.model.parameters())
    n_prompt = single._prepare(images[:1], [prompts.with_other(candidates[0])]).inputs["input_ids"].shape[1]
    print(
        f"\n{label or model}  ({n_params / 1e6:.2f}M params, prompt {n_prompt} tokens incl. image, "
        f"{len(prompts.with_other(candidates[0]))} candidates, {n} photos, device {single.device})"
    )
    print(f"  max |score| diff: shared-prefill vs reference {diff:.2e}, batched vs one-at-a-time {diff_b:.2e}")

    short = longest_answer_tokens(single, candidates)
    prefill_inputs = [prefill_inputs_for(single, im, c) for im, c in zip(images, candidates)]
    methods = {
        ONE_AT_A_TIME: lambda: single.score_candidates(images, candidates),
        f"score, shared prefill, batched ({n}/call)": lambda: single.score_candidates(images, candidates, batch_size=n),
        "score, 1 forward per candidate": lambda: [
            single.score_candidates_reference(i, c) for i, c in zip(images, candidates)
        ],
        generate_row(max_new_tokens): lambda: [
            single.generate_verdict(i, c, max_new_tokens) for i, c in zip(images, candidates)
        ],
        f"generate {short} tokens + match (longest answer)": lambda: [
            single.generate_verdict(i, c, short) for i, c in zip(images, candidates)
        ],
        PREFILL: lambda: [prefill(single.model, inputs) for inputs in prefill_inputs],
    }
    times = time_interleaved(methods, repeats)
    single.unload()
    return [(name, min(t) / n, statistics.median(t) / n) for name, t in times.items()]


def prefill_inputs_for(vlm: VLMPostClassifier, image, candidates: list[str]):
    """Processor output of the verdict prompt for one photo, on the model's device/dtype."""
    prompt = prompts.verdict_prompt(vlm.processor, prompts.with_other(candidates))
    return vlm.processor(images=[image], text=[prompt], return_tensors="pt").to(vlm.device, dtype=vlm.dtype)


def prefill(model, inputs) -> None:
    """One forward over image + prompt filling the KV cache (what every method starts with)."""
    import torch

    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)


def print_table(rows: list[tuple[str, float, float]], max_new_tokens: int) -> None:
    """Columns: best and median ms per photo; best-time ratios vs ``generate max_new_tokens`` and
    vs shared-prefill scoring one photo per call; ms above the prefill floor."""
    best_of = {name: b for name, b, _ in rows}
    gen, one, floor = best_of[generate_row(max_new_tokens)], best_of[ONE_AT_A_TIME], best_of[PREFILL]
    width = max(len(r[0]) for r in rows)
    print(
        f"  {'method':<{width}}  {'best ms':>8}  {'median ms':>9}  {'vs generate':>11}  "
        f"{'vs 1-at-a-time':>14}  {'ms above prefill':>16}"
    )
    for name, best, median in rows:
        print(
            f"  {name:<{width}}  {best * 1e3:8.1f}  {median * 1e3:9.1f}  {best / gen:10.2f}x  "
            f"{best / one:13.2f}x  {(best - floor) * 1e3:16.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny:demo", "tiny:14m"])
    parser.add_argument("--photos", type=int, default=4, help=f"number of photos (<= {len(PHOTO_BREEDS)})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--photos-dir", type=Path, default=tiny_vlms.SHARED_PHOTOS_DIR)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (default 0 = torch's default, what the app runs with; 1 is less "
        "disturbed by other processes on a shared machine but makes the compute-bound prefill slower "
        "against generate's overhead-bound decoding)",
    )
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    if not (args.photos_dir / "labels.csv").is_file():
        parser.error(f"no shared photos at {args.photos_dir}")
    images, candidates = load_photos(args.photos_dir, min(args.photos, len(PHOTO_BREEDS)))
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load avg {load:.1f}")
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp:
        for spec in args.models:
            model = str(TINY[spec](Path(tmp) / spec.split(":")[1])) if spec in TINY else spec
            rows = bench_model(
                model, images, candidates, repeats=args.repeats, max_new_tokens=args.max_new_tokens, label=spec
            )
            print_table(rows, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
