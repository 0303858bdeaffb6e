"""``python -m catreview queue --by KIND --limit N [--json]``: the photos of a review queue, in the
order the Review tab serves them, each with its "why it is here" line
(:func:`catreview.query.queues.queue_items`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from catreview.cli.common import add_common_options, positive_int, settings_from_args


def add_queue_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``queue`` sub-command to ``sub`` (the CLI's ``add_subparsers()`` object)."""
    from catreview.query.queues import MAX_LIMIT, QUEUE_KINDS

    kinds = ", ".join(f"{k} ({t.lower()})" for k, t in QUEUE_KINDS.items())
    p = sub.add_parser("queue", help="list the photos of a review queue, most useful first, with reasons")
    add_common_options(p)
    p.add_argument("--by", required=True, choices=list(QUEUE_KINDS), metavar="KIND", help=f"the queue: {kinds}")
    p.add_argument(
        "--limit", type=positive_int, default=50, metavar="N", help=f"photos to list (default 50, at most {MAX_LIMIT})"
    )
    p.add_argument("--after", type=positive_int, metavar="ID", help="start after this photo id (default: the start)")
    p.add_argument("--json", action="store_true", help="one JSON object per photo per line")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="recompute the queue scores from the stored predictions first (done after every `predict`)",
    )
    return p


def cmd_queue(args: argparse.Namespace) -> int:
    """Run ``queue``: print the queue's photos; returns 0.

    JSON lines: ``{"id", "path", "queue", "score", "reason", "label"}`` (``label``: the current
    label, imported or ``null``). Text: one line a photo (id, score, file name, reason).

    Raises:
        ValueError: ``--limit`` above the maximum (one line, exit status 2).
        catreview.config.ConfigError: bad settings.
    """
    from sqlmodel import Session, col, select

    from catreview.data.db import ImageRecord, PhotoScore, make_engine
    from catreview.query.queues import QUEUE_KINDS, queue_items, refresh_scores

    settings = settings_from_args(args)
    engine = make_engine(settings.database_url)
    if args.refresh:
        from catreview.models.registry import ModelRegistry

        refresh_scores(engine, ModelRegistry(settings, engine=engine))
    items = queue_items(engine, args.by, limit=args.limit, after=args.after)
    with Session(engine) as s:
        ids = [it.image_id for it in items]
        rows = s.exec(
            select(ImageRecord.id, ImageRecord.path, ImageRecord.current_label).where(col(ImageRecord.id).in_(ids))
        )
        info = {int(i): (path, label) for i, path, label in rows if i is not None}
        scored = s.exec(select(PhotoScore.image_id).limit(1)).first() is not None
    if not items and args.by != "import" and not scored:
        print(
            "no queue scores yet: run `python -m catreview predict` (or `queue --refresh` when predictions exist)",
            file=sys.stderr,
        )
    for it in items:
        path, label = info.get(it.image_id, ("", None))
        if args.json:
            row = {"id": it.image_id, "path": path, "queue": args.by, "score": it.score, "reason": it.reason}
            print(json.dumps({**row, "label": label}, ensure_ascii=False))
        else:
            print(f"{it.image_id:>8}  {it.score:7.3f}  {path.rsplit('/', 1)[-1]}  {it.reason}")
    if not args.json:
        print(f"{len(items)} photo(s) in queue {args.by!r} ({QUEUE_KINDS[args.by]})", file=sys.stderr)
    return 0
