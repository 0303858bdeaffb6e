"""``python -m catreview evaluate``: stage 1, VLM and fused accuracy of every stored model version
on the held-out reviewed photos (:func:`catreview.evaluate.report.evaluation_report`), as a table
or (``--json``) one JSON object."""

from __future__ import annotations

import argparse
import json
from typing import Any

from catreview.cli.common import add_common_options, positive_int, settings_from_args
from catreview.errors import CatreviewError


class NothingToEvaluateError(CatreviewError):
    """No held-out reviewed photo has predictions (one line, exit status 2)."""


def add_evaluate_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command to ``sub`` (the CLI's ``add_subparsers()`` object)."""
    p = sub.add_parser(
        "evaluate", help="accuracy of every model version (stage 1, VLM, fused) on held-out reviewed photos"
    )
    add_common_options(p)
    p.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    p.add_argument(
        "--vlm", metavar="PROFILE", help="profile whose current version is marked active (default: active_vlm)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=1000, metavar="N", help="photos read per query (default 1000)"
    )
    return p


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``evaluate``: print the report; returns 0.

    Raises:
        NothingToEvaluateError: no held-out reviewed photo has predictions yet.
        catreview.config.ConfigError: bad settings or an unknown ``--vlm`` profile.
    """
    from catreview.app.presenters.evaluate import nothing_to_evaluate, report_text
    from catreview.data.db import make_engine
    from catreview.evaluate.report import active_versions, evaluation_report
    from catreview.models.registry import ModelRegistry

    settings = settings_from_args(args)
    engine = make_engine(settings.database_url)
    registry = ModelRegistry(settings, engine=engine)
    if args.vlm:
        registry.profile(args.vlm)  # an unknown name is a one-line ConfigError
    from catreview.heads.versions import stage1_training_hashes

    report = evaluation_report(
        engine,
        settings,
        active=active_versions(registry, args.vlm),
        stage1_trained=stage1_training_hashes,
        batch_size=args.batch_size,
    )
    if not report.rows:
        raise NothingToEvaluateError(nothing_to_evaluate(report))
    print(json.dumps(report.to_dict(), ensure_ascii=False) if args.json else report_text(report))
    return 0
