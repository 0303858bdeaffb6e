"""Command-line interface: ``python -m catreview <command> [--db URL] [--config FILE] ...``.

Commands: ``import`` (photos and existing labels), ``predict`` (both stages, cached),
``predictions --json`` (one JSON object per photo per line), ``calibrate`` (fit temperatures and
the fusion weight on reviewed photos), ``export`` (curated dataset), ``train`` (a LoRA round),
``adapters`` (list, promote, roll back LoRA adapter versions), ``compare`` (two VLM profiles on
the reviewed photos), ``evaluate`` (every model version on the held-out reviewed photos),
``queue`` (a review queue's photos with the reason each is there), ``label-errors`` (labelled
photos ranked by how likely their label is wrong), ``duplicates`` (exact and near duplicate photos
with conflicting labels), ``users`` (accounts and roles for the app's login), ``agreement``
(inter-annotator agreement of the overlap round), ``overlap start`` (start an overlap round).

Errors a user can fix (bad paths, bad config, unknown labels) print one line on stderr and exit
with status 2; nothing stored is changed by a failed command.

Helpers that sub-commands defined in core modules share (``--db``/``--config``, settings from the
arguments, progress bars) live in :mod:`catreview.cli.common`; nothing imports this module but
the entry points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from catreview.cli.common import add_common_options, progress_bar, record_audit, settings_from_args
from catreview.config import Settings
from catreview.errors import CatreviewError


class CLIError(CatreviewError):
    """An error reported to the user as one line, exit status 2."""


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all sub-commands."""
    parser = argparse.ArgumentParser(
        prog="python -m catreview", description="Review a cat-breed classifier with a VLM in the loop."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="import a folder of photos (recursively)")
    add_common_options(p)
    p.add_argument("folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--labels",
        metavar="FILE.csv",
        help="existing labels: CSV with columns path,label or path,breed (paths relative to FOLDER)",
    )
    g.add_argument(
        "--labels-from-folders", action="store_true", help="existing labels: the parent folder name of each photo"
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes hashing and decoding photos (default: every usable core; 1: no extra processes)",
    )
    p.add_argument("--batch-size", type=int, metavar="N", help="photos written per transaction (default 256)")

    p = sub.add_parser(
        "import-llava", help="seed labels from a LLaVA JSONL file of a catreview export (e.g. another database's)"
    )
    add_common_options(p)
    p.add_argument("jsonl", metavar="FILE.jsonl", help="records as written by `export` (llava/<split>.jsonl)")
    p.add_argument(
        "--images-root", required=True, metavar="DIR", help="folder the records' image paths are relative to"
    )

    p = sub.add_parser("predict", help="run stage 1 and the VLM on every imported photo (cached)")
    add_common_options(p)
    p.add_argument("--vlm", metavar="PROFILE", help="VLM profile (default: active_vlm)")
    p.add_argument(
        "--no-reasoning",
        action="store_true",
        help="skip generating the reasoning texts (the slow part; the app streams them on demand)",
    )
    p.add_argument(
        "--workers",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="DataLoader processes decoding photos (default: CPUs / processes - 1, at most 16, for 512+ photos; 0: decode "
        "in the main process)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stage-1 photos per batch (default: classifier.batch_size of the settings)",
    )

    p = sub.add_parser("predictions", help="list photos with their predictions and reviews")
    add_common_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per photo per line")
    p.add_argument("--vlm", metavar="PROFILE", help="VLM profile whose predictions to list (default: active_vlm)")

    p = sub.add_parser("calibrate", help="fit temperatures and the fusion weight on reviewed photos")
    add_common_options(p)
    p.add_argument("--vlm", metavar="PROFILE", help="VLM profile to calibrate with (default: active_vlm)")
    p.add_argument("--dry-run", action="store_true", help="report only; do not store the fit")

    p = sub.add_parser("export", help="export reviewed photos as a curated, versioned dataset")
    add_common_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="export folder (must be absent or empty)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument(
        "--image-size", type=int, default=336, help="shortest side in px (336 for LLaVA-1.5, 512 for Pixtral)"
    )
    p.add_argument("--cap-per-breed", type=int, default=None, help="at most this many photos per breed")
    p.add_argument("--oversample", action="store_true", help="oversample minority breeds in train only")
    p.add_argument("--resplit", action="store_true", help="forget sticky splits and split again")
    p.add_argument("--vlm", metavar="PROFILE", help="check records against this profile's processor (default: active)")
    p.add_argument("--no-check", action="store_true", help="skip the processor/chat-template check")
    p.add_argument("--zip", action="store_true", help="also write DIR.zip")
    p.add_argument("--overwrite", action="store_true", help="replace DIR when it holds an earlier catreview export")

    from catreview.cli.compare import add_compare_parser
    from catreview.cli.evaluate import add_evaluate_parser
    from catreview.cli.label_errors import add_duplicates_parser, add_label_errors_parser
    from catreview.cli.queue import add_queue_parser
    from catreview.cli.team import add_agreement_parser, add_overlap_parser
    from catreview.cli.train import add_adapters_parser, add_train_parser
    from catreview.cli.users import add_users_parser

    add_train_parser(sub)
    add_adapters_parser(sub)
    add_compare_parser(sub)
    add_evaluate_parser(sub)
    add_label_errors_parser(sub)
    add_duplicates_parser(sub)
    add_queue_parser(sub)
    add_users_parser(sub)
    add_agreement_parser(sub)
    add_overlap_parser(sub)
    return parser


def cmd_import(args: argparse.Namespace) -> int:
    """``import DIR``: add photos (and labels from a CSV or folder names) to the database; prints the summary.
    Returns 0, or 1 when some files or folders could not be read at all (each is listed; nothing is stored for them)."""
    from catreview.data.db import make_engine
    from catreview.data.importer import BATCH_SIZE, import_folder
    from catreview.data.labels import BreedVocabulary

    settings = settings_from_args(args)
    engine = make_engine(settings.database_url)
    bar = tqdm(desc="import", unit="photo", file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        summary = import_folder(
            engine,
            args.folder,
            vocabulary=BreedVocabulary.from_labels_file(settings.classifier.labels_file),
            labels_csv=args.labels,
            labels_from_folders=args.labels_from_folders,
            progress=progress,
            workers=args.workers,
            batch_size=args.batch_size if args.batch_size is not None else BATCH_SIZE,
        )
    except (NotADirectoryError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from exc
    finally:
        bar.close()
    print("\n".join(summary.lines()))
    return 1 if summary.not_stored else 0


def cmd_import_llava(args: argparse.Namespace) -> int:
    """``import-llava FILE``: record each record's breed as an ``import`` review (photos added when
    new); prints the summary. Returns 0, or 1 when some records could not be imported (each is listed)."""
    from catreview.data.db import make_engine
    from catreview.data.labels import BreedVocabulary
    from catreview.export.llava_import import import_llava_jsonl

    settings = settings_from_args(args)
    if not Path(args.jsonl).is_file():
        raise CLIError(f"LLaVA JSONL file not found: {args.jsonl}")
    summary = import_llava_jsonl(
        make_engine(settings.database_url),
        args.jsonl,
        args.images_root,
        vocabulary=BreedVocabulary.from_labels_file(settings.classifier.labels_file),
    )
    print("\n".join(summary.lines()))
    return 1 if summary.errors else 0  # the records that could be read are recorded either way


def _registry(settings: Settings):
    from catreview.models.registry import ModelRegistry

    return ModelRegistry(settings)


def cmd_predict(args: argparse.Namespace) -> int:
    """``predict``: stage 1, VLM verdicts (and reasoning unless ``--no-reasoning``) for every photo
    not cached yet; a stopped run resumes where it stopped. Returns 0.

    Under ``accelerate launch`` each process (``accelerate.PartialState``: index, count; its own
    GPU) predicts its share of the photos (ids ``% count == index``) and writes its own rows;
    launched plainly it is the only process and predicts everything.
    """
    from accelerate import PartialState

    from catreview.data.db import make_engine
    from catreview.predict.runner import Shard, run_predictions

    settings = settings_from_args(args)
    if args.batch_size is not None:
        settings = settings.model_copy(
            update={"classifier": settings.classifier.model_copy(update={"batch_size": args.batch_size})}
        )
    state = PartialState()
    shard = Shard(state.process_index, state.num_processes)
    engine = make_engine(settings.database_url)
    update, close = progress_bar() if state.is_local_main_process else (None, lambda: None)
    registry = _registry(settings)
    try:
        summary = run_predictions(
            engine,
            registry,
            vlm_name=args.vlm,
            reasoning=not args.no_reasoning,
            progress=update,
            num_workers=args.workers,
            shard=shard,
        )
    finally:
        close()
    lines = summary.lines()
    if shard.count > 1:
        lines = [f"process {shard.index + 1} of {shard.count}: {line}" for line in lines]
        state.wait_for_everyone()
    if state.is_main_process:  # the review queues, from every process's predictions
        from catreview.query.queues import refresh_scores

        lines.append(f"review queues: {refresh_scores(engine, registry)} photos scored (active versions)")
    if shard.count > 1:
        state.destroy_process_group()
    print("\n".join(lines))
    return 0


def cmd_predictions(args: argparse.Namespace) -> int:
    """``predictions``: every photo's stage 1, VLM, fused and review (``--json``: one object a line). Returns 0."""
    from catreview.data.db import make_engine, redact_url
    from catreview.query.photos import iter_views

    settings = settings_from_args(args)
    engine = make_engine(settings.database_url)
    n = 0
    for view in iter_views(engine, _registry(settings), vlm_name=args.vlm):
        n += 1
        if args.json:
            print(json.dumps(view, ensure_ascii=False))
        else:
            s1 = view["stage1"][0]["label"] if view["stage1"] else "-"
            fused = view["fused"]["label"] if view["fused"] else "-"
            rev = view["review"]["label"] if view["review"] else "-"
            print(f"{view['path']}\t{view['error'] or ''}\tstage1={s1}\tfused={fused}\treview={rev}")
    if n == 0:  # stderr: keeps --json output clean
        print(
            f"no photos in {redact_url(settings.database_url)}: run 'python -m catreview import DIR' first "
            "(or check --db)",
            file=sys.stderr,
        )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``calibrate``: fit temperatures and the fusion weight on reviewed photos, store them, print the report. Returns 0."""
    from catreview.app.presenters.calibration import report_text
    from catreview.evaluate.store import fit_and_store

    settings = settings_from_args(args)
    report, stored = fit_and_store(settings, _registry(settings), vlm_name=args.vlm, store=not args.dry_run)
    if stored is not None:
        from catreview.data.audit import AuditAction
        from catreview.data.db import make_engine

        record_audit(make_engine(settings.database_url), AuditAction.CALIBRATE, f"calibration #{stored}")
    print(report_text(report))
    print(f"stored as calibration #{stored}" if stored else "not stored (--dry-run)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``export OUT``: write a curated dataset version (LLaVA JSONL, messages, images, manifest; ``--zip``). Returns 0."""
    from catreview.data.audit import AuditAction
    from catreview.data.db import make_engine
    from catreview.data.labels import BreedVocabulary
    from catreview.export.archive import zip_export
    from catreview.export.dataset import export_dataset

    settings = settings_from_args(args)
    engine = make_engine(settings.database_url)
    processor = None
    if not args.no_check:
        processor = _registry(settings).base_model(args.vlm)
    bar = tqdm(desc="export", unit="photo", file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        summary = export_dataset(
            engine,
            args.out,
            seed=args.seed,
            image_size=args.image_size,
            cap_per_breed=args.cap_per_breed,
            oversample_train=args.oversample,
            resplit=args.resplit,
            processor=processor,
            vocabulary=BreedVocabulary.from_labels_file(settings.classifier.labels_file),
            progress=progress,
            overwrite=args.overwrite,
        )
    except FileExistsError as exc:
        raise CLIError(str(exc).replace("pass overwrite=True", "pass --overwrite")) from exc
    finally:
        bar.close()
    archive = zip_export(summary.out_dir) if args.zip else None
    record_audit(engine, AuditAction.EXPORT, summary.out_dir.name, **summary.audit_detail())
    print("\n".join(summary.lines()))
    if archive is not None:
        print(f"zip: {archive}")
    return 0


def _check_vlm_option(args: argparse.Namespace) -> None:
    """Fail with a one-line :class:`ConfigError` when ``--vlm`` names no configured profile
    (``--base`` overrides ``--vlm``, so it is then not looked up)."""
    if getattr(args, "vlm", None) and not getattr(args, "base", None):
        _registry(settings_from_args(args)).base_model(args.vlm)


def _cmd_train(args: argparse.Namespace) -> int:
    from catreview.cli.train import cmd_train

    _check_vlm_option(args)
    return cmd_train(args)


def _cmd_adapters(args: argparse.Namespace) -> int:
    from catreview.cli.train import cmd_adapters

    _check_vlm_option(args)
    return cmd_adapters(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from catreview.cli.compare import cmd_compare

    return cmd_compare(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from catreview.cli.evaluate import cmd_evaluate

    return cmd_evaluate(args)


def _cmd_queue(args: argparse.Namespace) -> int:
    from catreview.cli.queue import cmd_queue

    return cmd_queue(args)


def _cmd_label_errors(args: argparse.Namespace) -> int:
    from catreview.cli.label_errors import cmd_label_errors

    return cmd_label_errors(args)


def _cmd_duplicates(args: argparse.Namespace) -> int:
    from catreview.cli.label_errors import cmd_duplicates

    return cmd_duplicates(args)


def _cmd_users(args: argparse.Namespace) -> int:
    from catreview.cli.users import cmd_users

    return cmd_users(args)


def _cmd_agreement(args: argparse.Namespace) -> int:
    from catreview.cli.team import cmd_agreement

    return cmd_agreement(args)


def _cmd_overlap(args: argparse.Namespace) -> int:
    from catreview.cli.team import cmd_overlap

    return cmd_overlap(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "import": cmd_import,
    "import-llava": cmd_import_llava,
    "predict": cmd_predict,
    "predictions": cmd_predictions,
    "calibrate": cmd_calibrate,
    "export": cmd_export,
    "compare": _cmd_compare,
    "train": _cmd_train,
    "adapters": _cmd_adapters,
    "evaluate": _cmd_evaluate,
    "label-errors": _cmd_label_errors,
    "duplicates": _cmd_duplicates,
    "queue": _cmd_queue,
    "users": _cmd_users,
    "agreement": _cmd_agreement,
    "overlap": _cmd_overlap,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader went away (``predictions --json | head``): not an error. Point stdout at
        # devnull so the interpreter's final flush does not raise again (Python docs, "Note on
        # SIGPIPE" in the signal module).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise  # a bug: keep the traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix: reported as one line, exit status 2.

    Every :class:`~catreview.errors.CatreviewError` (config, reviews, exports, models, training,
    compare). ``ValueError`` is included because the domain code reports bad input with it (with a
    message saying what to change, e.g. too few reviews to calibrate, an image size below 16 px);
    missing files and folders too. ``KeyError`` is not: outside the explicit lookups that raise
    ``ConfigError``, a ``KeyError`` is a bug and keeps its traceback.
    """
    return (CatreviewError, ValueError, FileNotFoundError, NotADirectoryError)


def run(argv: Any = None) -> None:
    """``python -m catreview`` entry."""
    raise SystemExit(main(argv))
