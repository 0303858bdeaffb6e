"""Grid tab: thumbnails of the photos that match a filter (current label, predicted label, queue,
or a confusion-matrix cell), 48 a page, multi-select, and one label given to every selected photo
(:meth:`catreview.app.core.ReviewApp.bulk_review`: one review each).

Thumbnails are files in ``app.thumbs_dir`` (made once per content hash, served by path from
Gradio's static paths, :mod:`catreview.query.thumbs`). Selection: a click on a thumbnail toggles
it in the "Selected" checkbox group (also tickable directly); "Select all on page" ticks the page.
The handlers are plain functions of the :class:`ReviewApp` so they can be tested without a browser;
every text comes from :mod:`catreview.app.presenters.grid`. Each event is guarded
(:class:`catreview.app.auth.Guards`): browsing and selecting are ``view``, "Assign label" is a
``review`` recorded under the caller's name (no annotator box).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from catreview.app.auth import Caller, Guards
from catreview.app.core import ReviewApp
from catreview.app.presenters import grid as text
from catreview.data.accounts import Action
from catreview.data.images import ImageDecodeError
from catreview.data.labels import SPECIAL_LABELS
from catreview.data.reviews import ReviewError
from catreview.predict.fusion import OTHER
from catreview.query.grid import PREDICTED_BY, UNLABELLED, BulkReviewError, GridFilter, GridPage
from catreview.query.queues import QUEUE_KINDS

__all__ = ["GridControls", "assign", "build", "filter_of", "show", "toggle"]


@dataclass
class PageState:
    """What the page shows now: the page, its number, and the ``after`` of each page shown so far."""

    page: GridPage
    number: int
    afters: list[int | None]


def filter_of(label: str | None, predicted: str | None, predicted_by: str | None, queue: str | None) -> GridFilter:
    """The :class:`GridFilter` of the tab's dropdowns (:data:`~catreview.app.presenters.grid.ANY` /
    :data:`~catreview.app.presenters.grid.NO_QUEUE` or empty: no filter)."""
    return GridFilter(
        label=None if label in (None, "", text.ANY) else label,
        predicted=None if predicted in (None, "", text.ANY) else predicted,
        predicted_by=predicted_by or "fused",
        queue=None if queue in (None, "", text.NO_QUEUE) else queue,
    )


def _gallery(app: ReviewApp, page: GridPage) -> tuple[list[tuple[str, str]], list[str]]:
    """Gallery items ``(thumbnail path, caption)`` and notes about photos that cannot be shown."""
    items, problems = [], []
    for it in page.items:
        try:
            items.append((str(app.thumbnail(it.image_id, it.sha256, it.path)), it.caption))
        except ImageDecodeError as exc:  # the file was moved or damaged since the import
            problems.append(f"#{it.image_id}: {exc}")
    return items, problems


Shown = tuple[Any, Any, str, "PageState | None", list[str]]


def show(app: ReviewApp, flt: GridFilter, after: int | None = None, number: int = 1,
         afters: list[int | None] | None = None) -> Shown:  # fmt: skip
    """Render a page: (gallery value, selection update (choices of the page, none ticked), page
    line, page state, the empty selection); a filter that cannot be served gives its reason and an
    empty page."""
    try:
        page = app.grid_page(flt, after=after)
    except ValueError as exc:
        return [], gr.update(choices=[], value=[]), f"Cannot show this: {exc}", None, []
    items, problems = _gallery(app, page)
    line = text.page_line(page, number)
    if problems:
        line += " Not shown: " + "; ".join(problems)
    choices = [(it.caption, str(it.image_id)) for it in page.items]
    state = PageState(page, number, [*(afters or []), after][-1000:])
    return items, gr.update(choices=choices, value=[]), line, state, []


def toggle(selected: list[str] | None, state: PageState | None, index: int | None) -> list[str]:
    """The selection after a click on thumbnail ``index`` of the page: added, or removed if it was in."""
    chosen = list(selected or [])
    if state is None or index is None or not 0 <= index < len(state.page.items):
        return chosen
    key = str(state.page.items[index].image_id)
    return [c for c in chosen if c != key] if key in chosen else [*chosen, key]


def assign(app: ReviewApp, selected: list[str] | None, label: str | None, annotator: str,
           state: PageState | None) -> str:  # fmt: skip
    """Give ``label`` to the selected photos (one review each, conflicts reported); the message."""
    ids = [int(s) for s in selected or []]
    if not label:
        return "Pick the label to give the selected photos."
    seen = state.page.seen() if state is not None else {}
    try:
        reviews = app.bulk_review(ids, label, annotator, seen={i: seen[i] for i in ids if i in seen})
    except BulkReviewError as exc:
        return text.bulk_failed(exc, label)
    except ReviewError as exc:  # no annotator, unknown label, nothing selected: nothing stored
        return f"Not saved: {exc}"
    return text.bulk_saved(reviews, label)


@dataclass
class GridControls:
    """The tab's filter components and its refresh, for other tabs (the Evaluation tab's
    confusion-matrix cells open here)."""

    label: gr.Dropdown
    predicted: gr.Dropdown
    predicted_by: gr.Radio
    queue: gr.Dropdown
    note: gr.Markdown
    refresh: Any  # (label, predicted, predicted_by, queue) -> outputs; guarded (``view``)
    outputs: list[Any]


def build(app: ReviewApp, guards: Guards) -> GridControls:
    """Lay out the Grid tab, its events guarded by ``guards``; returns its :class:`GridControls`."""
    breeds = list(app.vocabulary.names)  # then the special labels (Not a cat, Unsure)
    gr.Markdown(text.INTRO)
    with gr.Row():
        label = gr.Dropdown([text.ANY, UNLABELLED, *breeds, *SPECIAL_LABELS], value=text.ANY,
                            label="Current label", filterable=True, elem_id="grid-filter-label")  # fmt: skip
        predicted = gr.Dropdown([text.ANY, *breeds, OTHER], value=text.ANY, label="Predicted label",
                                filterable=True, elem_id="grid-filter-predicted")  # fmt: skip
        predicted_by = gr.Radio(list(PREDICTED_BY), value="fused", label="Predicted by", elem_id="grid-filter-by")
        queue = gr.Dropdown([text.NO_QUEUE, *((title, kind) for kind, title in QUEUE_KINDS.items())],
                            value=text.NO_QUEUE, label="Queue", elem_id="grid-filter-queue")  # fmt: skip
    with gr.Row():
        show_btn = gr.Button("Show", variant="primary", elem_id="grid-show")
        first_btn = gr.Button("First page", elem_id="grid-first")
        next_btn = gr.Button("Next page", elem_id="grid-next")
    note = gr.Markdown(elem_id="grid-note")
    line = gr.Markdown(elem_id="grid-page-line")
    gallery = gr.Gallery(label="Photos (click to select)", columns=8, height="auto", allow_preview=False, fit_columns=False,
                         object_fit="cover", elem_id="grid-gallery")  # fmt: skip
    selected = gr.CheckboxGroup([], label="Selected", elem_id="grid-selected")
    with gr.Row():
        all_btn = gr.Button("Select all on page", elem_id="grid-select-all")
        clear_btn = gr.Button("Clear selection", elem_id="grid-clear")
    with gr.Row():
        target = gr.Dropdown([*breeds, *SPECIAL_LABELS], value=None, label="Label for the selected photos",
                             filterable=True, elem_id="grid-assign-label")  # fmt: skip
        assign_btn = gr.Button("Assign label to selected", variant="primary", elem_id="grid-assign")
    message = gr.Markdown(elem_id="grid-message")
    state = gr.State(None)
    chosen = gr.State([])  # the selected photo ids (str), see on_select
    outputs = [gallery, selected, line, state, chosen]
    filters = [label, predicted, predicted_by, queue]

    def refresh(lab: str, pred: str, by: str, q: str) -> Shown:
        return show(app, filter_of(lab, pred, by, q))

    def _same(st: PageState) -> Shown:  # the page on screen again (its after is the last of afters)
        return show(app, st.page.filter, st.afters[-1] if st.afters else None, st.number, st.afters[:-1])

    def next_page(st: PageState | None) -> Shown:
        if st is None:
            return refresh(text.ANY, text.ANY, "fused", text.NO_QUEUE)
        if st.page.next_after is None:
            return _same(st)
        return show(app, st.page.filter, st.page.next_after, st.number + 1, st.afters)

    def reshow(st: PageState | None) -> Shown:  # after a bulk assignment: the same page, fresh labels
        return _same(st) if st is not None else refresh(text.ANY, text.ANY, "fused", text.NO_QUEUE)

    view_refresh = guards(Action.VIEW, refresh)
    show_btn.click(view_refresh, inputs=filters, outputs=outputs, api_name="grid_show")
    first_btn.click(view_refresh, inputs=filters, outputs=outputs, api_visibility="private")
    next_btn.click(guards(Action.VIEW, next_page), inputs=[state], outputs=outputs, api_visibility="private")

    # The selection's truth is server-side state (events of one listener run in order, each seeing the
    # last one's result), so quick clicks on several thumbnails all count; the checkbox group shows it.
    def on_select(sel: list[str], st: PageState | None, evt: gr.SelectData) -> tuple[list[str], list[str]]:
        chosen = toggle(sel, st, evt.index if isinstance(evt.index, int) else None)
        return chosen, chosen

    def select_all(st: PageState | None) -> tuple[list[str], list[str]]:
        chosen = [str(i) for i in st.page.ids] if st else []
        return chosen, chosen

    def do_assign(sel: list[str] | None, lab: str | None, st: PageState | None, who: Caller) -> str:
        return assign(app, sel, lab, who.name, st)

    view = {"api_visibility": "private"}
    gallery.select(guards(Action.VIEW, on_select), inputs=[chosen, state], outputs=[chosen, selected], **view)
    selected.input(guards(Action.VIEW, lambda ticked: list(ticked or [])), inputs=[selected], outputs=[chosen], **view)
    all_btn.click(guards(Action.VIEW, select_all), inputs=[state], outputs=[chosen, selected], **view)
    clear_btn.click(guards(Action.VIEW, lambda: ([], [])), outputs=[chosen, selected], **view)
    assign_btn.click(
        guards(Action.REVIEW, do_assign, with_caller=True),
        inputs=[chosen, target, state],
        outputs=[message],
        api_name="grid_assign",
    ).then(guards(Action.VIEW, reshow), inputs=[state], outputs=outputs, **view)
    return GridControls(label, predicted, predicted_by, queue, note, view_refresh, outputs)
