"""Evaluation tab: every model version's accuracy on the held-out reviewed photos, per breed, and a
confusion matrix (:meth:`catreview.app.core.ReviewApp.evaluation`), so a user sees what each round
changed. The handlers are plain functions of the :class:`ReviewApp` (``evaluate``, ``confusion``)
so they can be tested without a browser; every text comes from
:mod:`catreview.app.presenters.evaluate`."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from catreview.app.core import ReviewApp
from catreview.app.presenters import evaluate as text
from catreview.evaluate.report import EvaluationReport

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


def build(app: ReviewApp) -> None:
    """Lay out the Evaluation tab."""
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
    state = gr.State(None)  # this page's last report, for the dropdown
    run.click(lambda: evaluate(app), outputs=[header, summary, per_breed, choice, matrix, state], api_name="evaluate")
    choice.change(confusion, inputs=[state, choice], outputs=[matrix], api_visibility="private")
