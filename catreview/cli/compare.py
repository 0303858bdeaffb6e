"""``python -m catreview compare``: the aggregate comparison of two VLM profiles (or two adapter
versions of one) as plain-text tables, with optional CSV and DPO preference exports."""

from __future__ import annotations

import argparse
from typing import Any

from catreview.cli.common import add_common_options, progress_bar, record_audit, settings_from_args


def add_compare_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` sub-command to ``sub`` (the CLI's ``add_subparsers()`` object)."""
    p = sub.add_parser("compare", help="compare two VLM profiles on the reviewed photos (cached)")
    add_common_options(p)
    p.add_argument("--a", metavar="PROFILE", help="side A (default: compare_profiles[0] or the first profile)")
    p.add_argument("--b", metavar="PROFILE", help="side B (default: compare_profiles[1] or the second profile)")
    p.add_argument("--base", metavar="PROFILE", help="compare adapter versions of this profile (with --adapter-a/-b)")
    p.add_argument("--adapter-a", metavar="DIR", help="adapter folder of side A ('' or omitted: no adapter)")
    p.add_argument("--adapter-b", metavar="DIR", help="adapter folder of side B ('' or omitted: no adapter)")
    p.add_argument("--one-at-a-time", action="store_true", help="keep only one model in memory (load/unload in turn)")
    p.add_argument("--csv", metavar="DIR", help="also write compare_{summary,per_breed,photos}.csv into DIR")
    p.add_argument("--preferences-out", metavar="FILE.jsonl", help="also export blind preferences as DPO pairs")
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``compare``: print the aggregate tables; returns the exit status (0).

    Raises:
        CompareError / ConfigError (both ``ValueError``): bad profiles, adapters or config, or a
            model that cannot be loaded.
    """
    # Imported here, not at the top: building the parser must not load torch (every CLI start,
    # e.g. eight parallel `import` runs, would pay for it).
    from catreview.compare.errors import CompareError
    from catreview.compare.session import CompareSession
    from catreview.data.audit import AuditAction
    from catreview.data.db import make_engine
    from catreview.data.labels import BreedVocabulary
    from catreview.export.preferences import export_preference_pairs
    from catreview.models.registry import ModelRegistry
    from catreview.models.vlm.types import VLMError

    settings = settings_from_args(args)
    engine = make_engine(settings.database_url)
    vocabulary = BreedVocabulary.from_labels_file(settings.classifier.labels_file)
    session = CompareSession(settings, ModelRegistry(settings), engine, vocabulary)
    if args.base:
        if args.a or args.b:
            raise CompareError("give either --a/--b or --base with --adapter-a/--adapter-b, not both")
        name_a, name_b = session.add_adapter_pair(args.base, args.adapter_a, args.adapter_b)
    else:
        pair = session.default_pair()
        name_a, name_b = args.a or pair.a, args.b or pair.b
        if pair.note and not (args.a and args.b):
            print(f"note: {pair.note}")
    update, close = progress_bar()
    try:
        result = session.run_aggregate(name_a, name_b, one_at_a_time=args.one_at_a_time, progress=update)
    except VLMError as exc:  # model folder missing, out of memory...: one line, exit status 2
        raise CompareError(str(exc)) from exc
    finally:
        close()
    print(result.to_text())
    if args.csv:
        print("wrote " + ", ".join(str(p) for p in result.write_csv(args.csv)))
    if args.preferences_out:
        written = export_preference_pairs(engine, args.preferences_out)
        record_audit(engine, AuditAction.EXPORT, written.path.name, kind="preferences", pairs=written.pairs)
        print(written.text())
    return 0


__all__ = ["add_compare_parser", "cmd_compare"]
