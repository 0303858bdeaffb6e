"""What the Team tab and the ``agreement``/``overlap`` commands read and do: the overlap round's
agreement figures, the adjudication queue, starting a round, the audit log and the users.

- :func:`agreement` reads the round's votes and final labels (:func:`catreview.data.overlap.round_votes`)
  into :func:`catreview.evaluate.agreement.agreement_report`, with the round's photos by status.
  It reads the round's rows (the overlap share of the photos, an on-demand report), nothing else.
- :func:`next_disputed` / :func:`disputed_photo`: one disputed photo at a time, by id after the
  one shown (keyset on ``ix_overlap_items_status_image``, wrapping to the first), with each
  annotator's vote (``overlap_votes.image_id`` index). Never a whole-table read.
- :func:`start_overlap_round`: :func:`catreview.data.overlap.start_round` plus an audit row.
- :func:`audit_page`: audit events newest first, keyset-paged on the primary key.
- :func:`users`: the accounts without their password hashes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.data import accounts, audit, overlap
from catreview.data.audit import AuditAction
from catreview.data.db import ImageRecord, OverlapItem
from catreview.data.labels import BreedVocabulary
from catreview.evaluate.agreement import AgreementReport, Vote, agreement_report

STATUSES = ("open", "agreed", "disputed", "adjudicated")
"""The states of an overlap photo, in the order the Team tab lists them."""

AUDIT_PAGE = 50
"""Audit events per page of the Team tab."""


@dataclass(frozen=True)
class TeamAgreement:
    """The round's agreement figures (``report``) and its photos by status (``counts``: every
    name of :data:`STATUSES`, 0 when none)."""

    report: AgreementReport
    counts: dict[str, int]

    @property
    def in_round(self) -> int:
        """Photos in the round, any status."""
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``python -m catreview agreement --json``): ``alpha`` (Krippendorff,
        nominal, or ``null``), ``n_photos``/``n_votes`` (photos with >= 2 votes and their votes),
        ``counts``, ``pairs`` (``a``, ``b``, ``n``, ``observed``, Cohen's ``kappa``), ``annotators``
        (``annotator``, ``votes``, ``agree``, ``n_final``, ``correct``, ``accuracy``) and the
        ``disputed`` photo ids (votes differ)."""
        r = self.report
        return {
            "alpha": r.alpha,
            "n_photos": r.n_photos,
            "n_votes": r.n_votes,
            "counts": dict(self.counts),
            "pairs": [{"a": p.a, "b": p.b, "n": p.n, "observed": p.observed, "kappa": p.kappa} for p in r.pairs],
            "annotators": [
                {
                    "annotator": a.annotator,
                    "votes": a.votes,
                    "agree": a.agree,
                    "n_final": a.n_final,
                    "correct": a.correct,
                    "accuracy": a.accuracy,
                }
                for a in r.annotators
            ],
            "disputed": list(r.disputed),
        }


def agreement(engine: Engine) -> TeamAgreement:
    """The overlap round's :class:`TeamAgreement`: votes and final labels (current labels of
    ``agreed``/``adjudicated`` photos) from the database, figures from
    :func:`catreview.evaluate.agreement.agreement_report`."""
    with Session(engine) as s:
        votes, final = overlap.round_votes(s)
        by_status = overlap.counts(s)
    report = agreement_report([Vote(*v) for v in votes], final)
    return TeamAgreement(report, {st: by_status.get(st, 0) for st in STATUSES})


@dataclass(frozen=True)
class CastVote:
    """One annotator's blind vote on an overlap photo (``created_at`` UTC)."""

    annotator: str
    label: str
    note: str | None
    created_at: datetime


@dataclass(frozen=True)
class DisputedPhoto:
    """A photo of the adjudication queue: ``image_id``, its file ``path``, its ``status`` now
    (``disputed`` until decided), the label it carries now (``current_label``/``current_source``:
    the unverified imported one, if any) and the ``votes``, oldest first."""

    image_id: int
    path: str
    status: str
    current_label: str | None
    current_source: str | None
    votes: list[CastVote]


def disputed_photo(engine: Engine, image_id: int) -> DisputedPhoto | None:
    """The photo with its votes, or ``None`` when it is not in the overlap round (primary-key
    reads and the votes' ``image_id`` index)."""
    with Session(engine) as s:
        row = overlap.item(s, image_id)
        img = s.get(ImageRecord, image_id)
        if row is None or img is None:
            return None
        votes = [CastVote(v.annotator, v.label, v.note, v.created_at) for v in overlap.votes_of(s, image_id)]
        return DisputedPhoto(image_id, img.path, row.status, img.current_label, img.current_source, votes)


def next_disputed(engine: Engine, after: int | None = None) -> int | None:
    """The first ``disputed`` photo id after ``after`` (wrapping to the first), or ``None`` when
    none is left. Two keyset reads at most."""
    with Session(engine) as s:
        if after is not None:
            found = overlap.disputed(s, after=after, limit=1)
            if found:
                return found[0]
        found = overlap.disputed(s, limit=1)
    return found[0] if found else None


def disputed_count(engine: Engine) -> int:
    """How many photos wait for adjudication (a count over the ``disputed`` range of
    ``ix_overlap_items_status_image``)."""
    with Session(engine) as s:
        q = select(func.count()).select_from(OverlapItem).where(col(OverlapItem.status) == "disputed")
        return int(s.exec(q).one())


def adjudicate(
    engine: Engine,
    image_id: int,
    label: str,
    reviewer: str,
    *,
    vocabulary: BreedVocabulary,
    note: str | None = None,
) -> tuple[str, int | None]:
    """A reviewer's decision on a disputed photo (:func:`catreview.data.overlap.adjudicate`: an
    ``adjudication`` review, the label exports and training use); returns ``(canonical label,
    next disputed id after it or None)``.

    Raises:
        catreview.data.overlap.OverlapError: the photo is not disputed (e.g. already decided).
        catreview.data.reviews.ReviewError: unknown label or empty reviewer.
    """
    with Session(engine) as s:
        review = overlap.adjudicate(s, image_id, label, reviewer, vocabulary=vocabulary, note=note)
        decided = review.label
    return decided, next_disputed(engine, image_id)


def start_overlap_round(engine: Engine, share: float, k: int, *, actor: str) -> int:
    """Start (or extend) the overlap round on ``share`` of the photos without a human decision,
    ``k`` annotators each (:func:`catreview.data.overlap.start_round`), and record it in the
    audit log (action ``overlap_start``, by ``actor``); returns the photos added.

    Raises:
        ValueError: ``share`` not in (0, 1] or ``k`` < 2 (nothing is stored).
    """
    with Session(engine) as s:
        added = overlap.start_round(s, share, k)
        audit.record(s, actor, AuditAction.OVERLAP_START, "overlap round", share=share, k=k, added=added)
    return added


@dataclass(frozen=True)
class AuditRow:
    """One audit event for display: ``id``, ``created_at`` (UTC), ``actor``, ``action``,
    ``target`` and ``detail`` (the decoded JSON object; ``{"unreadable": text}`` when the stored
    text is not one)."""

    id: int
    created_at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class AuditPage:
    """Up to a page of events, newest first; ``before``: the cursor of the next (older) page,
    ``None`` on the last page."""

    rows: list[AuditRow]
    before: int | None


def _detail(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {"unreadable": text}
    return value if isinstance(value, dict) else {"value": value}


def audit_page(engine: Engine, *, before: int | None = None, limit: int = AUDIT_PAGE) -> AuditPage:
    """Audit events older than id ``before`` (``None``: the newest), newest first
    (:func:`catreview.data.audit.events`, one keyset read of ``limit + 1`` rows to know whether
    an older page exists).

    Raises:
        ValueError: ``limit`` not in 1..999.
    """
    if not 1 <= limit < 1000:
        raise ValueError(f"limit must be in 1..999, not {limit}")
    with Session(engine) as s:
        found = audit.events(s, limit=limit + 1, before=before)
    rows = [
        AuditRow(int(e.id or 0), e.created_at, e.actor, e.action, e.target, _detail(e.detail_json))
        for e in found[:limit]
    ]
    return AuditPage(rows, rows[-1].id if len(found) > limit else None)


@dataclass(frozen=True)
class UserRow:
    """An account as the Team tab lists it (never its password hash)."""

    name: str
    role: str
    disabled: bool
    created_at: datetime


def users(engine: Engine) -> list[UserRow]:
    """Every account, by name (:func:`catreview.data.accounts.list_users`)."""
    with Session(engine) as s:
        return [UserRow(u.name, u.role, u.disabled, u.created_at) for u in accounts.list_users(s)]


__all__ = [
    "AUDIT_PAGE",
    "STATUSES",
    "AuditPage",
    "AuditRow",
    "CastVote",
    "DisputedPhoto",
    "TeamAgreement",
    "UserRow",
    "adjudicate",
    "agreement",
    "audit_page",
    "disputed_count",
    "disputed_photo",
    "next_disputed",
    "start_overlap_round",
    "users",
]
