"""Team tab: the overlap round's agreement figures, the adjudication queue, the audit log and the users.

Three parts, each behind the role its actions need (:data:`catreview.data.accounts.REQUIRED`):

- **Agreement** (``see_all``: reviewers, admins): Krippendorff's alpha, Cohen's kappa per pair,
  per-annotator votes / agreement / accuracy against final labels, the round's photos by status.
- **Adjudication** (``adjudicate``): one disputed photo at a time with each annotator's vote,
  a breed picker and "Decide" (an ``adjudication`` review by the caller), then the next disputed
  photo by id (keyset); "Start overlap round" with share and k (defaults from the settings).
- **Audit log** (``manage_users``: admins): events newest first, 50 a page (keyset on the id),
  and the users (name, role, disabled, created).

The handlers are plain functions of the :class:`ReviewApp` (tested without a browser); every
text comes from :mod:`catreview.app.presenters.team`, every read and write from
:mod:`catreview.app.team`. Each event is wired through ``guards`` (:class:`catreview.app.auth.Guards`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from catreview.app import team
from catreview.app.auth import Caller, Guards
from catreview.app.core import ReviewApp
from catreview.app.presenters import team as text
from catreview.data import accounts
from catreview.data.accounts import Action, PermissionDenied
from catreview.data.images import ImageDecodeError
from catreview.data.reviews import ReviewError

__all__ = [
    "AuditState",
    "build",
    "decide",
    "show_agreement",
    "show_audit",
    "show_disputed",
    "show_users",
    "start_round",
]

Agreement = tuple[str, list[list[Any]], list[list[Any]]]
Queue = tuple[str | None, str, int | None, str]


def show_agreement(app: ReviewApp) -> Agreement:
    """(summary Markdown, pair rows, per-annotator rows) of the overlap round."""
    figures = team.agreement(app.engine)
    return text.agreement_summary(figures), text.pair_rows(figures), text.annotator_rows(figures)


def _photo(app: ReviewApp, image_id: int | None, message: str = "") -> Queue:
    """(photo file, votes Markdown, the id shown, message) for ``image_id`` (``None``: queue empty)."""
    if image_id is None:
        return None, text.queue_empty(), None, message
    photo = team.disputed_photo(app.engine, image_id)
    if photo is None:
        return None, text.queue_empty(), None, message
    try:
        path: str | None = str(app.display_path(image_id))
    except ImageDecodeError as exc:  # moved or damaged since the import: the votes still show
        path, message = None, f"{message} The photo cannot be shown: {exc}".strip()
    return path, text.disputed_text(photo, team.disputed_count(app.engine)), image_id, message


def show_disputed(app: ReviewApp, after: int | None = None) -> Queue:
    """The first disputed photo after ``after`` (wrapping): (photo, votes, its id, message)."""
    return _photo(app, team.next_disputed(app.engine, after))


def decide(
    app: ReviewApp, image_id: int | None, label: str | None, note: str | None, reviewer: str
) -> tuple[Queue, bool]:
    """``reviewer``'s decision on photo ``image_id``, then the next disputed photo, and whether it
    was stored; a decision that cannot be stored (no photo, no label, decided by someone else
    meanwhile) is said in the message and the queue moves on or stays as fits."""
    if image_id is None:
        return show_disputed(app), False
    if not label:
        return _photo(app, image_id, "Pick the breed first."), False
    try:
        decided, nxt = team.adjudicate(
            app.engine, int(image_id), label, reviewer, vocabulary=app.vocabulary, note=(note or "").strip() or None
        )
    except ReviewError as exc:  # OverlapError (already decided, not disputed) or an unknown label
        return _photo(app, team.next_disputed(app.engine, int(image_id)), f"Not saved: {exc}"), False
    return _photo(app, nxt, text.decided(int(image_id), decided, reviewer)), True


def start_round(app: ReviewApp, share: float | None, k: float | None, actor: str) -> str:
    """Start (or extend) the overlap round; the message (a bad share or k is refused with why)."""
    refused = text.share_refused(share, k)
    if refused is not None:
        return refused
    assert share is not None and k is not None  # checked above
    added = team.start_overlap_round(app.engine, float(share), int(k), actor=actor)
    return text.round_started(added, float(share), int(k))


@dataclass(frozen=True)
class AuditState:
    """The audit page shown: its ``number`` (1 = newest) and the cursor of the older page."""

    number: int
    before: int | None


def show_audit(
    app: ReviewApp, state: AuditState | None = None, older: bool = False
) -> tuple[list[list[Any]], str, AuditState]:
    """The newest audit page, or (``older``) the page after ``state``: (rows, page line, state)."""
    if older and state is not None and state.before is not None:
        before, number = state.before, state.number + 1
    else:
        before, number = None, 1
    page = team.audit_page(app.engine, before=before)
    return text.audit_rows(page), text.audit_line(page, number), AuditState(number, page.before)


def show_users(app: ReviewApp) -> list[list[Any]]:
    """Rows of the users table."""
    return text.user_rows(team.users(app.engine))


def build(app: ReviewApp, guards: Guards) -> None:
    """Lay out the Team tab inside the current ``gr.Tab`` and wire its events through ``guards``."""
    with gr.Tabs(elem_id="team-tabs"):
        with gr.Tab("Agreement", id="team-agreement-tab") as agreement_tab:
            gr.Markdown(text.AGREEMENT_INTRO)
            agreement_btn = gr.Button("Refresh", elem_id="team-agreement-refresh", size="sm")
            summary = gr.Markdown(elem_id="team-agreement-summary")
            pairs = gr.Dataframe(headers=text.PAIR_HEADERS, label="Pairs of annotators", interactive=False,
                                 elem_id="team-pairs")  # fmt: skip
            people = gr.Dataframe(headers=text.ANNOTATOR_HEADERS, label="Annotators", interactive=False,
                                  elem_id="team-annotators")  # fmt: skip
        with gr.Tab("Adjudication", id="team-adjudication-tab") as adjudication_tab:
            gr.Markdown(text.ADJUDICATION_INTRO)
            shown = gr.State(None)
            with gr.Row():
                with gr.Column(scale=3):
                    photo = gr.Image(label="Disputed photo", type="filepath", interactive=False,
                                     elem_id="team-photo", height=360)  # fmt: skip
                with gr.Column(scale=2):
                    votes = gr.Markdown(elem_id="team-votes")
                    breed = gr.Dropdown(app.vocabulary.choices(), value=None, label="Decision", filterable=True,
                                        elem_id="team-breed")  # fmt: skip
                    note = gr.Textbox(label="Note", placeholder="note (optional)", lines=1, elem_id="team-note")
                    with gr.Row():
                        decide_btn = gr.Button("Decide", variant="primary", elem_id="team-decide")
                        skip_btn = gr.Button("Next disputed photo", elem_id="team-skip")
                    message = gr.Markdown(elem_id="team-message")
            with gr.Accordion("Start overlap round", open=False, elem_id="team-round-acc"):
                with gr.Row():
                    share = gr.Number(app.settings.overlap_share, label="Share of photos without a human decision",
                                      minimum=0, maximum=1, step=0.01, elem_id="team-share")  # fmt: skip
                    k = gr.Number(app.settings.overlap_k, label="Annotators per photo (k)", minimum=2, precision=0,
                                  elem_id="team-k")  # fmt: skip
                    start_btn = gr.Button("Start overlap round", elem_id="team-start-round")
                round_line = gr.Markdown(elem_id="team-round-line")
        with gr.Tab("Audit log", id="team-audit-tab") as audit_tab:
            gr.Markdown(text.AUDIT_INTRO)
            audit_state = gr.State(None)
            with gr.Row():
                newest_btn = gr.Button("Newest", elem_id="team-audit-newest", size="sm")
                older_btn = gr.Button("Older", elem_id="team-audit-older", size="sm")
            audit_line = gr.Markdown(elem_id="team-audit-line")
            audit_rows = gr.Dataframe(headers=text.AUDIT_HEADERS, label="Audit log", interactive=False, wrap=True,
                                      elem_id="team-audit")  # fmt: skip
            users_btn = gr.Button("Refresh users", elem_id="team-users-refresh", size="sm")
            users = gr.Dataframe(headers=text.USER_HEADERS, label="Users", interactive=False, elem_id="team-users")

    def agreement_view() -> Agreement:
        return show_agreement(app)

    def on_open(action: Action, fn: Any, refused: Any) -> Any:
        """A sub-tab opened by someone whose role lacks ``action`` gets the reason in the page
        (``refused(reason)``: the outputs), not an error toast; the buttons stay strict."""

        def opened(who: Caller) -> Any:
            try:
                accounts.require(who.role, action, who=who.name)
            except PermissionDenied as exc:
                return refused(f"⚠️ {exc}")
            return fn()

        return guards(Action.VIEW, opened, with_caller=True)

    agreement_outputs = [summary, pairs, people]
    view = guards(Action.SEE_ALL, agreement_view)
    agreement_btn.click(view, outputs=agreement_outputs, api_name="team_agreement")
    agreement_tab.select(
        on_open(Action.SEE_ALL, agreement_view, lambda why: (why, [], [])), outputs=agreement_outputs, api_name=False
    )

    queue_outputs = [photo, votes, shown, message]

    def first_disputed() -> Queue:
        return show_disputed(app)

    def next_disputed(after: int | None) -> Queue:
        return show_disputed(app, after)

    def decide_one(image_id: int | None, label: str | None, note_text: str | None, who: Caller) -> tuple[Any, ...]:
        queue, stored = decide(app, image_id, label, note_text, who.name)
        # a stored decision clears the form, so the next photo is never decided with this one's breed
        return (*queue, None if stored else label, "" if stored else note_text)

    def start(share_value: float | None, k_value: float | None, who: Caller) -> str:
        return start_round(app, share_value, k_value, who.name)

    gr.api(guards(Action.ADJUDICATE, first_disputed), api_name="team_queue")
    adjudication_tab.select(
        on_open(Action.ADJUDICATE, first_disputed, lambda why: (None, why, None, "")),
        outputs=queue_outputs,
        api_name=False,
    )
    skip_btn.click(guards(Action.ADJUDICATE, next_disputed), inputs=[shown], outputs=queue_outputs,
                   api_name="team_next")  # fmt: skip
    decide_btn.click(guards(Action.ADJUDICATE, decide_one, with_caller=True), inputs=[shown, breed, note],
                     outputs=[*queue_outputs, breed, note], api_name="team_decide")  # fmt: skip
    start_btn.click(guards(Action.ADJUDICATE, start, with_caller=True), inputs=[share, k], outputs=round_line,
                    api_name="team_start_round")  # fmt: skip

    audit_outputs = [audit_rows, audit_line, audit_state]

    def audit_newest() -> tuple[list[list[Any]], str, AuditState]:
        return show_audit(app)

    def audit_older(state: AuditState | None) -> tuple[list[list[Any]], str, AuditState]:
        return show_audit(app, state, older=True)

    def users_view() -> list[list[Any]]:
        return show_users(app)

    newest = guards(Action.MANAGE_USERS, audit_newest)
    newest_btn.click(newest, outputs=audit_outputs, api_name="team_audit")
    older_btn.click(guards(Action.MANAGE_USERS, audit_older), inputs=[audit_state], outputs=audit_outputs,
                    api_name="team_audit_older")  # fmt: skip
    users_view_g = guards(Action.MANAGE_USERS, users_view)
    users_btn.click(users_view_g, outputs=users, api_name="team_users")
    audit_tab.select(
        on_open(Action.MANAGE_USERS, audit_newest, lambda why: ([], why, None)), outputs=audit_outputs, api_name=False
    ).then(on_open(Action.MANAGE_USERS, users_view, lambda why: []), outputs=users, api_name=False)
