"""Review tab: one photo at a time, both stages' outputs, confirm or correct the label — keyboard
first (:data:`HOTKEYS_JS`), in place (no spinners), with undo, history, queues and blind mode.

Layout (fits 1366x768 without scrolling): a toolbar (who is signed in, queue, jump, blind mode,
counter), then the photo with its "why it is here" line and navigation, the three prediction
panels with every decision control, and the annotator's last decisions. Navigation and review
events use ``show_progress="hidden"``: the photo and panels are replaced in place, never blanked;
the next photo's display file is prefetched by the browser.

Every handler is guarded (:class:`catreview.app.auth.Guards`): views need ``view``, saves
``review``; the annotator of a review is the logged-in caller. A save names the review the page
showed (the hidden ``seen`` field); if someone else reviewed the photo meanwhile, nothing is stored
and a dialog says who chose what and when, with "Keep theirs" and "Replace with mine". A photo
open in the overlap round takes a blind vote instead of a review (:meth:`ReviewApp.save_decision`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr

from catreview.app.auth import Caller, Guards
from catreview.app.core import OVERLAP_QUEUE, ReviewApp
from catreview.app.presenters import review as present
from catreview.data.accounts import Action
from catreview.data.images import ImageDecodeError
from catreview.data.labels import NOT_A_CAT, UNSURE
from catreview.data.reviews import HEAD, Head, ReviewConflictError, ReviewError
from catreview.query import photos
from catreview.query.queues import QUEUE_KINDS

N_CANDIDATES = 3
DEFAULT_QUEUE = "import"
"""The queue selected when the page opens (import order)."""
QUEUE_TITLES: dict[str, str] = {**QUEUE_KINDS, OVERLAP_QUEUE: "Overlap round (blind votes)"}
"""The queue selector's choices: the score-served queues and the caller's overlap-round photos."""
TRAIL_MAX = 100
"""Photos remembered per browser session for "Previous"."""
HOTKEYS_JS = (Path(__file__).with_name("hotkeys.js")).read_text(encoding="utf-8")
"""The page's key handler (a JavaScript function run once on page load)."""
BLUR_JS = "() => { const a = document.activeElement; if (a && a !== document.body) a.blur(); }"
"""Run after each save: focus leaves the clicked button / the search box (so Enter cannot confirm
the next photo blindly, and the keys work again)."""
QUIET = "hidden"
"""``show_progress`` of navigation and review events: update in place, no spinner overlay."""

VIEW_FIELDS = (
    "image_id photo counter status stage1 vlm vlm_info fused review_info "
    + " ".join(f"confirm{i}" for i in range(N_CANDIDATES))
    + " accept why prefetch recent history seen"
).split()
"""What :func:`render` returns, in order (the first nine are the public ``/show`` API's; ``seen``
is the id of the review shown, 0 for none, which a save names as the one it replaces)."""


def _next_photo_path(app: ReviewApp, image_id: int, kind: str, annotator: str | None) -> str | None:
    """Display file of the photo that follows ``image_id`` in queue ``kind`` (for prefetching)."""
    if kind == OVERLAP_QUEUE and not annotator:
        return None
    item = app.next_for(kind, image_id, annotator or "")
    if item is None or item.image_id == image_id:
        return None
    try:
        return str(app.display_path(item.image_id))
    except (ImageDecodeError, ReviewError):  # the next photo cannot be shown: nothing to prefetch
        return None


def render(
    app: ReviewApp,
    image_id: int | None,
    *,
    blind: bool = False,
    annotator: str | None = None,
    reason: str = "",
    kind: str = DEFAULT_QUEUE,
    prefetch: bool = True,
) -> list[Any]:
    """Everything the tab shows for photo ``image_id`` (``None`` or an unknown id: the first photo),
    in :data:`VIEW_FIELDS` order.

    A fixed number of indexed queries, whatever the collection's size. ``blind``: the model
    outputs (panels, candidate buttons, reason) are left out; ``annotator``: whose recent
    decisions are listed (``None``: none); ``reason``: the "why it is here" line of a photo
    reached through queue ``kind``, whose next photo is prefetched (unless ``prefetch`` is false).
    """
    totals = photos.review_totals(app.engine)
    reviewed, total, imported = totals.verified, totals.photos, totals.reviewed - totals.verified
    if image_id is None:
        image_id = app.first_photo()
    notice = ""
    try:
        v = app.view(int(image_id)) if image_id is not None else None
    except ReviewError as exc:  # an id that is not (or no longer) there: say so, show the first photo
        first = app.first_photo()
        v = app.view(first) if first is not None else None
        notice = f"{exc}; showing the first photo instead."
    recent = present.decision_rows(app.recent_decisions(annotator)) if annotator and annotator.strip() else []

    def off() -> dict[str, Any]:  # a fresh update per output (Gradio consumes the dicts it is given)
        return gr.update(value="—", interactive=False)

    if v is None:
        empty = [None, None, present.counter(reviewed, total, imported=imported), present.NO_PHOTOS]
        buttons = [off() for _ in range(N_CANDIDATES)]
        return [*empty, None, None, "", None, "", *buttons, off(), "", "", recent, [], 0]
    panels = present.prediction_panels(v, app.registry.untrained_reason(), app.registry.stage1_untrained_reason())
    try:
        photo: str | None = str(app.display_path(v["id"]))
        status = " ".join(t for t in (notice, present.BLIND_STATUS if blind else panels.status) if t)
    except ImageDecodeError as exc:
        photo, status = None, f"The photo cannot be shown: {exc}"
    cands = [d["label"] for d in (v["stage1"] or [])]
    if blind:
        buttons = [off() for _ in range(N_CANDIDATES)]
        accept, stage1, vlm, vlm_info, fused, why = off(), None, None, "", None, ""
    else:
        buttons = [
            gr.update(value=cands[i], interactive=True) if i < len(cands) else off() for i in range(N_CANDIDATES)
        ]
        top = present.accept_text(v)
        accept = gr.update(value=top, interactive=top != "—")
        stage1, vlm, vlm_info, fused = panels.stage1, panels.vlm, panels.vlm_info, panels.fused
        lines = [f"**Why it is here:** {reason}" if reason else "", app.duplicate_line(v["id"])]
        why = "  \n".join(t for t in lines if t)
    item = app.overlap_item(v["id"])
    if item is not None and item.status == "open":
        mine = app.my_vote(v["id"], annotator) if annotator else None
        your = present.YOUR_VOTE.format(label=mine) if mine else ""
        why = "  \n".join(t for t in (present.OVERLAP_WHY.format(k=item.k), your, why) if t)
    nxt = _next_photo_path(app, v["id"], kind, annotator) if prefetch else None
    return [
        v["id"],
        photo,
        present.counter(reviewed, total, v["id"], imported=imported),
        status,
        stage1,
        vlm,
        vlm_info,
        fused,
        present.review_info(v),
        *buttons,
        accept,
        why,
        present.prefetch_html(nxt),
        recent,
        present.history_rows(app.photo_history(v["id"])),
        v["review"]["id"] if v["review"] else 0,
    ]


def _seen(value: float | None) -> int | Head | None:
    """The review a save replaces, from the page's ``seen`` field: the review id shown, ``0``
    for "not reviewed" (``None``), empty (a scripted client that names none) for the head."""
    if value is None:
        return HEAD
    return int(value) if int(value) > 0 else None


def build(app: ReviewApp, demo: gr.Blocks, guards: Guards) -> None:
    """Lay out the Review tab and wire its events (each guarded by ``guards``) and keys."""
    queue_choices = [(title, kind) for kind, title in QUEUE_TITLES.items()]
    prefs = gr.BrowserState({"blind": False}, storage_key="catreview-review")
    trail = gr.State([])  # photos shown before, newest last ("Previous")
    pending = gr.State(None)  # the save a conflict dialog holds back (image id, label, note, theirs)
    last_vote = gr.State(None)  # the photo of this page's last overlap vote (what Undo withdraws first)
    compact: dict[str, Any] = {"container": False, "show_label": False}
    with gr.Row(equal_height=True, elem_id="review-toolbar"):
        signed = gr.Markdown(elem_id="signed-in")
        queue = gr.Dropdown(queue_choices, value=DEFAULT_QUEUE, label="Queue", elem_id="queue", scale=2, **compact)
        jump = gr.Textbox(
            label="Jump to photo",
            placeholder="jump: id or file name ⏎",
            elem_id="jump",
            scale=1,
            min_width=130,
            **compact,
        )
        blind = gr.Checkbox(label="Blind mode", value=False, elem_id="blind", scale=1, min_width=110)
        counter = gr.Markdown(elem_id="counter")
    with gr.Row():
        with gr.Column(scale=4, min_width=300):
            photo = gr.Image(
                label="Photo", type="filepath", interactive=False, elem_id="photo", height=380, show_label=False
            )
            image_id = gr.Number(label="Photo id", precision=0, elem_id="image-id", interactive=False, visible=False)
            seen = gr.Number(label="Review shown", precision=0, elem_id="seen-review", interactive=False, visible=False)
            why = gr.Markdown(elem_id="why")
            with gr.Row():
                prev_btn = gr.Button("Previous", elem_id="prev", size="sm", min_width=60)
                next_btn = gr.Button("Next", elem_id="next", size="sm", min_width=60)
                next_open = gr.Button("Next unreviewed", elem_id="next-unreviewed", size="sm", min_width=60)
                refresh = gr.Button("Refresh", elem_id="refresh", size="sm", min_width=60)
            prefetch = gr.HTML(elem_id="prefetch", padding=False)
        with gr.Column(scale=6, min_width=420):
            message = gr.Markdown(elem_id="review-message")
            with gr.Group(visible=False, elem_id="conflict") as conflict_box:
                conflict_text = gr.Markdown(elem_id="conflict-text")
                with gr.Row():
                    keep_btn = gr.Button("Keep theirs", elem_id="keep-theirs", size="sm", min_width=80)
                    replace_btn = gr.Button(
                        "Replace with mine", elem_id="replace-mine", variant="stop", size="sm", min_width=80
                    )
            status = gr.Markdown(elem_id="pred-status")
            with gr.Row(equal_height=True):
                panel: dict[str, Any] = {"show_heading": False, "min_width": 120, "elem_classes": ["review-panel"]}
                stage1 = gr.Label(label="Stage 1 top-3", num_top_classes=3, elem_id="stage1", **panel)
                vlm = gr.Label(label="VLM over the candidates", elem_id="vlm", **panel)
                fused = gr.Label(label="Fused prediction", num_top_classes=4, elem_id="fused", **panel)
            with gr.Row():
                vlm_info = gr.Markdown(elem_id="vlm-info")
                review_info = gr.Markdown(elem_id="review-info")
            with gr.Row():
                confirm = [
                    gr.Button("—", variant="primary", elem_id=f"confirm-{i}", size="sm", min_width=80)
                    for i in range(N_CANDIDATES)
                ]
                accept = gr.Button("—", variant="primary", elem_id="accept", size="sm", min_width=80)
            with gr.Row():
                pick = gr.Dropdown(
                    app.vocabulary.choices(),
                    value=None,
                    label="Other breed",
                    filterable=True,
                    allow_custom_value=True,
                    elem_id="breed-pick",
                    scale=3,
                    **compact,
                )
                set_label = gr.Button("Set label", elem_id="set-label", scale=1, size="sm", min_width=60)
            with gr.Row():
                not_cat = gr.Button(NOT_A_CAT, elem_id="not-a-cat", size="sm", min_width=60)
                unsure = gr.Button(UNSURE, elem_id="unsure", size="sm", min_width=60)
                skip = gr.Button("Skip", elem_id="skip", size="sm", min_width=60)
                undo = gr.Button("Undo", elem_id="undo", size="sm", min_width=60)
            note = gr.Textbox(
                label="Note", placeholder="note (optional)", elem_id="note", lines=1, max_lines=2, **compact
            )
            gr.Markdown(present.KEYMAP, elem_id="keymap-line")
        with gr.Column(scale=3, min_width=240):
            recent = gr.Dataframe(
                headers=present.DECISION_HEADERS,
                label="Your last decisions (click to reopen)",
                interactive=False,
                elem_id="recent",
                max_height=260,
                wrap=True,
            )
            with gr.Accordion("This photo's review history", open=False, elem_id="history-acc"):
                history = gr.Dataframe(headers=present.HISTORY_HEADERS, interactive=False, elem_id="photo-history")
            job = gr.Markdown(app.job.text(), elem_id="bg-progress")
    reasoning = gr.Textbox(
        label=present.reasoning_label(app.settings.uses_demo_models),
        lines=3,
        max_lines=8,
        interactive=False,
        elem_id="reasoning",
    )
    stop_reasoning = gr.Button("Stop reasoning", elem_id="stop-reasoning", size="sm")
    with gr.Accordion("Photos that could not be read", open=False):
        failed = gr.Dataframe(headers=["path", "reason"], elem_id="failed-list", interactive=False)

    view_out = [
        image_id,
        photo,
        counter,
        status,
        stage1,
        vlm,
        vlm_info,
        fused,
        review_info,
        *confirm,
        accept,
        why,
        prefetch,
        recent,
        history,
        seen,
    ]
    assert len(view_out) == len(VIEW_FIELDS)
    # every move: the view, the search and the note cleared, the trail, the notice, the dialog closed
    move_out = [*view_out, pick, note, trail, message, conflict_box, conflict_text, pending, last_vote]
    ctx = [blind, queue, trail]  # inputs after the photo id; guarded handlers get the Caller last

    def current(img_id: float | None) -> int | None:
        return None if img_id is None else int(img_id)

    def kind_of(kind: str | None) -> str:
        return kind if kind in QUEUE_TITLES else DEFAULT_QUEUE

    def closed() -> list[Any]:  # the conflict dialog hidden, nothing held back, the last vote kept
        return [gr.update(visible=False), "", None, gr.skip()]

    def moved(
        to: int | None,
        frm: int | None,
        who: Caller,
        is_blind: bool,
        kind: str | None,
        tr: list[int] | None,
        msg: str = "",
        reason: str = "",
        *,
        remember: bool = True,
    ) -> list[Any]:
        tr = list(tr or [])
        if remember and frm is not None and frm != to:
            tr = [*tr, frm][-TRAIL_MAX:]
        view = render(app, to, blind=bool(is_blind), annotator=who.name, reason=reason, kind=kind_of(kind))
        return [*view, None, "", tr, msg, *closed()]

    def stay(i: int | None, who: Caller, is_blind: bool, kind: str | None, tr, label, text, msg: str) -> list[Any]:
        """Re-render photo ``i`` keeping the search and the note (nothing was stored)."""
        view = render(app, i, blind=bool(is_blind), annotator=who.name, kind=kind_of(kind))
        return [*view, label, text, list(tr or []), msg, *closed()]

    def advance(i: int | None, who: Caller, is_blind: bool, kind: str | None, tr, msg: str = "") -> list[Any]:
        """The next open photo of the selected queue after ``i`` (with its reason)."""
        k = kind_of(kind)
        item = app.next_for(k, i, who.name)
        if item is None:
            empty = present.queue_empty(QUEUE_TITLES[k])
            return moved(i, i, who, is_blind, k, tr, " ".join(t for t in (msg, empty) if t))
        return moved(item.image_id, i, who, is_blind, k, tr, msg, item.reason)

    def show(img_id: float | None, is_blind: bool, kind: str | None, tr, who: Caller):
        i = current(img_id)
        return moved(i, i, who, is_blind, kind, tr)

    def skip_to_next(img_id: float | None, is_blind: bool, kind: str | None, tr, who: Caller):
        return advance(current(img_id), who, is_blind, kind, tr)

    def go_next(img_id: float | None, is_blind: bool, kind: str | None, tr, who: Caller):
        if kind_of(kind) == DEFAULT_QUEUE:  # import order: browse every photo, reviewed or not
            i = current(img_id)
            return moved(app.neighbour(i, 1), i, who, is_blind, kind, tr)
        return advance(current(img_id), who, is_blind, kind, tr)

    def go_prev(img_id: float | None, is_blind: bool, kind: str | None, tr, who: Caller):
        i = current(img_id)
        tr = list(tr or [])
        if tr:  # back to the photo shown before this one
            return moved(tr[-1], i, who, is_blind, kind, tr[:-1], remember=False)
        return moved(app.neighbour(i, -1), i, who, is_blind, kind, tr, remember=False)

    def open_queue(img_id: float | None, is_blind: bool, kind: str | None, tr, who: Caller):
        """The first open photo of the newly selected queue (with its reason)."""
        i, k = current(img_id), kind_of(kind)
        item = app.next_for(k, None, who.name)
        if item is None:
            return moved(i, i, who, is_blind, k, tr, present.queue_empty(QUEUE_TITLES[k]))
        return moved(item.image_id, i, who, is_blind, k, tr, "", item.reason)

    def stream(img_id: float | None, is_blind: bool = False):
        if img_id is None or is_blind:  # blind mode: no model output before the choice
            yield ""
            return
        stop = threading.Event()
        try:
            yield from app.stream_reasoning(int(img_id), stop=stop)
        finally:
            stop.set()  # the page moved on or "Stop" was pressed: end generation

    def save(
        i: int,
        label: str,
        text: str | None,
        is_blind: bool,
        kind: str | None,
        tr,
        shown: int | Head | None,
        who: Caller,
    ) -> list[Any]:
        try:
            saved = app.save_decision(i, label, who.name, text, seen=shown, blind=bool(is_blind))
        except ReviewConflictError as exc:  # nothing stored: say who chose what, offer keep / replace
            mine = app.vocabulary.canonical_or_same(label)
            was = app.review_label(shown) if isinstance(shown, int) else None
            theirs = exc.current
            held = {
                "image_id": i,
                "label": label,
                "note": text,
                "blind": bool(is_blind),
                "theirs": theirs.id if theirs is not None else None,
                "theirs_by": theirs.annotator if theirs is not None else "",
                "theirs_label": theirs.label if theirs is not None else "",
            }
            view = render(app, i, blind=bool(is_blind), annotator=who.name, kind=kind_of(kind))
            dialog = [gr.update(visible=True), present.conflict(theirs, mine, was), held, gr.skip()]
            return [*view, label, text, list(tr or []), "", *dialog]
        except ReviewError as exc:  # nothing stored: the photo, the search and the note stay
            return stay(i, who, is_blind, kind, tr, label, text, present.refused(exc))
        if saved.vote is not None:
            msg = present.voted(saved.label, i, saved.vote, saved.previous_vote)
        elif is_blind:
            msg = present.blind_reveal(saved.label, i, app.view(i))
        else:
            msg = present.saved(saved.label, i)
        out = advance(i, who, is_blind, kind, tr, msg)
        out[-1] = i if saved.vote is not None and saved.vote.status == "open" else None
        return out

    def do_review(
        img_id: float | None,
        label: str | None,
        text: str | None,
        is_blind: bool,
        kind: str | None,
        tr,
        shown: float | None,
        who: Caller,
    ) -> list[Any]:
        if img_id is None or not label or label == "—":
            return stay(current(img_id), who, is_blind, kind, tr, label, text, present.NOTHING_TO_LABEL)
        return save(int(img_id), label, text, is_blind, kind, tr, _seen(shown), who)

    def keep_theirs(img_id: float | None, is_blind: bool, kind: str | None, tr, held, who: Caller):
        i = current(img_id)
        if held:
            msg = present.kept_theirs_text(held["theirs_by"], held["theirs_label"], held["image_id"])
        else:
            msg = ""
        return advance(i, who, is_blind, kind, tr, msg)

    def replace_mine(img_id: float | None, is_blind: bool, kind: str | None, tr, held, who: Caller):
        if not held:  # nothing held back (a stale dialog): show the photo as it is
            return show(img_id, is_blind, kind, tr, who)
        # a new review after theirs (it names theirs as the one it replaces); history keeps both
        return save(held["image_id"], held["label"], held["note"], held["blind"], kind, tr, held["theirs"], who)

    def do_undo(img_id: float | None, is_blind: bool, kind: str | None, tr, voted_on: int | None, who: Caller):
        i = current(img_id)
        if voted_on is not None:  # this page's last decision was a blind vote: withdraw it first
            try:
                label = app.withdraw_vote(int(voted_on), who.name)
            except ReviewError as exc:  # settled meanwhile (its votes stay): say so, forget it
                out = moved(i, i, who, is_blind, kind, tr, present.refused(exc))
            else:
                out = moved(int(voted_on), i, who, is_blind, kind, tr, present.withdrawn(label, int(voted_on)))
            out[-1] = None
            return out
        try:
            result = app.undo_last(who.name)
        except ReviewError as exc:
            return moved(i, i, who, is_blind, kind, tr, present.refused(exc))
        return moved(result.image_id, i, who, is_blind, kind, tr, present.undone(result))

    def do_jump(text: str | None, img_id: float | None, is_blind: bool, kind: str | None, tr, who: Caller):
        i = current(img_id)
        text = text or ""
        found = app.find_photo(text)
        if found is None:
            return [*moved(i, i, who, is_blind, kind, tr, f"⚠️ No photo matches {text.strip()!r}."), text]
        return [*moved(found, i, who, is_blind, kind, tr), ""]

    def open_decision(evt: gr.SelectData, img_id: float | None, is_blind: bool, kind: str | None, tr, who: Caller):
        i = current(img_id)
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        decisions = app.recent_decisions(who.name)
        if not isinstance(row, int) or not 0 <= row < len(decisions):
            return moved(i, i, who, is_blind, kind, tr)
        return moved(decisions[row].image_id, i, who, is_blind, kind, tr)

    def show_next_unreviewed(img_id: float | None, is_blind: bool, kind: str | None, tr, who: Caller):
        i = current(img_id)
        nxt = app.next_unreviewed(i)
        if nxt is None:
            return moved(i, i, who, is_blind, kind, tr, present.ALL_REVIEWED)
        return moved(nxt, i, who, is_blind, kind, tr)

    def first_view(img_id: float | None = None, is_blind: bool = False, who: Caller | None = None) -> list[Any]:
        # defaults: scripted clients may call /show with nothing; the guard always passes the caller
        assert who is not None
        if img_id:  # scripted clients open a given photo (the page itself sends the empty field's 0)
            return render(app, current(img_id), blind=bool(is_blind), annotator=who.name)
        return render(app, app.next_unreviewed(None), blind=bool(is_blind), annotator=who.name)

    def whoami(who: Caller) -> str:
        return present.signed_in(who.name, who.role.value, open_mode=guards.config.mode == "open")

    def restore_prefs(saved: dict[str, Any] | None) -> bool:
        return bool((saved or {}).get("blind", False))

    def remember_prefs(is_blind: bool) -> dict[str, Any]:
        return {"blind": bool(is_blind)}

    def failed_list() -> list[tuple[str, str]]:
        return app.failed_images()

    def tick(shown: str) -> Any:
        text = app.job.text()
        return gr.skip() if text == shown else text  # unchanged: no update, nothing blinks

    view_ = guards(Action.VIEW, show, with_caller=True)  # the one wrapped "Refresh"
    see: dict[str, Any] = {"with_caller": True}
    restored = demo.load(guards(Action.VIEW, restore_prefs), inputs=[prefs], outputs=[blind], api_visibility="private")
    restored.then(None, js=HOTKEYS_JS)
    restored.then(guards(Action.VIEW, whoami, **see), outputs=[signed], api_visibility="private")
    ev = restored.then(
        guards(Action.VIEW, first_view, **see),
        inputs=[image_id, blind],
        outputs=view_out,
        api_name="show",
        show_progress=QUIET,
    )
    streamed = guards(Action.VIEW, stream)
    first_stream = ev.then(streamed, inputs=[image_id, blind], outputs=[reasoning], api_name="reasoning")
    ev.then(guards(Action.VIEW, failed_list), outputs=[failed], api_name="failed")
    blind.change(guards(Action.VIEW, remember_prefs), inputs=[blind], outputs=[prefs], api_visibility="private")

    private: dict[str, Any] = {"api_visibility": "private", "show_progress": QUIET}

    def nav_event(trigger: Any, fn: Any, inputs: list[Any], outputs: list[Any], **kw: Any) -> Any:
        return trigger(guards(Action.VIEW, fn, with_caller=True), inputs=inputs, outputs=outputs, **(kw or private))

    nav = [
        nav_event(prev_btn.click, go_prev, [image_id, *ctx], move_out),
        nav_event(next_btn.click, go_next, [image_id, *ctx], move_out),
        nav_event(skip.click, skip_to_next, [image_id, *ctx], move_out),
        refresh.click(view_, inputs=[image_id, *ctx], outputs=move_out, **private),
        nav_event(
            next_open.click,
            show_next_unreviewed,
            [image_id, *ctx],
            move_out,
            api_name="next_unreviewed",
            show_progress=QUIET,
        ),
        nav_event(queue.input, open_queue, [image_id, *ctx], move_out),
        blind.input(view_, inputs=[image_id, *ctx], outputs=move_out, **private),
        nav_event(jump.submit, do_jump, [jump, image_id, *ctx], [*move_out, jump]),
        nav_event(recent.select, open_decision, [image_id, *ctx], move_out),
        nav_event(keep_btn.click, keep_theirs, [image_id, *ctx, pending], move_out),
    ]
    reviewing = guards(Action.REVIEW, do_review, with_caller=True)
    review_tail = [note, blind, queue, trail, seen]
    reviews = [
        b.click(reviewing, inputs=[image_id, b, *review_tail], outputs=move_out, **private)
        for b in (*confirm, accept, not_cat, unsure)
    ]
    # The public API for scripted review: image id, any label (aliases accepted), note, blind, queue,
    # and the review id the client was shown (0: none; empty: replace whatever is there).
    reviews.append(
        set_label.click(
            reviewing, inputs=[image_id, pick, *review_tail], outputs=move_out, api_name="review", show_progress=QUIET
        )
    )
    reviews.append(pick.input(reviewing, inputs=[image_id, pick, *review_tail], outputs=move_out, **private))
    reviews.append(
        replace_btn.click(
            guards(Action.REVIEW, replace_mine, with_caller=True),
            inputs=[image_id, *ctx, pending],
            outputs=move_out,
            **private,
        )
    )
    reviews.append(
        undo.click(
            guards(Action.REVIEW, do_undo, with_caller=True),
            inputs=[image_id, *ctx, last_vote],
            outputs=move_out,
            **private,
        )
    )
    for e in reviews:
        e.then(None, js=BLUR_JS)
    streams = [
        e.then(streamed, inputs=[image_id, blind], outputs=[reasoning], api_visibility="private", show_progress=QUIET)
        for e in [*nav, *reviews]
    ]
    stop_reasoning.click(None, cancels=[first_stream, *streams], api_visibility="private")

    timer = gr.Timer(1.0)
    timer.tick(guards(Action.VIEW, tick), inputs=[job], outputs=[job], api_visibility="private", show_progress=QUIET)
