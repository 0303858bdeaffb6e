"""``python -m training``: one LoRA round on an export folder (no database access).

Usage::

    python -m training --export db/exports/E --base llava-hf/llava-1.5-7b-hf --out db/runs/R \\
        [--config-json FILE] [--baseline-adapter DIR] [--no-resume] [--epochs 3 --lr 2e-4 ...]

    python -m training --export db/exports/E --base llava-hf/llava-1.5-7b-hf \\
        --evaluate db/adapters/A [--split test]     # score an adapter ('none': the base model), no training

    accelerate launch --num_processes 4 -m training --export ... --base ... --out ... \\
        --mixed-precision bf16

Every :class:`catreview.adapters.train_config.TrainConfig` field is a flag (``--grad-accum``, ``--rank`` ...);
flags override ``--config-json``. The round writes ``OUT/progress.jsonl``, checkpoints,
``OUT/best/`` and finally ``OUT/result.json`` (see :mod:`training.lora`); running the same command
again after a crash resumes from ``OUT/checkpoint-last``. Registering the adapter as a version
(and gating/activating it) is the app's job (:mod:`catreview.adapters.jobs`,
``python -m catreview train``), not this command's. The app launches this module by name with the
repository as working directory (``python -m`` puts it on ``sys.path``).

Exit status: 0 done, 2 unusable inputs (message on stderr), 1 unexpected error (traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``python -m training``."""
    from catreview.cli.train_flags import add_config_arguments

    p = argparse.ArgumentParser(prog="python -m training", description="One LoRA round of the catreview VLM.")
    p.add_argument("--export", required=True, type=Path, help="curated export folder (llava/*.jsonl)")
    p.add_argument("--base", required=True, help="base VLM: hub id or local folder")
    p.add_argument("--out", type=Path, help="run folder (progress, checkpoints, best/, result.json); required to train")
    p.add_argument("--config-json", type=Path, help="TrainConfig as JSON (flags override it)")
    p.add_argument(
        "--baseline-adapter", type=Path, help="the active adapter, evaluated on the same validation and test items"
    )
    p.add_argument("--no-resume", action="store_true", help="ignore OUT/checkpoint-last and start over")
    p.add_argument(
        "--evaluate",
        metavar="ADAPTER",
        help="no training: score this adapter folder ('none': the base model) on --split through the app's "
        "loading path and print its metrics as one JSON object",
    )
    p.add_argument("--split", choices=("validation", "test"), default="validation", help="split scored by --evaluate")
    add_config_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    from catreview.adapters.train_config import TrainConfig
    from catreview.cli.train_flags import config_from_args
    from training.data import ExportFormatError
    from training.errors import TrainingError
    from training.evaluation import evaluate_adapter
    from training.lora import train_round

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.evaluate is None and args.out is None:
        parser.error("--out is required to train (or give --evaluate ADAPTER)")
    try:
        base = TrainConfig.load(args.config_json) if args.config_json else TrainConfig()
        cfg = config_from_args(args, base)
        if args.evaluate is not None:
            adapter = None if args.evaluate.lower() == "none" else Path(args.evaluate)
            if adapter is not None and not adapter.is_dir():
                raise FileNotFoundError(f"adapter folder not found: {adapter}")
            metrics = evaluate_adapter(args.base, adapter, args.export, cfg, split=args.split)
            print(json.dumps(metrics))
            return 0
        result = train_round(
            args.export,
            args.base,
            args.out,
            cfg,
            baseline_adapter=args.baseline_adapter,
            resume=not args.no_resume,
        )
    except (TrainingError, ExportFormatError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line, from the main process
        m = result["metrics"] or {}
        summary = {k: result[k] for k in ("steps", "best_step", "stopped_early", "samples_per_second")}
        summary.update(val_balanced_accuracy=m.get("balanced_accuracy"), val_loss=m.get("val_loss"))
        test, base_test = result.get("test_metrics") or {}, result.get("initial_test_metrics") or {}
        summary.update(
            n_test=result.get("n_test"),
            test_balanced_accuracy=test.get("balanced_accuracy"),
            base_model_test_balanced_accuracy=base_test.get("balanced_accuracy"),
        )
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
