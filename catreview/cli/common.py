"""Helpers shared by the command-line entry points: common options, settings from the
arguments, a progress bar.

:mod:`catreview.cli.main` wires the commands; core modules that define their own sub-commands
(:mod:`catreview.cli.compare`, :mod:`catreview.cli.train`) import these helpers from here, never
from :mod:`catreview.cli.main`, so imports go one way (cli -> core -> cli_common). This module
imports only the standard library, ``tqdm`` and :mod:`catreview.config` at import time
(:func:`record_audit` imports the database layer when called).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from catreview.config import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

ProgressUpdate = Callable[[str, int, int], None]
"""``update(stage, done, total)``: ``done`` of ``total`` items (photos) of ``stage``."""


def add_common_options(p: argparse.ArgumentParser) -> None:
    """``--db URL`` and ``--config FILE``, which every sub-command takes."""
    p.add_argument("--db", metavar="URL", help="database URL (default: sqlite file under db/)")
    p.add_argument("--config", metavar="FILE", help="TOML settings file (see assets/example_config.toml)")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a bad value is argparse's one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The :class:`Settings` of ``--config`` with ``--db`` overriding the database URL.

    Raises:
        catreview.config.ConfigError: unreadable or invalid settings.
    """
    return load_settings(args.config, database_url=args.db)


def record_audit(engine: Engine, action: str, target: str = "", **detail: Any) -> None:
    """Append an audit row for a command-line action (training, promotion, rollback, export,
    calibration), the actor :data:`catreview.cli.users.CLI_ACTOR` (:func:`catreview.data.audit.record`).

    Raises:
        ValueError: ``action`` is not a :class:`catreview.data.audit.AuditAction`.
    """
    from sqlmodel import Session

    from catreview.cli.users import CLI_ACTOR
    from catreview.data import audit

    with Session(engine) as s:
        audit.record(s, CLI_ACTOR, action, target, **detail)


def progress_bar() -> tuple[ProgressUpdate, Callable[[], None]]:
    """``(update, close)``: ``update(stage, done, total)`` draws one tqdm bar per stage on
    stderr (unit "photo"; hidden when stderr is not a terminal); ``close()`` closes them all."""
    bars: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="photo", file=sys.stderr, disable=None)
        bar.n = done
        bar.refresh()

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


__all__ = ["ProgressUpdate", "add_common_options", "positive_int", "progress_bar", "record_audit", "settings_from_args"]
