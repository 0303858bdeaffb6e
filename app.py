"""Start the catreview web app: ``python app.py [--images DIR [--labels-from-folders | --labels
FILE.csv]] [--config FILE] [--db URL] [--host ADDR [--no-auth]]``.

With no configuration it runs on the built-in offline models (ImageNet EfficientNet-Lite, and
VLMs built from EfficientNet-Lite + SmolLM2, built once and cached) and opens on a free local port;
on a labelled folder it trains them in the background (stage 1 first, then a LoRA round).

Who may do what (:func:`catreview.app.auth.resolve_auth`): with users in the database
(``python -m catreview users add``) everyone logs in; with ``auth_header`` and ``trusted_proxies``
configured, the reverse proxy names the user; with neither, the app runs open (every caller an
admin) on a loopback host only, unless ``--no-auth`` is given (a warning is printed). Uploads are
limited to ``max_upload_mb``; errors reach the browser without SQL or server paths.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

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
    p.add_argument("--annotator", help="the name reviews are recorded under when no login is required (open mode)")
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="with no users, listen on a non-loopback --host anyway: anyone who reaches the port can review, "
        "train, promote and export",
    )
    p.add_argument(
        "--no-predict",
        action="store_true",
        help="do not run predictions in the background at start (run `python -m catreview predict` instead, "
        "e.g. on a GPU machine or with accelerate launch)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the settings, check the models, decide how callers are identified, start the UI and
    the background predictions; returns the exit status (2 for a configuration, model or
    access-setup error, printed as one line)."""
    args = parse_args(argv)
    from catreview.app.auth import password_checker, resolve_auth, trusted_header_identity
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
        # before the models load: an open app on a public host is refused at once
        auth = resolve_auth(app.engine, settings, args.host, no_auth=args.no_auth)
        app.check_models()
    except (CatreviewError, ValueError) as exc:  # database URL/driver/file; AuthSetupError; bad proxy; model paths
        print(f"error: {exc}", file=sys.stderr)
        return 2
    access: dict[str, Any] = {}
    if auth.mode == "login":
        access["auth"] = password_checker(app.engine)
    elif auth.mode == "header":
        access["auth_dependency"] = trusted_header_identity(auth)
    if args.no_auth and auth.mode != "open":
        print(
            f"warning: --no-auth ignored: {auth.mode} mode (users or a trusted header are configured)", file=sys.stderr
        )
    elif args.no_auth:
        print(
            f"warning: --no-auth: no login on {args.host}; anyone who can reach the port can review, train, "
            "promote, roll back and export (all as admin). Add users with `python -m catreview users add`.",
            file=sys.stderr,
        )
    demo = build_ui(app, auth)
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            show_error=False,  # public_errors turns known failures into one-line messages with a reference
            max_file_size=f"{settings.max_upload_mb}mb",
            prevent_thread_lock=True,
            **access,
        )
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
