"""``train`` and ``adapters``: a LoRA round from the command line, and the adapter versions.

``python -m catreview train`` runs a round in a background process (:class:`catreview.adapters.jobs.TrainJobs`)
with a progress bar, then prints the metrics table (validation numbers, the gate decision, per-breed
test accuracy); Ctrl-C cancels it (``--resume-run ID`` continues). ``python -m catreview adapters
list | promote ID | rollback ID|none`` manages versions. ``--stage classifier`` does the same for
stage 1: ``train`` refits the linear head on the frozen backbone (:mod:`catreview.heads`) and
``adapters`` lists / promotes / rolls back its head versions. :mod:`catreview.cli.main` wires both.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session
from tqdm import tqdm

from catreview.adapters.gate import DEFAULT_POLICY, GateDecision, GatePolicy
from catreview.adapters.jobs import TrainJobs
from catreview.adapters.runfolder import LOG_FILE
from catreview.adapters.status import RunStatus
from catreview.adapters.train_config import builtin_first_round
from catreview.adapters.versions import activate, rollback, version_metrics, version_rows
from catreview.app.presenters.train import run_status_line
from catreview.cli.common import add_common_options, record_audit, settings_from_args
from catreview.cli.train_flags import add_config_arguments, config_from_args
from catreview.config import Settings
from catreview.data.audit import AuditAction
from catreview.data.db import active_adapter_version, make_engine


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``train`` to an ``add_subparsers()`` object; returns the sub-parser."""
    p = sub.add_parser(
        "train",
        help="LoRA round on the reviewed photos (export, train, register, gate, maybe activate); "
        "--stage classifier refits the stage-1 head instead",
    )
    add_common_options(p)
    p.add_argument(
        "--stage",
        choices=["vlm", "classifier"],
        default="vlm",
        help="vlm (default): a LoRA round of the VLM; classifier: refit the stage-1 linear head on the frozen "
        "backbone's cached features (seconds once features are cached), gated on the held-out test split",
    )
    p.add_argument("--vlm", metavar="PROFILE", help="VLM profile whose model is adapted (default: active_vlm)")
    p.add_argument("--base", metavar="MODEL", help="base model id/folder (overrides --vlm)")
    p.add_argument(
        "--export", metavar="DIR", type=Path, help="train on this export folder instead of exporting the reviews"
    )
    p.add_argument(
        "--resume-run", metavar="ID", type=int, help="resume a failed/cancelled run from its last checkpoint"
    )
    p.add_argument(
        "--no-activate", action="store_true", help="register the adapter but never activate it automatically"
    )
    p.add_argument(
        "--min-breed-photos",
        type=int,
        default=DEFAULT_POLICY.min_breed_photos,
        help="gate: breeds with fewer test photos are not checked for drops",
    )
    p.add_argument(
        "--max-breed-drop",
        type=float,
        default=DEFAULT_POLICY.max_breed_drop,
        help="gate: largest allowed per-breed test accuracy drop",
    )
    p.add_argument(
        "--min-test-photos",
        type=int,
        default=DEFAULT_POLICY.min_test_photos,
        help="gate: fewest test photos it decides on (else: not gated, promote by hand)",
    )
    p.add_argument(
        "--min-p-better",
        type=float,
        default=DEFAULT_POLICY.min_p_better,
        help="gate: share of paired bootstrap resamples in which the new adapter must be better",
    )
    p.add_argument(
        "--launcher",
        metavar="CMD",
        help='command that runs a module, default this Python; e.g. "accelerate launch --num_processes 4"',
    )
    add_config_arguments(p)
    return p


def add_adapters_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``adapters`` (list / promote ID / rollback ID|none) to an ``add_subparsers()`` object."""
    p = sub.add_parser("adapters", help="list adapter versions, promote one, or roll back (to a version or 'none')")
    add_common_options(p)
    p.add_argument("action", choices=["list", "promote", "rollback"])
    p.add_argument("target", nargs="?", help="version id (promote/rollback) or 'none' (rollback to no adapter)")
    p.add_argument(
        "--vlm", metavar="PROFILE", help="VLM profile whose adapter versions to show or change (default: active_vlm)"
    )
    p.add_argument("--base", metavar="MODEL", help="base model id/folder (overrides --vlm)")
    p.add_argument(
        "--stage",
        choices=["vlm", "classifier"],
        default="vlm",
        help="vlm (default): LoRA adapters of the VLM; classifier: the stage-1 head versions of the configured "
        "(or built-in) backbone ('rollback none': no head version)",
    )
    return p


def _settings_and_engine(args: argparse.Namespace) -> tuple[Settings, Engine]:
    settings = settings_from_args(args)
    return settings, make_engine(settings.database_url)


def _base_model(args: argparse.Namespace, settings: Settings) -> str:
    """``--base``, else the base model of profile ``--vlm`` (default: the active one).

    Raises:
        catreview.models.registry.UnknownProfileError: ``--vlm`` (or ``active_vlm``) names no configured
            profile (a ``ConfigError``).
    """
    if args.base:
        return args.base
    from catreview.models.registry import ModelRegistry

    return ModelRegistry(settings).base_model(args.vlm)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if isinstance(x, float) else str(x)


def metrics_table(status: RunStatus, engine: Engine) -> str:
    """Final CLI table: validation metrics, the gate decision and per-breed accuracy on the split it
    decided on (test; reference vs new)."""
    if status.adapter_id is None:
        return run_status_line(status)
    m = version_metrics(engine, status.adapter_id)
    lines = [
        run_status_line(status),
        f"val balanced accuracy {_fmt(m.get('balanced_accuracy'))}, accuracy {_fmt(m.get('accuracy'))}, "
        f"macro-F1 {_fmt(m.get('macro_f1'))}, val loss {m.get('val_loss', float('nan')):.3f}, best step {m.get('best_step')}",
    ]
    if status.gate:
        decision = GateDecision.from_dict(status.gate)
        lines.append(f"vs {decision.reference}: {decision.summary()}")
        lines.append(f"per-breed {decision.split} accuracy:")
        lines.append(f"{'breed':28s} {'n':>4s} {'before':>8s} {'after':>8s} {'delta':>8s}")
        for b in decision.rows():
            delta = "-" if b["delta"] is None else f"{100 * b['delta']:+.1f}"
            flag = "  BLOCKS" if b["blocking"] else ""
            lines.append(
                f"{b['breed'][:28]:28s} {b['n']:4d} {_fmt(b['reference']):>8s} {_fmt(b['candidate']):>8s} {delta:>8s}{flag}"
            )
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    """``train``: run a round in a background process with a progress bar; print the metrics table.

    Ctrl-C, SIGTERM and SIGHUP cancel the round (its checkpoint is kept; ``--resume-run ID``
    continues it); after a SIGKILL the next start adopts the round (:class:`TrainJobs`).
    Returns 0 when the round succeeded, 1 otherwise. ``--stage classifier``: :func:`cmd_train_classifier`.
    """
    if getattr(args, "stage", "vlm") == "classifier":
        return cmd_train_classifier(args)
    settings, engine = _settings_and_engine(args)
    policy = GatePolicy(
        min_breed_photos=args.min_breed_photos,
        max_breed_drop=args.max_breed_drop,
        min_test_photos=args.min_test_photos,
        min_p_better=args.min_p_better,
    )
    jobs = TrainJobs(
        engine,
        settings,
        policy=policy,
        auto_activate=not args.no_activate,
        launcher=shlex.split(args.launcher) if args.launcher else None,
    )
    base = None if args.resume_run is not None else _base_model(args, settings)
    # A built-in profile's round starts from the CPU recipe (its projector is random); flags override it.
    builtin = base is not None and not args.base and settings.builtin_pretrained_vlm
    cfg = config_from_args(args, base=builtin_first_round() if builtin else None)
    run_id = jobs.start(base or "", cfg, export_dir=args.export, resume_run=args.resume_run)
    started = jobs.status(run_id)
    record_audit(
        engine,
        AuditAction.TRAIN_START,
        f"run #{run_id}",
        stage="vlm",
        base_model=started.base_model if started is not None else base,
        resumed=args.resume_run,
    )
    print(f"training run #{run_id} started; log: {Path(started.run_dir) / LOG_FILE}", file=sys.stderr)  # type: ignore[union-attr]
    bar = tqdm(desc=f"run #{run_id}", unit="step", file=sys.stderr)
    # SIGTERM (kill) and SIGHUP (the terminal closed) cancel the round like Ctrl-C, instead of
    # leaving it running with nobody to register it (SIGKILL cannot be caught: the next start adopts it).
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while jobs.wait(run_id, timeout=1.0) == "running":
            st = jobs.status(run_id)
            if st and st.total_steps:
                bar.total = st.total_steps
                bar.n = st.step
                post = {"loss": f"{st.loss:.3f}"} if st.loss is not None else {}
                if st.val_balanced_accuracy is not None:
                    post["val balanced accuracy"] = f"{st.val_balanced_accuracy:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.refresh()
    except KeyboardInterrupt:
        if jobs.cancel(run_id):
            record_audit(engine, AuditAction.TRAIN_CANCEL, f"run #{run_id}", stage="vlm")
        jobs.wait(run_id, timeout=60)
        print(f"\ncancelled; resume with --resume-run {run_id}", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
    st = jobs.status(run_id)
    print(metrics_table(st, engine))  # type: ignore[arg-type]
    return 0 if st is not None and st.status == "succeeded" else 1


def _policy(args: argparse.Namespace) -> GatePolicy:
    return GatePolicy(
        min_breed_photos=args.min_breed_photos,
        max_breed_drop=args.max_breed_drop,
        min_test_photos=args.min_test_photos,
        min_p_better=args.min_p_better,
    )


def classifier_table(result: Any) -> str:
    """The refit's lines: outcome, test metrics of the new head and the reference, per-breed test
    accuracy, feature cache use and times (a :class:`catreview.heads.refit.RefitResult`)."""
    t, r = result.test, result.reference_test
    lines = [
        result.message,
        f"fitted on {result.n_train} photos (train split), scored on {result.n_test} test photos; "
        f"features: {result.features_computed} computed, {result.features_cached} cached "
        f"({result.feature_seconds:.1f} s of {result.seconds:.1f} s)",
        f"test balanced accuracy {_fmt(t.get('balanced_accuracy'))}, accuracy {_fmt(t.get('accuracy'))}, "
        f"macro-F1 {_fmt(t.get('macro_f1'))} (reference: {_fmt(r.get('balanced_accuracy'))})",
    ]
    if t.get("per_breed"):
        lines.append(f"{'breed':28s} {'n':>4s} {'before':>8s} {'after':>8s}")
        ref = r.get("per_breed") or {}
        for breed, b in sorted(t["per_breed"].items()):
            before = (ref.get(breed) or {}).get("accuracy")
            lines.append(f"{breed[:28]:28s} {b['n']:4d} {_fmt(before):>8s} {_fmt(b['accuracy']):>8s}")
    lines += [f"  failed: {p}: {why}" for p, why in result.failed]
    return "\n".join(lines)


def _change_version(
    engine: Engine,
    base: str,
    action: str,
    target: str | None,
    stage: str,
    promote: Callable[[Engine, int], Any],
    rollback: Callable[[Engine, str, int | None], Any],
) -> None:
    """``promote ID`` / ``rollback ID|none`` of ``stage``'s versions of ``base``, each recorded
    in the audit log (actor ``cli``: ``promote``, ``rollback`` or ``no_version``); ``list``
    changes nothing."""
    if action not in ("promote", "rollback") or not target:
        return
    with Session(engine) as s:
        before = active_adapter_version(s, base)
    previous = before.id if before is not None else None
    if action == "promote":
        row = promote(engine, int(target))
        record_audit(engine, AuditAction.PROMOTE, f"{stage} #{row.id}", stage=stage, base_model=base, previous=previous)
    elif target.lower() == "none":
        rollback(engine, base, None)
        record_audit(
            engine, AuditAction.NO_VERSION, f"no {stage} version", stage=stage, base_model=base, previous=previous
        )
    else:
        row = rollback(engine, base, int(target))
        record_audit(
            engine, AuditAction.ROLLBACK, f"{stage} #{row.id}", stage=stage, base_model=base, previous=previous
        )


def _classifier_versions(action: str, target: str | None, settings: Settings, engine: Engine) -> int:
    """``adapters --stage classifier list | promote ID | rollback ID|none``: the stage-1 head versions."""
    from catreview.heads.versions import head_rows, promote, rollback
    from catreview.models.registry import ModelRegistry

    base = ModelRegistry(settings, engine=engine).stage1_backbone().base_model
    _change_version(engine, base, action, target, "classifier", promote, rollback)
    rows = head_rows(engine, base)
    print(f"{'id':>4s} {'active':6s} {'name':28s} {'created':16s} {'photos':>6s} {'test balanced accuracy':>22s} gate")
    for r in rows:
        print(
            f"{r['id']:4d} {'*' if r['active'] else '':6s} {r['name']:28s} {r['created']:16s} "
            f"{_fmt(r['train_photos']):>6s} {_fmt(r['test_balanced_accuracy']):>22s} {r['gate']}"
        )
    if not any(r["active"] for r in rows):
        print(f"no stage-1 head version active for {base}")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """``train --stage classifier``: refit the stage-1 head (:func:`catreview.heads.refit.refit_classifier`)
    with a progress bar over the photos whose features are not cached yet; print the outcome.

    Returns 0 (a version was stored, activated or not).

    Raises:
        ValueError: options of the VLM round given with ``--stage classifier``.
        catreview.heads.fit.HeadFitError: fewer than two reviewed breeds.
    """
    given = [
        f for f, v in (("--export", args.export), ("--resume-run", args.resume_run), ("--launcher", args.launcher)) if v
    ]
    if given:
        raise ValueError(f"{', '.join(given)} belong to the VLM round; --stage classifier takes none of them")
    from catreview.heads.refit import refit_classifier
    from catreview.models.registry import ModelRegistry

    settings, engine = _settings_and_engine(args)
    registry = ModelRegistry(settings, engine=engine)
    record_audit(engine, AuditAction.TRAIN_START, "classifier", stage="classifier")
    bar = tqdm(desc="stage-1 features", unit="photo", file=sys.stderr)

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "features":
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        result = refit_classifier(registry, policy=_policy(args), auto_activate=not args.no_activate, progress=progress)
    finally:
        bar.close()
    print(classifier_table(result))
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    """``adapters list | promote ID | rollback ID|none``.

    Raises:
        ValueError: a missing, extra or malformed version id (the message says what to give).
    """
    target = args.target.strip() if args.target else None
    if args.action == "list" and target:
        raise ValueError(f"'adapters list' takes no argument (got {target!r})")
    if args.action == "promote" and not (target and target.isdigit()):
        raise ValueError(
            f"promote needs a version id (a number from 'adapters list'), got {target!r}"
            if target
            else "promote needs a version id (a number from 'adapters list')"
        )
    if args.action == "rollback" and not (target and (target.isdigit() or target.lower() == "none")):
        raise ValueError(
            f"rollback needs a version id or 'none', got {target!r}"
            if target
            else "rollback needs a version id (a number from 'adapters list') or 'none'"
        )
    settings, engine = _settings_and_engine(args)
    if getattr(args, "stage", "vlm") == "classifier":
        return _classifier_versions(args.action, target, settings, engine)
    base = _base_model(args, settings)
    _change_version(engine, base, args.action, target, "vlm", activate, rollback)  # target: checked above
    rows = version_rows(engine, base)
    print(f"{'id':>4s} {'active':6s} {'name':28s} {'created':16s} {'val balanced accuracy':>21s} {'gate':8s} export")
    for r in rows:
        print(
            f"{r['id']:4d} {'*' if r['active'] else '':6s} {r['name']:28s} {r['created']:16s} {_fmt(r['val_balanced_accuracy']):>21s} {r['gate']:8s} {r['export']}"
        )
    if not any(r["active"] for r in rows):
        print("no adapter active: the base model predicts alone")
    return 0


__all__ = [
    "add_adapters_parser",
    "add_train_parser",
    "classifier_table",
    "cmd_adapters",
    "cmd_train",
    "cmd_train_classifier",
    "metrics_table",
]
