"""Review tab: one photo at a time, both stages' outputs, confirm or correct the label."""

from __future__ import annotations

import threading
from typing import Any

import gradio as gr

from catreview.app.core import ReviewApp
from catreview.app.presenters import review as present
from catreview.data.images import ImageDecodeError
from catreview.data.labels import NOT_A_CAT, UNSURE
from catreview.data.reviews import ReviewError

N_CANDIDATES = 3


def render(app: ReviewApp, image_id: int | None) -> list[Any]:
    """Everything the tab shows for photo ``image_id`` (``None`` or an unknown id: the first photo).

    A fixed number of indexed queries, whatever the collection's size. Returns values for:
    image_id, photo (a file path), counter, status, stage1, vlm, vlm_info, fused, review_info,
    then the candidate buttons.
    """
    reviewed, total = app.counts()
    if image_id is None:
        image_id = app.first_photo()
    notice = ""
    try:
        v = app.view(int(image_id)) if image_id is not None else None
    except ReviewError as exc:  # an id that is not (or no longer) there: say so, show the first photo
        first = app.first_photo()
        v = app.view(first) if first is not None else None
        notice = f"{exc}; showing the first photo instead."
    if v is None:
        empty = [None, None, present.counter(reviewed, total), present.NO_PHOTOS, None, None, "", None, ""]
        return empty + [gr.update(value="—", interactive=False)] * N_CANDIDATES
    panels = present.prediction_panels(v, app.registry.untrained_reason(), app.registry.stage1_untrained_reason())
    try:
        photo: str | None = str(app.display_path(v["id"]))
        status = " ".join(t for t in (notice, panels.status) if t)
    except ImageDecodeError as exc:
        photo, status = None, f"The photo cannot be shown: {exc}"
    cands = [d["label"] for d in (v["stage1"] or [])]
    buttons = [
        gr.update(value=cands[i], interactive=True) if i < len(cands) else gr.update(value="—", interactive=False)
        for i in range(N_CANDIDATES)
    ]
    return [
        v["id"],
        photo,
        present.counter(reviewed, total, v["id"]),
        status,
        panels.stage1,
        panels.vlm,
        panels.vlm_info,
        panels.fused,
        present.review_info(v),
        *buttons,
    ]


def build(app: ReviewApp, demo: gr.Blocks) -> None:
    """Lay out the Review tab and wire its events."""
    with gr.Row():
        annotator = gr.Textbox(label="Annotator", value=app.settings.annotator, elem_id="annotator", scale=1)
        counter = gr.Markdown(elem_id="counter")
        job = gr.Markdown(app.job.text(), elem_id="bg-progress")
    with gr.Row():
        with gr.Column(scale=3):
            photo = gr.Image(label="Photo", type="filepath", interactive=False, elem_id="photo", height=420)
            image_id = gr.Number(label="Photo id in the database", precision=0, elem_id="image-id", interactive=False)
            with gr.Row():
                prev_btn = gr.Button("◀ Previous", elem_id="prev")
                next_btn = gr.Button("Next ▶", elem_id="next")
                next_open = gr.Button("Next unreviewed", elem_id="next-unreviewed")
                refresh = gr.Button("Refresh", elem_id="refresh")
        with gr.Column(scale=4):
            message = gr.Markdown(elem_id="review-message")
            status = gr.Markdown(elem_id="pred-status")
            with gr.Row():
                stage1 = gr.Label(label="Stage 1 top-3", num_top_classes=3, elem_id="stage1")
                vlm = gr.Label(label="VLM over the candidates", elem_id="vlm")
                fused = gr.Label(label="Fused prediction", num_top_classes=4, elem_id="fused")
            vlm_info = gr.Markdown(elem_id="vlm-info")
            reasoning = gr.Textbox(
                label=present.reasoning_label(app.settings.uses_demo_models),
                lines=5,
                interactive=False,
                elem_id="reasoning",
            )
            stop_reasoning = gr.Button("Stop reasoning", elem_id="stop-reasoning", size="sm")
            review_info = gr.Markdown(elem_id="review-info")
            gr.Markdown("**Confirm a candidate** or pick any breed:")
            with gr.Row():
                confirm = [gr.Button("—", variant="primary", elem_id=f"confirm-{i}") for i in range(N_CANDIDATES)]
            with gr.Row():
                pick = gr.Dropdown(
                    app.vocabulary.choices(),
                    value=None,
                    label="Any breed (type to search)",
                    filterable=True,
                    allow_custom_value=True,
                    elem_id="breed-pick",
                    scale=3,
                )
                set_label = gr.Button("Set label", elem_id="set-label", scale=1)
            with gr.Row():
                not_cat = gr.Button(NOT_A_CAT, elem_id="not-a-cat")
                unsure = gr.Button(UNSURE, elem_id="unsure")
                skip = gr.Button("Skip", elem_id="skip")
            note = gr.Textbox(label="Note (optional)", elem_id="note")
    with gr.Accordion("Photos that could not be read", open=False):
        failed = gr.Dataframe(headers=["path", "reason"], elem_id="failed-list", interactive=False)

    view_out = [image_id, photo, counter, status, stage1, vlm, vlm_info, fused, review_info, *confirm]

    def current(img_id: float | None) -> int | None:
        return None if img_id is None else int(img_id)

    def show(img_id: float | None) -> list[Any]:
        return render(app, current(img_id))

    def step(img_id: float | None, direction: int) -> list[Any]:
        return render(app, app.neighbour(current(img_id), direction))

    def stream(img_id: float | None):
        if img_id is None:
            yield ""
            return
        stop = threading.Event()
        try:
            yield from app.stream_reasoning(int(img_id), stop=stop)
        finally:
            stop.set()  # the page moved on or "Stop" was pressed: end generation

    def do_review(img_id: float | None, label: str | None, who: str, text: str | None) -> list[Any]:
        if img_id is None or not label or label == "—":
            return [*show(img_id), present.NOTHING_TO_LABEL]
        try:
            app.review(int(img_id), label, who, text)
        except ReviewError as exc:
            return [*show(img_id), present.refused(exc)]
        return [*step(img_id, 1), present.saved(label, int(img_id))]

    def show_next_unreviewed(img_id: float | None) -> list[Any]:
        nxt = app.next_unreviewed(current(img_id))
        if nxt is None:
            return [*show(img_id), present.ALL_REVIEWED]
        return [*render(app, nxt), ""]

    def first_view(img_id: float | None = None) -> list[Any]:
        if img_id:  # scripted clients open a given photo (the page itself sends the empty field's 0)
            return show(img_id)
        return render(app, app.next_unreviewed(None))

    ev = demo.load(first_view, inputs=[image_id], outputs=view_out, api_name="show")
    first_stream = ev.then(stream, inputs=[image_id], outputs=[reasoning], api_name="reasoning")
    ev.then(lambda: app.failed_images(), outputs=[failed], api_name="failed")
    nav = [
        prev_btn.click(lambda i: step(i, -1), inputs=[image_id], outputs=view_out, api_visibility="private"),
        next_btn.click(lambda i: step(i, 1), inputs=[image_id], outputs=view_out, api_visibility="private"),
        skip.click(lambda i: step(i, 1), inputs=[image_id], outputs=view_out, api_visibility="private"),
        refresh.click(show, inputs=[image_id], outputs=view_out, api_visibility="private"),
        next_open.click(
            show_next_unreviewed, inputs=[image_id], outputs=[*view_out, message], api_name="next_unreviewed"
        ),
    ]
    review_inputs_tail = [annotator, note]
    reviews = [
        b.click(
            do_review,
            inputs=[image_id, b, *review_inputs_tail],
            outputs=[*view_out, message],
            api_visibility="private",
        )
        for b in confirm
    ]
    # The public API for scripted review: image id, any label (aliases accepted), annotator, note.
    reviews.append(
        set_label.click(
            do_review,
            inputs=[image_id, pick, *review_inputs_tail],
            outputs=[*view_out, message],
            api_name="review",
        )
    )
    reviews += [
        b.click(
            do_review,
            inputs=[image_id, b, *review_inputs_tail],
            outputs=[*view_out, message],
            api_visibility="private",
        )
        for b in (not_cat, unsure)
    ]
    streams = [
        e.then(stream, inputs=[image_id], outputs=[reasoning], api_visibility="private") for e in [*nav, *reviews]
    ]
    stop_reasoning.click(None, cancels=[first_stream, *streams], api_visibility="private")

    timer = gr.Timer(1.0)
    timer.tick(lambda: app.job.text(), outputs=[job], api_visibility="private")
