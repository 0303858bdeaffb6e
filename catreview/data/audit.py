"""Audit trail: training rounds, promotions, rollbacks, exports, user changes and overlap rounds
started, who and when.

Append-only: rows of ``audit_events`` are only inserted (:func:`record`), never updated or
deleted by catreview. Read newest first with keyset pagination (:func:`events`).
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from sqlmodel import Session, col, select

from catreview.data.db import AuditEvent


class AuditAction(StrEnum):
    """What an audit event records."""

    TRAIN_START = "train_start"
    TRAIN_CANCEL = "train_cancel"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    NO_VERSION = "no_version"
    EXPORT = "export"
    CALIBRATE = "calibrate"
    USER_ADD = "user_add"
    USER_ROLE = "user_role"
    USER_DISABLE = "user_disable"
    USER_ENABLE = "user_enable"
    USER_PASSWORD = "user_password"
    OVERLAP_START = "overlap_start"


def record(session: Session, actor: str, action: AuditAction | str, target: str = "", **detail: Any) -> AuditEvent:
    """Append one event and commit. ``detail`` values must be JSON-serialisable.

    Raises:
        TypeError: a ``detail`` value that JSON cannot encode.
    """
    event = AuditEvent(
        actor=actor, action=AuditAction(action).value, target=target, detail_json=json.dumps(detail, sort_keys=True)
    )
    session.add(event)
    session.commit()
    session.refresh(event)
    return event


def events(session: Session, *, limit: int = 100, before: int | None = None) -> list[AuditEvent]:
    """Up to ``limit`` (1..1000) events, newest first; ``before``: only events with a smaller id
    (the last id of the previous page).

    Raises:
        ValueError: ``limit`` out of range.
    """
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be in 1..1000, not {limit}")
    q = select(AuditEvent)
    if before is not None:
        q = q.where(col(AuditEvent.id) < before)
    return list(session.exec(q.order_by(col(AuditEvent.id).desc()).limit(limit)))


__all__ = ["AuditAction", "events", "record"]
