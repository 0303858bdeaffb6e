"""Review tab: one photo at a time, both stages' outputs, confirm or correct the label — keyboard
first (:data:`HOTKEYS_JS`), in place (no spinners), with undo, history, queues and blind mode.

Layout (fits 1366x768 without scrolling): a toolbar (annotator, queue, jump, blind mode,
counter), then the photo with its "why it is here" line and navigation, the three prediction
panels with every decision control, and the annotator's last decisions. Navigation and review
events use ``show_progress="hidden"``: the photo and panels are replaced in place, never blanked;
the next photo's display file is prefetched by the browser.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr

from catreview.app.core import ReviewApp
from catreview.app.presenters import review as present
from catreview.data.images import ImageDecodeError
from catreview.data.labels import NOT_A_CAT, UNSURE
from catreview.data.reviews import ReviewError
from catreview.query import photos
from catreview.query.queues import QUEUE_KINDS

N_CANDIDATES = 3
DEFAULT_QUEUE = "import"
"""The queue selected when the page opens (import order)."""
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
    + " accept why prefetch recent history"
).split()
"""What :func:`render` returns, in order (the first nine are the public ``/show`` API's)."""


def _next_photo_path(app: ReviewApp, image_id: int, kind: str) -> str | None:
    """Display file of the photo that follows ``image_id`` in queue ``kind`` (for prefetching)."""
    item = app.next_in_queue(kind, image_id)
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
        return [*empty, None, None, "", None, "", *[off() for _ in range(N_CANDIDATES)], off(), "", "", recent, []]
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
        why = f"**Why it is here:** {reason}" if reason else ""
    nxt = _next_photo_path(app, v["id"], kind) if prefetch else None
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
    ]


def build(app: ReviewApp, demo: gr.Blocks) -> None:
    """Lay out the Review tab and wire its events and keys."""
    queue_choices = [(title, kind) for kind, title in QUEUE_KINDS.items()]
    prefs = gr.BrowserState({"annotator": app.settings.annotator, "blind": False}, storage_key="catreview-review")
    trail = gr.State([])  # photos shown before, newest last ("Previous")
    compact: dict[str, Any] = {"container": False, "show_label": False}
    with gr.Row(equal_height=True, elem_id="review-toolbar"):
        annotator = gr.Textbox(
            label="Annotator",
            value=app.settings.annotator,
            placeholder="your name",
            elem_id="annotator",
            scale=1,
            min_width=110,
            **compact,
        )
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
            why = gr.Markdown(elem_id="why")
            with gr.Row():
                prev_btn = gr.Button("Previous", elem_id="prev", size="sm", min_width=60)
                next_btn = gr.Button("Next", elem_id="next", size="sm", min_width=60)
                next_open = gr.Button("Next unreviewed", elem_id="next-unreviewed", size="sm", min_width=60)
                refresh = gr.Button("Refresh", elem_id="refresh", size="sm", min_width=60)
            prefetch = gr.HTML(elem_id="prefetch", padding=False)
        with gr.Column(scale=6, min_width=420):
            message = gr.Markdown(elem_id="review-message")
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
    ]
    assert len(view_out) == len(VIEW_FIELDS)
    # every move: the view, the search and the note cleared, the trail, then the notice
    move_out = [*view_out, pick, note, trail, message]
    ctx = [annotator, blind, queue, trail]  # inputs after the photo id

    def current(img_id: float | None) -> int | None:
        return None if img_id is None else int(img_id)

    def kind_of(kind: str | None) -> str:
        return kind if kind in QUEUE_KINDS else DEFAULT_QUEUE

    def moved(
        to: int | None,
        frm: int | None,
        who: str,
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
        view = render(app, to, blind=bool(is_blind), annotator=who, reason=reason, kind=kind_of(kind))
        return [*view, None, "", tr, msg]

    def show(img_id: float | None, who: str = "", is_blind: bool = False, kind: str | None = None, tr=None):
        i = current(img_id)
        return moved(i, i, who, is_blind, kind, tr)

    def queue_next(img_id: float | None, who: str, is_blind: bool, kind: str | None, tr, msg: str = ""):
        """The next open photo of the selected queue after this one (with its reason)."""
        i = current(img_id)
        item = app.next_in_queue(kind_of(kind), i)
        if item is None:
            empty = present.queue_empty(QUEUE_KINDS[kind_of(kind)])
            return moved(i, i, who, is_blind, kind, tr, " ".join(t for t in (msg, empty) if t))
        return moved(item.image_id, i, who, is_blind, kind, tr, msg, item.reason)

    def go_next(img_id: float | None, who: str, is_blind: bool, kind: str | None, tr):
        if kind_of(kind) == DEFAULT_QUEUE:  # import order: browse every photo, reviewed or not
            i = current(img_id)
            return moved(app.neighbour(i, 1), i, who, is_blind, kind, tr)
        return queue_next(img_id, who, is_blind, kind, tr)

    def go_prev(img_id: float | None, who: str, is_blind: bool, kind: str | None, tr):
        i = current(img_id)
        tr = list(tr or [])
        if tr:  # back to the photo shown before this one
            return moved(tr[-1], i, who, is_blind, kind, tr[:-1], remember=False)
        return moved(app.neighbour(i, -1), i, who, is_blind, kind, tr, remember=False)

    def open_queue(img_id: float | None, who: str, is_blind: bool, kind: str | None, tr):
        """The first open photo of the newly selected queue (with its reason)."""
        i = current(img_id)
        item = app.next_in_queue(kind_of(kind), None)
        if item is None:
            return moved(i, i, who, is_blind, kind, tr, present.queue_empty(QUEUE_KINDS[kind_of(kind)]))
        return moved(item.image_id, i, who, is_blind, kind, tr, "", item.reason)

    def stream(img_id: float | None, is_blind: bool = False):
        if img_id is None or is_blind:  # blind mode: no model output before the choice
            yield ""
            return
        stop = threading.Event()
        try:
            yield from app.stream_reasoning(int(img_id), stop=stop)
        finally:
            stop.set()  # the page moved on or "Stop" was pressed: end generation

    def do_review(
        img_id: float | None,
        label: str | None,
        who: str,
        text: str | None,
        is_blind: bool = False,
        kind: str | None = None,
        tr=None,
    ) -> list[Any]:
        if img_id is None or not label or label == "—":
            view = render(app, current(img_id), blind=bool(is_blind), annotator=who, kind=kind_of(kind))
            return [*view, label, text, list(tr or []), present.NOTHING_TO_LABEL]
        i = int(img_id)
        try:
            saved = app.review(i, label, who, text, blind=bool(is_blind))
        except ReviewError as exc:  # nothing stored: the photo, the search and the note stay
            view = render(app, i, blind=bool(is_blind), annotator=who, kind=kind_of(kind))
            return [*view, label, text, list(tr or []), present.refused(exc)]
        if is_blind:
            msg = present.blind_reveal(saved.label, i, app.view(i))
        else:
            msg = present.saved(saved.label, i)
        return queue_next(i, who, is_blind, kind, tr, msg)

    def do_undo(img_id: float | None, who: str, is_blind: bool, kind: str | None, tr):
        i = current(img_id)
        try:
            result = app.undo_last(who)
        except ReviewError as exc:
            return moved(i, i, who, is_blind, kind, tr, present.refused(exc))
        return moved(result.image_id, i, who, is_blind, kind, tr, present.undone(result))

    def do_jump(text: str, img_id: float | None, who: str, is_blind: bool, kind: str | None, tr):
        i = current(img_id)
        found = app.find_photo(text)
        if found is None:
            return [*moved(i, i, who, is_blind, kind, tr, f"⚠️ No photo matches {text.strip()!r}."), text]
        return [*moved(found, i, who, is_blind, kind, tr), ""]

    def open_decision(evt: gr.SelectData, img_id: float | None, who: str, is_blind: bool, kind: str | None, tr):
        i = current(img_id)
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        decisions = app.recent_decisions(who)
        if not isinstance(row, int) or not 0 <= row < len(decisions):
            return moved(i, i, who, is_blind, kind, tr)
        return moved(decisions[row].image_id, i, who, is_blind, kind, tr)

    def show_next_unreviewed(img_id: float | None, who: str = "", is_blind: bool = False, kind=None, tr=None):
        i = current(img_id)
        nxt = app.next_unreviewed(i)
        if nxt is None:
            return moved(i, i, who, is_blind, kind, tr, present.ALL_REVIEWED)
        return moved(nxt, i, who, is_blind, kind, tr)

    def first_view(img_id: float | None = None, who: str = "", is_blind: bool = False) -> list[Any]:
        if img_id:  # scripted clients open a given photo (the page itself sends the empty field's 0)
            return render(app, current(img_id), blind=bool(is_blind), annotator=who)
        return render(app, app.next_unreviewed(None), blind=bool(is_blind), annotator=who)

    def restore_prefs(saved: dict[str, Any] | None) -> tuple[str, bool]:
        saved = saved or {}
        return str(saved.get("annotator") or app.settings.annotator), bool(saved.get("blind", False))

    restored = demo.load(restore_prefs, inputs=[prefs], outputs=[annotator, blind], api_visibility="private")
    restored.then(None, js=HOTKEYS_JS)
    ev = restored.then(
        first_view, inputs=[image_id, annotator, blind], outputs=view_out, api_name="show", show_progress=QUIET
    )
    first_stream = ev.then(stream, inputs=[image_id, blind], outputs=[reasoning], api_name="reasoning")
    ev.then(lambda: app.failed_images(), outputs=[failed], api_name="failed")
    for box in (annotator, blind):
        box.change(lambda a, b: {"annotator": a, "blind": bool(b)}, inputs=[annotator, blind], outputs=[prefs])

    private: dict[str, Any] = {"api_visibility": "private", "show_progress": QUIET}
    nav = [
        prev_btn.click(go_prev, inputs=[image_id, *ctx], outputs=move_out, **private),
        next_btn.click(go_next, inputs=[image_id, *ctx], outputs=move_out, **private),
        skip.click(queue_next, inputs=[image_id, *ctx], outputs=move_out, **private),
        refresh.click(show, inputs=[image_id, *ctx], outputs=move_out, **private),
        next_open.click(
            show_next_unreviewed,
            inputs=[image_id, *ctx],
            outputs=move_out,
            api_name="next_unreviewed",
            show_progress=QUIET,
        ),
        queue.input(open_queue, inputs=[image_id, *ctx], outputs=move_out, **private),
        blind.input(show, inputs=[image_id, *ctx], outputs=move_out, **private),
        jump.submit(do_jump, inputs=[jump, image_id, *ctx], outputs=[*move_out, jump], **private),
        recent.select(open_decision, inputs=[image_id, *ctx], outputs=move_out, **private),
        undo.click(do_undo, inputs=[image_id, *ctx], outputs=move_out, **private),
    ]
    review_tail = [annotator, note, blind, queue, trail]
    reviews = [
        b.click(do_review, inputs=[image_id, b, *review_tail], outputs=move_out, **private)
        for b in (*confirm, accept, not_cat, unsure)
    ]
    # The public API for scripted review: image id, any label (aliases accepted), annotator, note.
    reviews.append(
        set_label.click(
            do_review, inputs=[image_id, pick, *review_tail], outputs=move_out, api_name="review", show_progress=QUIET
        )
    )
    reviews.append(pick.input(do_review, inputs=[image_id, pick, *review_tail], outputs=move_out, **private))
    for e in reviews:
        e.then(None, js=BLUR_JS)
    streams = [
        e.then(stream, inputs=[image_id, blind], outputs=[reasoning], api_visibility="private", show_progress=QUIET)
        for e in [*nav, *reviews]
    ]
    stop_reasoning.click(None, cancels=[first_stream, *streams], api_visibility="private")

    def tick(shown: str) -> Any:
        text = app.job.text()
        return gr.skip() if text == shown else text  # unchanged: no update, nothing blinks

    timer = gr.Timer(1.0)
    timer.tick(tick, inputs=[job], outputs=[job], api_visibility="private", show_progress=QUIET)
