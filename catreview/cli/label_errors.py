"""``python -m catreview label-errors``: labelled photos ranked by how likely their label is wrong
(:func:`catreview.evaluate.label_errors.rank_label_issues`: cleanlab on the active stage-1 head's
out-of-fold probabilities, mixed with the VLM's where it ran). The flagged ones are stored as
the "likely label errors" queue (``--no-store`` leaves the database as it is).

``python -m catreview duplicates``: groups of exact and near duplicates (perceptual hash,
:mod:`catreview.evaluate.duplicates`) whose labels conflict (``--all``: every group); photos
imported before hashes existed are hashed first (:func:`catreview.data.phash.backfill_phashes`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from catreview.cli.common import add_common_options, positive_int, settings_from_args


def add_label_errors_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``label-errors`` sub-command to ``sub`` (the CLI's ``add_subparsers()`` object)."""
    p = sub.add_parser(
        "label-errors", help="rank labelled photos by how likely their label is wrong (confident learning)"
    )
    add_common_options(p)
    p.add_argument("--limit", type=positive_int, default=50, metavar="N", help="photos to print (default 50)")
    p.add_argument("--json", action="store_true", help="one JSON object per photo per line")
    p.add_argument("--flagged-only", action="store_true", help="print only the photos cleanlab flags")
    p.add_argument("--no-vlm", action="store_true", help="out-of-fold stage-1 probabilities only")
    p.add_argument("--no-store", action="store_true", help="do not update the 'likely label errors' queue")
    return p


def cmd_label_errors(args: argparse.Namespace) -> int:
    """Run ``label-errors``: print the ranking (most likely wrong first); returns 0.

    Raises:
        catreview.evaluate.label_errors.LabelIssuesUnavailable: no stage-1 head version trained.
        catreview.config.ConfigError: bad settings.
    """
    from catreview.data.db import make_engine
    from catreview.evaluate.label_errors import rank_label_issues
    from catreview.models.registry import ModelRegistry

    settings = settings_from_args(args)
    engine = make_engine(settings.database_url)
    registry = ModelRegistry(settings, engine=engine)
    ranking = rank_label_issues(engine, registry, use_vlm=not args.no_vlm, store=not args.no_store)
    issues = ranking.flagged if args.flagged_only else ranking.issues
    shown = issues[: args.limit]
    if args.json:
        for it in shown:
            print(json.dumps(it.to_dict(), ensure_ascii=False))
        return 0
    print(ranking.summary())
    for it in shown:
        mark = "*" if it.flagged else " "
        print(
            f"{mark} #{it.image_id:<7} {it.score:.3f}  {it.given_label} -> {it.suggested_label} "
            f"{it.suggested_prob:.2f}  ({it.reason})"
        )
    if len(issues) > len(shown):
        print(f"... {len(issues) - len(shown)} more (--limit N); * = flagged by cleanlab")
    return 0


def add_duplicates_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``duplicates`` sub-command to ``sub``."""
    p = sub.add_parser("duplicates", help="exact and near duplicate photos (perceptual hash) with conflicting labels")
    add_common_options(p)
    p.add_argument("--all", action="store_true", help="every duplicate group, not only those with conflicting labels")
    p.add_argument("--json", action="store_true", help="one JSON object per group per line")
    p.add_argument("--limit", type=positive_int, default=100, metavar="N", help="groups to print (default 100)")
    return p


def cmd_duplicates(args: argparse.Namespace) -> int:
    """Run ``duplicates``: hash photos that lack a hash, then print the groups; returns 0.

    Raises:
        catreview.config.ConfigError: bad settings.
    """
    from catreview.data.db import make_engine
    from catreview.data.phash import MAX_DISTANCE, backfill_phashes
    from catreview.evaluate.duplicates import duplicate_groups_with_labels

    settings = settings_from_args(args)
    engine = make_engine(settings.database_url)
    hashed, failed = backfill_phashes(engine)
    groups = duplicate_groups_with_labels(engine, conflicting_only=not args.all)
    shown = groups[: args.limit]
    if args.json:
        for g in shown:
            members = [
                {"image_id": m.image_id, "path": m.path, "label": m.label, "source": m.source, "distance": m.distance}
                for m in g.members
            ]
            print(
                json.dumps({"labels": g.labels, "conflicting": g.conflicting, "members": members}, ensure_ascii=False)
            )
        return 0
    noun = "duplicate group" if len(groups) == 1 else "duplicate groups"
    what = noun if args.all else f"{noun} with conflicting labels"
    line = f"{len(groups)} {what} (perceptual hash within {MAX_DISTANCE} bits)"
    if hashed or failed:
        line += f"; {hashed} photos hashed now" + (f", {len(failed)} no longer decode" if failed else "")
    print(line)
    for g in shown:
        print(
            "  "
            + ", ".join(
                f"#{m.image_id} {m.label or 'unlabelled'}{'' if m.distance == 0 else f' (+{m.distance} bits)'}"
                for m in g.members
            )
        )
    if len(groups) > len(shown):
        print(f"... {len(groups) - len(shown)} more (--limit N)")
    return 0


__all__ = ["add_duplicates_parser", "add_label_errors_parser", "cmd_duplicates", "cmd_label_errors"]
