"""Calibration tab: fit temperatures and the fusion weight on reviewed photos; show ECE and
per-breed accuracy of stage 1, VLM and fused; routing counts and VLM time saved.

Fitting changes what everyone's fused predictions are, so it needs the ``train`` action (admins;
recorded in the audit log); the routing counts are a ``view``."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from catreview.app.auth import Caller, Guards
from catreview.app.core import ReviewApp
from catreview.app.presenters.calibration import cannot_calibrate, fit_notice, intro, routing_text
from catreview.data.accounts import Action


def build(app: ReviewApp, guards: Guards) -> None:
    """Lay out the Calibration tab; its events are guarded by ``guards``."""
    gr.Markdown(intro(app.settings.fusion.calibration_min_reviews))
    fit = gr.Button("Fit calibration on reviewed photos", elem_id="fit-calibration", variant="primary")
    report = gr.Textbox(label="Report", lines=8, interactive=False, elem_id="calibration-report")
    summary = gr.Dataframe(
        headers=[
            "stage",
            "n",
            "ece_before",
            "ece_after",
            "accuracy_before",
            "accuracy_after",
            "balanced_accuracy_before",
            "balanced_accuracy_after",
            "ece_after_cv",
            "accuracy_after_cv",
            "balanced_accuracy_after_cv",
        ],
        label="Stages: ECE and accuracy before/after (in-sample) and cross-validated (_cv)",
        elem_id="calibration-summary",
        interactive=False,
    )
    per_breed = gr.Dataframe(
        headers=[
            "breed",
            "reviews",
            "stage1_correct",
            "stage1_accuracy",
            "vlm_reviews",
            "vlm_correct",
            "vlm_accuracy",
            "fused_correct",
            "fused_accuracy",
        ],
        label="Per-breed accuracy",
        elem_id="calibration-per-breed",
        interactive=False,
    )

    def run(who: Caller) -> tuple[str, pd.DataFrame | None, pd.DataFrame | None]:
        try:
            rep, row_id = app.calibrate(actor=who.name)
        except ValueError as exc:  # CalibrationError and invalid stored predictions
            return cannot_calibrate(exc), None, None
        return (
            fit_notice(rep, row_id),
            pd.DataFrame(rep.summary_rows()).round(3),
            pd.DataFrame(rep.per_breed_rows()).round(3),
        )

    fit.click(guards(Action.TRAIN, run, with_caller=True), outputs=[report, summary, per_breed], api_name="calibrate")

    gr.Markdown("### Routing")
    routing = gr.Markdown(elem_id="routing-stats")
    refresh = gr.Button("Refresh routing counts", elem_id="refresh-routing", size="sm")
    refresh.click(guards(Action.VIEW, lambda: routing_text(app.routing())), outputs=[routing], api_name="routing")
