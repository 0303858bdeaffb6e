"""Text and tables of the Team tab (:mod:`catreview.app.ui.team_tab`): the overlap round's
agreement figures, the adjudication queue's photo with its votes, the audit log and the users.

Pure formatting of :mod:`catreview.app.team` values: no database, no Gradio. Times are UTC,
shown as ``YYYY-MM-DD HH:MM:SS UTC``; undefined figures (``None``) as an em dash.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from catreview.app.public_errors import redact
from catreview.app.team import STATUSES, AuditPage, DisputedPhoto, TeamAgreement, UserRow

__all__ = [
    "ADJUDICATION_INTRO",
    "AGREEMENT_INTRO",
    "ANNOTATOR_HEADERS",
    "AUDIT_HEADERS",
    "AUDIT_INTRO",
    "PAIR_HEADERS",
    "USER_HEADERS",
    "agreement_summary",
    "annotator_rows",
    "audit_line",
    "audit_rows",
    "decided",
    "disputed_text",
    "number",
    "pair_rows",
    "queue_empty",
    "round_started",
    "share_refused",
    "user_rows",
    "when",
]

AGREEMENT_INTRO = (
    "Agreement of the overlap round: photos labelled by several annotators blind to each other. "
    "**Krippendorff's alpha** (nominal) over everyone: 1 = perfect agreement, 0 = chance level. "
    "**Cohen's kappa** per pair on the photos both labelled. **Accuracy** is against each photo's final "
    "label (adjudicated, or agreed by all)."
)
ADJUDICATION_INTRO = (
    "Photos whose votes differ, one at a time. Pick the breed and **Decide**: the decision becomes the "
    "photo's label (what exports and training use; the export records it as an adjudication)."
)
AUDIT_INTRO = "Training rounds, promotions, rollbacks, exports, user changes and overlap rounds: who and when."

PAIR_HEADERS = ["Annotator A", "Annotator B", "Shared photos", "Equal votes", "Cohen's kappa"]
ANNOTATOR_HEADERS = ["Annotator", "Votes", "Agreement with others", "Photos with a final label", "Correct", "Accuracy"]
AUDIT_HEADERS = ["When", "Who", "Action", "Target", "Detail"]
USER_HEADERS = ["Name", "Role", "Disabled", "Created"]

DASH = "\u2014"


def number(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or an em dash for ``None`` (undefined)."""
    return DASH if value is None else f"{value:.{digits}f}"


def _share(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}%"


def when(t: datetime) -> str:
    """``2026-12-01 14:03:22 UTC``; a naive time (SQLite) is taken as UTC."""
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def agreement_summary(team: TeamAgreement) -> str:
    """The headline (Markdown): alpha, photos/votes measured, and the round's photos by status."""
    if team.in_round == 0:
        return "No overlap round yet: a reviewer starts one under **Adjudication** (Start overlap round)."
    r = team.report
    status = ", ".join(f"{team.counts.get(s, 0)} {s}" for s in STATUSES)
    alpha = number(r.alpha) if r.alpha is not None else f"{DASH} (needs 2 photos with 2 votes and 2 labels)"
    return (
        f"**Krippendorff's alpha: {alpha}** on {r.n_photos} photo{'s' if r.n_photos != 1 else ''} "
        f"with at least two votes ({r.n_votes} votes).  \n"
        f"Round: {team.in_round} photos: {status}."
    )


def pair_rows(team: TeamAgreement) -> list[list[Any]]:
    """Rows of :data:`PAIR_HEADERS`: one per annotator pair."""
    return [[p.a, p.b, p.n, _share(p.observed), number(p.kappa)] for p in team.report.pairs]


def annotator_rows(team: TeamAgreement) -> list[list[Any]]:
    """Rows of :data:`ANNOTATOR_HEADERS`: one per annotator."""
    return [
        [a.annotator, a.votes, _share(a.agree), a.n_final, a.correct, _share(a.accuracy)]
        for a in team.report.annotators
    ]


def disputed_text(photo: DisputedPhoto, remaining: int) -> str:
    """The photo's heading and each annotator's vote (label, note, time), Markdown."""
    head = f"**Photo #{photo.image_id}** ({remaining} disputed photo{'s' if remaining != 1 else ''} waiting)"
    if photo.status != "disputed":
        head += f": it is {photo.status} now"
    lines = [head]
    if photo.current_label and photo.current_source == "import":
        lines.append(f"Imported label (unverified): {photo.current_label}")
    for v in photo.votes:
        note = f" \u2014 \u201c{v.note}\u201d" if v.note else ""
        lines.append(f"- **{v.annotator}**: {v.label}{note} ({when(v.created_at)})")
    if not photo.votes:
        lines.append("- no votes stored")
    return "\n".join(lines)


def queue_empty() -> str:
    """What the queue says when no disputed photo is left."""
    return "No disputed photos: nothing to adjudicate."


def decided(image_id: int, label: str, reviewer: str) -> str:
    """``"Photo #12 decided: Persian (by rita)."``"""
    return f"Photo #{image_id} decided: {label} (by {reviewer})."


def round_started(added: int, share: float, k: int) -> str:
    """What "Start overlap round" did."""
    if added == 0:
        return (
            f"No photos added: every photo of the {share:.0%} share without a human decision is already in the round."
        )
    return f"Overlap round: {added} photo{'s' if added != 1 else ''} added ({share:.0%} share, {k} annotators each)."


def share_refused(share: float | None, k: float | None) -> str | None:
    """Why ``share``/``k`` cannot start a round (``None`` when they can): share in (0, 1], whole k >= 2."""
    if share is None or not 0 < share <= 1:
        return f"Share must be above 0 and at most 1 (e.g. 0.1 for 10%), not {share}."
    if k is None or k != int(k) or k < 2:
        return f"Annotators per photo must be a whole number of at least 2, not {k}."
    return None


def _detail(detail: dict[str, Any]) -> str:
    # server folders (a model path, an export folder) stay in the database, not in the page
    return redact(", ".join(f"{k}={v}" for k, v in sorted(detail.items())))


def audit_rows(page: AuditPage) -> list[list[Any]]:
    """Rows of :data:`AUDIT_HEADERS`, newest first."""
    return [[when(r.created_at), r.actor, r.action, r.target, _detail(r.detail)] for r in page.rows]


def audit_line(page: AuditPage, page_number: int) -> str:
    """``"Page 2: 50 events; older ones on the next page."``"""
    n = len(page.rows)
    if n == 0:
        return "No audit events yet." if page_number == 1 else "No older events."
    more = "older ones on the next page." if page.before is not None else "no older events."
    return f"Page {page_number}: {n} event{'s' if n != 1 else ''}, newest first; {more}"


def user_rows(users: Sequence[UserRow]) -> list[list[Any]]:
    """Rows of :data:`USER_HEADERS`, by name."""
    return [[u.name, u.role, "yes" if u.disabled else "no", when(u.created_at)] for u in users]
