"""Calibration tab: fit temperatures and the fusion weight on reviewed photos; show ECE and
per-breed accuracy of stage 1, VLM and fused; routing counts and VLM time saved."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from catreview.app.core import ReviewApp
from catreview.evaluate.store import fit_and_store
from catreview.query.photos import routing_stats


def build(app: ReviewApp) -> None:
    """Lay out the Calibration tab."""
    n_min = app.settings.fusion.calibration_min_reviews
    gr.Markdown(
        f"Fits a temperature per stage (Guo et al. 2017), the fusion weight that maximises balanced "
        f"accuracy, and a temperature of the blended distribution (a blend of calibrated stages is "
        f"under-confident), on the reviewed photos (at least {n_min}). ECE uses 15 equal-width bins. "
        "\"after\" is measured on the photos the fit saw; the \"_cv\" columns are cross-validated "
        "(each photo measured with a fit that did not see it), the honest estimate. "
        "The VLM and the fusion answer over the stage-1 candidates **plus \"other\"**: when the human "
        "breed is not among stage 1's candidates, \"other\" counts as the right answer."
    )
    fit = gr.Button("Fit calibration on reviewed photos", elem_id="fit-calibration", variant="primary")
    report = gr.Textbox(label="Report", lines=8, interactive=False, elem_id="calibration-report")
    summary = gr.Dataframe(
        headers=["stage", "n", "ece_before", "ece_after", "accuracy_before", "accuracy_after",
                 "balanced_accuracy_before", "balanced_accuracy_after", "ece_after_cv", "accuracy_after_cv",
                 "balanced_accuracy_after_cv"],
        label="Stages: ECE and accuracy before/after (in-sample) and cross-validated (_cv)",
        elem_id="calibration-summary", interactive=False)
    per_breed = gr.Dataframe(
        headers=["breed", "reviews", "stage1_correct", "stage1_accuracy", "vlm_reviews", "vlm_correct",
                 "vlm_accuracy", "fused_correct", "fused_accuracy"],
        label="Per-breed accuracy", elem_id="calibration-per-breed", interactive=False)

    def run() -> tuple[str, pd.DataFrame | None, pd.DataFrame | None]:
        try:
            rep, row_id = fit_and_store(app.settings, app.registry)
        except ValueError as exc:
            return f"Cannot calibrate yet: {exc}", None, None
        text = rep.to_table().split("\n\n")[0] + f"\nStored as calibration #{row_id}; fused predictions now use it."
        return text, pd.DataFrame(rep.summary_rows()).round(3), pd.DataFrame(rep.per_breed_rows()).round(3)

    fit.click(run, outputs=[report, summary, per_breed], api_name="calibrate")

    gr.Markdown("### Routing")
    routing = gr.Markdown(elem_id="routing-stats")
    refresh = gr.Button("Refresh routing counts", elem_id="refresh-routing", size="sm")
    refresh.click(lambda: routing_stats(app.engine, app.registry).text(), outputs=[routing], api_name="routing")
