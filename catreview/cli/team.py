"""``python -m catreview agreement [--json]``: the overlap round's agreement figures
(:func:`catreview.app.team.agreement`: Krippendorff's alpha, Cohen's kappa per pair,
per-annotator accuracy against final labels, photos by status).

``python -m catreview overlap start [--share 0.1] [--k 2]``: put a share of the photos without a
human decision into the overlap round, ``k`` annotators each (defaults: the settings'
``overlap_share`` and ``overlap_k``); recorded in the audit log as done by
:data:`catreview.cli.users.CLI_ACTOR`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from catreview.cli.common import add_common_options, settings_from_args


def _share(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1 (0.1 = 10%), got {value}")
    return value


def _k(text: str) -> int:
    """argparse type: a whole number >= 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"an overlap round needs at least 2 annotators per photo, got {value}")
    return value


def add_agreement_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``agreement`` sub-command to ``sub`` (the CLI's ``add_subparsers()`` object)."""
    p = sub.add_parser("agreement", help="inter-annotator agreement of the overlap round (alpha, kappa, accuracy)")
    add_common_options(p)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p


def add_overlap_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``overlap`` sub-command (verb ``start``) to ``sub``."""
    p = sub.add_parser("overlap", help="overlap rounds: photos labelled by several annotators blind to each other")
    verbs = p.add_subparsers(dest="verb", required=True)
    start = verbs.add_parser("start", help="start (or extend) the overlap round")
    add_common_options(start)
    start.add_argument("--share", type=_share, default=None, help="share of photos, (0, 1] (default: overlap_share)")
    start.add_argument("--k", type=_k, default=None, help="annotators per photo, >= 2 (default: overlap_k)")
    return p


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def cmd_agreement(args: argparse.Namespace) -> int:
    """Run ``agreement``: print the figures (a table, or ``--json`` one object); returns 0.

    Raises:
        catreview.config.ConfigError: bad settings.
    """
    from catreview.app.team import STATUSES, agreement
    from catreview.data.db import make_engine

    figures = agreement(make_engine(settings_from_args(args).database_url))
    if args.json:
        print(json.dumps(figures.to_dict()))
        return 0
    r = figures.report
    if figures.in_round == 0:
        print("no overlap round yet (python -m catreview overlap start)")
        return 0
    print(f"overlap round: {figures.in_round} photos: " + ", ".join(f"{figures.counts[s]} {s}" for s in STATUSES))
    print(f"Krippendorff's alpha (nominal): {_fmt(r.alpha)} on {r.n_photos} photos with >= 2 votes ({r.n_votes} votes)")
    if r.pairs:
        print("pair\tshared\tequal\tCohen's kappa")
        for p in r.pairs:
            print(f"{p.a} / {p.b}\t{p.n}\t{_fmt(p.observed)}\t{_fmt(p.kappa)}")
    if r.annotators:
        print("annotator\tvotes\tagreement\tfinal\tcorrect\taccuracy")
        for a in r.annotators:
            print(f"{a.annotator}\t{a.votes}\t{_fmt(a.agree)}\t{a.n_final}\t{a.correct}\t{_fmt(a.accuracy)}")
    return 0


def cmd_overlap(args: argparse.Namespace) -> int:
    """Run ``overlap start``: add photos to the round, audit it, print how many; returns 0.

    Raises:
        catreview.config.ConfigError: bad settings.
    """
    from catreview.app.team import start_overlap_round
    from catreview.cli.users import CLI_ACTOR
    from catreview.data.db import make_engine

    settings = settings_from_args(args)
    share = settings.overlap_share if args.share is None else args.share
    k = settings.overlap_k if args.k is None else args.k
    added = start_overlap_round(make_engine(settings.database_url), share, k, actor=CLI_ACTOR)
    print(f"overlap round: {added} photos added ({share:g} share, {k} annotators each)")
    return 0


__all__ = ["add_agreement_parser", "add_overlap_parser", "cmd_agreement", "cmd_overlap"]
