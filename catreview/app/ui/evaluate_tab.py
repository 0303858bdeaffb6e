"""Evaluation tab: every model version's accuracy on the held-out reviewed photos, per breed, and a
confusion matrix (:meth:`catreview.app.core.ReviewApp.evaluation`), so a user sees what each round
changed; as tables and as plots (:mod:`catreview.evaluate.plots`: the chosen row's confusion matrix,
per-breed accuracy with counts and a reliability diagram of the shown rows). A click on a cell of the
confusion table opens those photos in the Grid tab (current label x that stage's prediction). The
handlers are plain functions of the :class:`ReviewApp` (``evaluate``, ``confusion``, ``plots``,
``open_cell``) so they can be tested without a browser; every text comes from
:mod:`catreview.app.presenters.evaluate`. Every event is read-only, guarded as ``view``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd

from catreview.app.auth import Guards
from catreview.app.core import ReviewApp
from catreview.app.presenters import evaluate as text
from catreview.data.accounts import Action
from catreview.evaluate import plots as figures
from catreview.evaluate.report import EvaluationReport

if TYPE_CHECKING:
    from catreview.app.ui.grid_tab import GridControls

Outputs = tuple[str, pd.DataFrame, pd.DataFrame, Any, pd.DataFrame, "EvaluationReport | None"]


def evaluate(app: ReviewApp) -> Outputs:
    """Compute the report; returns (header text, summary frame, per-breed frame, dropdown update
    with the row names, confusion frame of the active fused row (else the last row), the report
    for the page's state)."""
    empty = pd.DataFrame()
    try:
        report = app.evaluation()
    except ValueError as exc:  # invalid stored predictions
        return text.cannot_evaluate(exc), empty, empty, gr.update(choices=[], value=None), empty, None
    if not report.rows:
        return text.nothing_to_evaluate(report), empty, empty, gr.update(choices=[], value=None), empty, report
    names = [r.name for r in report.rows]
    first = next((r for r in report.rows if r.active and r.stage == "fused"), report.rows[-1])
    return (
        text.header_text(report),
        pd.DataFrame(text.summary_table(report), columns=text.SUMMARY_COLUMNS),
        pd.DataFrame(text.per_breed_table(report)),
        gr.update(choices=names, value=first.name),
        pd.DataFrame(text.confusion_rows(first)),
        report,
    )


def confusion(report: EvaluationReport | None, name: str | None) -> pd.DataFrame:
    """The confusion matrix of row ``name`` of ``report`` (empty before one is computed)."""
    if report is None or not name:
        return pd.DataFrame()
    try:
        return pd.DataFrame(text.confusion_rows(report.row(name)))
    except KeyError:
        return pd.DataFrame()


Figures = tuple[Any, Any, Any]


def plots(report: EvaluationReport | None, name: str | None) -> Figures:
    """(confusion-matrix figure of row ``name``, per-breed accuracy of the shown rows, reliability
    diagram of the shown rows): one active (else first) row per stage
    (:func:`catreview.app.presenters.evaluate.shown_rows`); ``None`` for each before a report."""
    if report is None or not report.rows:
        return None, None, None
    shown = text.shown_rows(report)
    try:
        chosen = report.row(name) if name else shown[-1]
    except KeyError:
        chosen = shown[-1]
    return (
        figures.row_confusion_figure(chosen),
        figures.report_per_breed_figure(report, shown),
        figures.row_reliability_figure(shown),
    )


def open_cell(report: EvaluationReport | None, name: str | None, index: Any) -> tuple[Any, ...]:
    """The Grid tab's filter for a click on cell ``index`` (``[row, column]``) of the confusion
    table: (label, predicted, predicted by, queue, note, tab selection) updates; nothing changes
    for a click outside a row's cells."""
    unchanged = (gr.update(),) * 6
    if report is None or not name or not isinstance(index, (list, tuple)) or len(index) != 2:
        return unchanged
    try:
        cell = text.cell_choice(report.row(name), int(index[0]), int(index[1]))
    except KeyError:
        return unchanged
    if cell is None:
        return unchanged
    from catreview.app.presenters.grid import ANY, NO_QUEUE

    return (
        gr.update(value=cell.label),
        gr.update(value=cell.predicted or ANY),
        gr.update(value=cell.predicted_by),
        gr.update(value=NO_QUEUE),
        cell.note,
        gr.Tabs(selected="grid-tab"),
    )


def build(app: ReviewApp, guards: Guards, grid: GridControls | None = None, tabs: gr.Tabs | None = None) -> None:
    """Lay out the Evaluation tab, its events guarded by ``guards`` (all ``view``); with ``grid``
    and ``tabs`` a click on a confusion-table cell opens those photos in the Grid tab (whose
    ``refresh`` is guarded already)."""
    gr.Markdown(text.INTRO)
    run = gr.Button("Evaluate every model version", variant="primary", elem_id="run-evaluation")
    header = gr.Markdown(elem_id="evaluation-header")
    summary = gr.Dataframe(
        headers=text.SUMMARY_COLUMNS, label="Versions", interactive=False, elem_id="evaluation-summary"
    )
    per_breed = gr.Dataframe(label="Per-breed accuracy (recall)", interactive=False, elem_id="evaluation-per-breed")
    choice = gr.Dropdown([], label="Confusion matrix of", elem_id="evaluation-choice")
    matrix = gr.Dataframe(
        label="Confusion matrix (rows: true breed; columns: shown)", interactive=False, elem_id="evaluation-confusion"
    )
    with gr.Row():
        confusion_plot = gr.Plot(label="Confusion matrix", elem_id="evaluation-confusion-plot")
        per_breed_plot = gr.Plot(label="Per-breed accuracy (n = photos)", elem_id="evaluation-per-breed-plot")
    reliability_plot = gr.Plot(label="Reliability diagram", elem_id="evaluation-reliability-plot")
    state = gr.State(None)  # this page's last report, for the dropdown
    plot_outputs = [confusion_plot, per_breed_plot, reliability_plot]
    view_plots = guards(Action.VIEW, plots)
    run.click(
        guards(Action.VIEW, lambda: evaluate(app)),
        outputs=[header, summary, per_breed, choice, matrix, state],
        api_name="evaluate",
    ).then(view_plots, inputs=[state, choice], outputs=plot_outputs, api_visibility="private")
    choice.change(
        guards(Action.VIEW, confusion), inputs=[state, choice], outputs=[matrix], api_visibility="private"
    ).then(view_plots, inputs=[state, choice], outputs=plot_outputs, api_visibility="private")
    if grid is None or tabs is None:
        return

    def on_cell(report: EvaluationReport | None, name: str | None, evt: gr.SelectData) -> tuple[Any, ...]:
        return open_cell(report, name, evt.index)

    matrix.select(
        guards(Action.VIEW, on_cell),
        inputs=[state, choice],
        outputs=[grid.label, grid.predicted, grid.predicted_by, grid.queue, grid.note, tabs],
        api_visibility="private",
    ).then(grid.refresh, inputs=[grid.label, grid.predicted, grid.predicted_by, grid.queue], outputs=grid.outputs)
