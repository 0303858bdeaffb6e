"""Gradio UI: thin tabs over :class:`catreview.app_core.ReviewApp` (each tab one module).

Every interactive component has a stable ``elem_id`` for browser tests; every handler with an
``api_name`` can be driven with ``gradio_client``.
"""

from __future__ import annotations

import gradio as gr

from catreview.app_core import ReviewApp

DEMO_BANNER = (
    "**Demo models in use.** No classifier or VLM is configured, so the built-in tiny models "
    "(random weights) are running: their predictions are meaningless. Configure real models with "
    "`--config FILE` (see `assets/example_config.toml`)."
)


def build_ui(app: ReviewApp) -> gr.Blocks:
    """The whole app: a banner when demo models are in use, then one tab per step of the data
    flow (review -> calibration -> export -> train -> compare)."""
    from catreview.ui import calibration_tab, compare_tab, export_tab, review_tab, train_tab

    with gr.Blocks(title="catreview") as demo:
        gr.Markdown("# catreview — cat-breed review with a VLM in the loop")
        if app.settings.uses_demo_models:
            gr.Markdown(DEMO_BANNER, elem_id="demo-banner")
        with gr.Tab("Review", id="review-tab"):
            review_tab.build(app, demo)
        with gr.Tab("Calibration", id="calibration-tab"):
            calibration_tab.build(app)
        with gr.Tab("Export", id="export-tab"):
            export_tab.build(app)
        with gr.Tab("Train", id="train-tab"):
            train_tab.build(app)
        with gr.Tab("Compare", id="compare-tab"):
            compare_tab.build(app)
    return demo
