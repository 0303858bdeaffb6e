"""Start the catreview web app: ``python app.py [--images DIR [--labels-from-folders | --labels
FILE.csv]] [--config FILE] [--db URL]``.

With no configuration it runs on the built-in offline models (ImageNet EfficientNet-Lite, and
VLMs built from EfficientNet-Lite + SmolLM2, built once and cached) and opens on a free local port;
on a labelled folder it trains them in the background (stage 1 first, then a LoRA round).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The launcher's options (see the module docstring)."""
    p = argparse.ArgumentParser(description="catreview review app")
    p.add_argument("--images", metavar="DIR", action="append", help="import this folder at start (repeatable)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="with --images: each photo's folder name is its breed (Maine_Coon/x.jpg), recorded as a review",
    )
    labels.add_argument(
        "--labels", metavar="FILE.csv", type=Path, help="with --images: existing labels (columns path,label)"
    )
    p.add_argument("--config", metavar="FILE", help="TOML settings file (see assets/example_config.toml)")
    p.add_argument("--db", metavar="URL", help="database URL (default: sqlite file under db/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one from 7860)")
    p.add_argument("--annotator", help="default annotator name shown in the page")
    p.add_argument(
        "--no-predict",
        action="store_true",
        help="do not run predictions in the background at start (run `python -m catreview predict` instead, "
        "e.g. on a GPU machine or with accelerate launch)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the settings, check the models, start the UI and the background predictions; returns
    the exit status (2 for a configuration or model error, printed as one line)."""
    args = parse_args(argv)
    from catreview.app.core import ReviewApp
    from catreview.app.ui import build_ui
    from catreview.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config, database_url=args.db, annotator=args.annotator)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folders = [Path(d) for d in args.images or []]
    missing = [str(d) for d in folders if not d.is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    from catreview.errors import CatreviewError

    try:
        app = ReviewApp(settings)
        app.check_models()
    except (CatreviewError, ValueError) as exc:  # database URL/driver/file; model paths
        print(f"error: {exc}", file=sys.stderr)
        return 2
    demo = build_ui(app)
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=True, prevent_thread_lock=True)
    except OSError as exc:  # port taken or address not available
        where = f"port {args.port}" if args.port else "a free port from 7860"
        print(
            f"error: cannot listen on {args.host}, {where}: it is in use or not available "
            f"({type(exc).__name__}). Choose another --port, or leave --port out to take a free one.",
            file=sys.stderr,
        )
        return 2
    if (args.labels or args.labels_from_folders) and not folders:
        print("error: --labels and --labels-from-folders need --images DIR", file=sys.stderr)
        return 2
    if args.labels is not None and not args.labels.is_file():
        print(f"error: labels file not found: {args.labels}", file=sys.stderr)
        return 2
    if folders or not args.no_predict:
        app.start_background(
            folders, predict=not args.no_predict, labels_csv=args.labels, labels_from_folders=args.labels_from_folders
        )
    if not args.no_predict:
        app.watch_versions()  # versions promoted by the CLI or another app are predicted too
    demo.block_thread()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
