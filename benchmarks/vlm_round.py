"""The built-in VLM's LoRA round on this machine: what a training step costs, how long a round
takes to a trained VLM, and the evaluation table before and after it.

Three parts (profile and round by default; ``--only profile|round|options``):

* **profile**: a few training steps of the real ``smollm2-lite0`` FastVLM on shared photos, per
  configuration (TrainConfig defaults: batch 4, LoRA r=16, fp32; the built-in recipe
  :data:`catreview.adapters.train_config.BUILTIN_FIRST_ROUND`: batch 8, r=8; the recipe under
  bf16 autocast), with the time split into collate (decode + processor), forward and
  backward + optimizer step, and the sequence length split into its parts (system turn, image
  tokens, question, prefill, answer). Printed as seconds per photo and ratios to the recipe, all
  measured in one run.
* **round**: the user's commands on a fresh database in a temporary folder (``python -m
  catreview import --labels-from-folders``, ``train --stage classifier``, ``predict``,
  ``evaluate``, ``train`` (the VLM round, the built-in recipe), ``adapters promote`` when the gate
  did not activate it, ``predict``, ``evaluate``; with ``--compare`` also a round of
  ``smollm2-lite2`` and ``compare --a smollm2-lite0 --b smollm2-lite2``), each timed, their
  output printed. ``--max-steps N`` caps the round (flags override the recipe, as for users).
* **options**: the seed's optional training settings, each in one round against the recipe on
  the same stratified split of the shared photos (1/3 of each breed held out as the test split,
  1-2 photos validation, the rest training; :func:`training.lora.train_round` on an export
  folder): class-weighted loss instead of balanced sampling (``balance="loss"``), focal loss
  (``loss="focal"``), the vision tower unfrozen for the last epoch
  (``unfreeze_tower_last_epoch``). Printed: the test split's 3-way candidate accuracy, top-1 and
  balanced accuracy (4 answers with "other") of the base model and of the selected checkpoint, and
  seconds per step.

The load average is printed with each measurement (the machine is shared).

    python benchmarks/vlm_round.py --only profile --steps 4
    python benchmarks/vlm_round.py --only round --max-steps 60 [--compare]
    python benchmarks/vlm_round.py --only options --epochs 4 [--option focal ...]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------ profile


def _sequence_parts(processor) -> dict[str, int]:
    """Token counts of the verdict row's parts (one photo, 3 candidates + other)."""
    from catreview.models.vlm import prompts

    tok = processor.tokenizer
    labels = prompts.with_other(["Abyssinian", "Bengal", "Maine Coon"])
    chat = prompts.verdict_prompt(processor, labels)
    expanded = processor(images=[_photo()], text=[chat], return_tensors="pt")["input_ids"][0]
    image_id = tok.convert_tokens_to_ids("<image>")
    n_image = int((expanded == image_id).sum())
    system = chat[: chat.index("<|im_start|>user")] if "<|im_start|>user" in chat else ""
    question = prompts.verdict_text(labels)
    return {
        "total prompt": len(expanded),
        "image": n_image,
        "system turn": len(tok(system, add_special_tokens=False)["input_ids"]),
        "question": len(tok(question, add_special_tokens=False)["input_ids"]),
        "prefill": len(tok(" " + prompts.ANSWER_PREFILL, add_special_tokens=False)["input_ids"]),
        "answer (+ end of turn)": len(tok(prompts.answer_text("Maine Coon"), add_special_tokens=False)["input_ids"])
        + 1,
    }


def _photo():
    from catreview.data.images import load_rgb
    from tests.conftest import shared_photos_dir

    return load_rgb(sorted((shared_photos_dir() / "Bengal").glob("*.jpg"))[0])


def profile(steps: int) -> None:
    """Per-step cost of the round's configurations on the real model (see the module docstring)."""
    import torch

    from catreview.adapters.train_config import TrainConfig, builtin_first_round
    from catreview.config import Settings
    from catreview.models.offline import builtin_dir, ensure_builtin_vlm
    from catreview.models.vlm import prompts
    from tests.conftest import shared_photos_dir
    from training.data import Collator, Sample
    from training.lora import _RoundTower
    from training.loss import batch_loss
    from training.model import add_lora, load_base_model
    from training.tower import architecture

    base = ensure_builtin_vlm(builtin_dir(Settings.model_fields["demo_dir"].default), "smollm2-lite0")
    root = shared_photos_dir()
    breeds = sorted(p.name for p in root.iterdir() if p.is_dir())
    photos = [(p, prompts.display_name(b)) for b in breeds for p in sorted((root / b).glob("*.jpg"))[:4]]
    names = [prompts.display_name(b) for b in breeds]
    configs = {
        "defaults (b4, r16, fp32)": (TrainConfig(train_projector=True), False),
        "recipe (b8, r8, fp32)": (builtin_first_round(), False),
        "recipe + bf16 autocast": (builtin_first_round(), True),
    }
    per_photo: dict[str, float] = {}
    for tag, (cfg, bf16) in configs.items():
        processor, model = load_base_model(base, torch.float32, torch.device("cpu"))
        if tag.startswith("defaults"):
            print("verdict row, tokens:", _sequence_parts(processor))
        model = add_lora(model, cfg)
        tower = _RoundTower(model, architecture(model), cfg)
        bs = cfg.batch_size
        tower.prepare(processor, [p for p, _ in photos], torch.device("cpu"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.lr)
        collate = Collator(processor)
        rng = random.Random(0)
        tower.train_mode(model)
        times = []
        for i in range(steps + 1):  # the first step (tower outputs computed, allocations) is left out
            chunk = [photos[(i * bs + j) % len(photos)] for j in range(bs)]
            samples = [
                Sample(p, b, "verdict", tuple(prompts.with_other([b, *rng.sample([n for n in names if n != b], 2)])), b)
                for p, b in chunk
            ]
            t0 = time.perf_counter()
            batch = collate(samples)
            t1 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = batch_loss(model, batch)
            t2 = time.perf_counter()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if i:
                times.append((t1 - t0, t2 - t1, t3 - t2))
        c, f, b = (statistics.mean(x) for x in zip(*times))
        per_photo[tag] = (c + f + b) / bs
        print(
            f"{tag:26s} batch {bs}, length {batch['input_ids'].shape[1]}: collate {c:.2f} s, forward {f:.2f} s, "
            f"backward+step {b:.2f} s = {c + f + b:.2f} s/step, {per_photo[tag]:.2f} s/photo ({_load()})",
            flush=True,
        )
        del model, opt
    ref = per_photo["recipe (b8, r8, fp32)"]
    print("s/photo relative to the recipe: " + ", ".join(f"{k} {v / ref:.2f}x" for k, v in per_photo.items()))


# ------------------------------------------------------------------------------------ round


def _run(cmd: list[str], env: dict[str, str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "catreview", *cmd], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - t0
    print(f"\n$ python -m catreview {' '.join(cmd)}   # {seconds:.0f} s, exit {proc.returncode} ({_load()})")
    print(proc.stdout.rstrip())
    if proc.returncode not in (0, 1):
        print(proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return proc.stdout, seconds


def _vlm_round(profile_name: str, env: dict[str, str], max_steps: int | None) -> float:
    """A VLM round of ``profile_name``; its adapter is promoted when the gate did not activate it."""
    flags = ["--vlm", profile_name] + (["--max-steps", str(max_steps)] if max_steps else [])
    _, seconds = _run(["train", *flags], env)
    listing, _ = _run(["adapters", "list", "--vlm", profile_name], env)
    ids = [int(m.group(1)) for m in re.finditer(r"^\s*(\d+) ", listing, flags=re.MULTILINE)]
    if ids and "no adapter active" in listing:  # the gate refused it: promoted by hand, as a user may
        _run(["adapters", "promote", str(max(ids)), "--vlm", profile_name], env)
    return seconds


def round_(cats: Path, max_steps: int | None, compare: bool, workdir: Path) -> None:
    """The user's commands on a fresh database (see the module docstring)."""
    env = {
        **os.environ,
        "CATREVIEW_DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}",
        "CATREVIEW_DATA_DIR": str(workdir / "data"),
        "CATREVIEW_BUILTIN_MODELS": "pretrained",
    }
    t0 = time.perf_counter()
    _run(["import", str(cats), "--labels-from-folders"], env)
    _run(["train", "--stage", "classifier"], env)
    _run(["predict", "--no-reasoning"], env)
    t_first = time.perf_counter() - t0
    _run(["evaluate"], env)
    train_s = _vlm_round("smollm2-lite0", env, max_steps)
    _run(["predict", "--no-reasoning"], env)
    t_vlm = time.perf_counter() - t0
    _run(["evaluate"], env)
    if compare:
        _vlm_round("smollm2-lite2", env, max_steps)
        _run(["compare", "--a", "smollm2-lite0", "--b", "smollm2-lite2"], env)
    print(
        f"\ntime to the first predictions {t_first:.0f} s; to a trained VLM with its predictions {t_vlm:.0f} s "
        f"(the round: {train_s:.0f} s)"
    )


# ------------------------------------------------------------------------------------ options

#: The optional settings measured against the recipe (:func:`options`), by name -> TrainConfig changes.
OPTIONS: dict[str, dict[str, object]] = {
    "recipe (balanced sampler)": {},
    "class-weighted loss": {"balance": "loss"},
    "focal loss (gamma 2)": {"loss": "focal"},
    "tower unfrozen, last epoch": {"unfreeze_tower_last_epoch": True},
}


def _split_rows(cats: Path) -> list[tuple[Path, str, str]]:
    """``(photo, breed, split)``: per breed folder 1/3 test, 1-2 validation, the rest train
    (shuffled with a per-breed seed, so the split does not depend on the other breeds)."""
    rows: list[tuple[Path, str, str]] = []
    for d in sorted(p for p in cats.iterdir() if p.is_dir()):
        files = sorted(d.glob("*.jpg"))
        random.Random(f"split/0/{d.name}").shuffle(files)
        n_test, n_val = round(len(files) / 3), 2 if len(files) >= 20 else 1
        breed = d.name.replace("_", " ")
        rows += [(f, breed, "test") for f in files[:n_test]]
        rows += [(f, breed, "validation") for f in files[n_test : n_test + n_val]]
        rows += [(f, breed, "train") for f in files[n_test + n_val :]]
    return rows


def _fmt_metric(m: dict | None, key: str) -> str:
    x = (m or {}).get(key)
    return "-" if x is None else f"{x:.3f}"


def options(cats: Path, epochs: int, names: list[str], workdir: Path) -> None:
    """One round per entry of :data:`OPTIONS` named in ``names`` on one split (module docstring)."""
    from catreview.adapters.train_config import builtin_first_round
    from catreview.config import BUILTIN_VLM_SMALL, Settings
    from catreview.models.offline import builtin_dir, ensure_builtin_vlms
    from tests.export_builder import write_export
    from training.lora import train_round

    model = ensure_builtin_vlms(builtin_dir(Settings.model_fields["demo_dir"].default))[BUILTIN_VLM_SMALL]
    rows = _split_rows(cats)
    export = write_export(rows, workdir / "export")
    counts = {s: sum(r[2] == s for r in rows) for s in ("train", "validation", "test")}
    print(f"\noptions: {BUILTIN_VLM_SMALL}, {epochs} epochs, split {counts} ({_load()})")
    print("| setting | test 3-way: base -> best | test top-1 (4 answers) | test balanced | best step | s/step |")
    print("|---|---|---|---|---|---|")
    for name in names:
        cfg = builtin_first_round(epochs=epochs, **OPTIONS[name])
        result = train_round(export, model, workdir / re.sub(r"\W+", "-", name), cfg, resume=False)
        base, best = result["initial_test_metrics"], result["test_metrics"]
        per_step = result["train_seconds"] / max(result["steps"], 1)
        print(
            f"| {name} | {_fmt_metric(base, 'candidate_accuracy')} -> {_fmt_metric(best, 'candidate_accuracy')} "
            f"| {_fmt_metric(base, 'accuracy')} -> {_fmt_metric(best, 'accuracy')} "
            f"| {_fmt_metric(base, 'balanced_accuracy')} -> {_fmt_metric(best, 'balanced_accuracy')} "
            f"| {result['best_step']} of {result['steps']} | {per_step:.2f} ({_load()}) |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    from tests.conftest import shared_photos_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["profile", "round", "options"], help="run one part (default profile and round)")
    p.add_argument("--steps", type=int, default=4, help="profile: timed steps per configuration")
    p.add_argument("--max-steps", type=int, help="round: cap on optimizer steps (default: the recipe's epochs)")
    p.add_argument("--compare", action="store_true", help="round: also train smollm2-lite2 and compare the two")
    p.add_argument("--images", type=Path, default=None, help="photo folder (default: the shared photos)")
    p.add_argument("--workdir", type=Path, help="round/options: working folder (default: a temporary folder)")
    p.add_argument("--epochs", type=int, default=4, help="options: epochs of each round (default 4)")
    p.add_argument(
        "--option", action="append", choices=list(OPTIONS), help="options: the settings to run (default: all)"
    )
    args = p.parse_args(argv)
    if args.only in (None, "profile"):
        profile(args.steps)
    cats = args.images or shared_photos_dir()
    parts = {
        "round": lambda w: round_(cats, args.max_steps, args.compare, w),
        "options": lambda w: options(cats, args.epochs, args.option or list(OPTIONS), w),
    }
    for part, run in parts.items():
        if args.only == part or (args.only is None and part == "round"):
            if args.workdir:
                args.workdir.mkdir(parents=True, exist_ok=True)
                run(args.workdir)
            else:
                with tempfile.TemporaryDirectory(prefix=f"vlm-{part}-") as tmp:
                    run(Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
