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
    """The whole app: a banner when demo models are in use, then one tab per concern."""
    from catreview.ui import calibration_tab, review_tab

    with gr.Blocks(title="catreview") as demo:
        gr.Markdown("# catreview — cat-breed review with a VLM in the loop")
        if app.settings.uses_demo_models:
            gr.Markdown(DEMO_BANNER, elem_id="demo-banner")
        with gr.Tab("Review", id="review-tab"):
            review_tab.build(app, demo)
        with gr.Tab("Calibration", id="calibration-tab"):
            calibration_tab.build(app)
        for name, module in _optional_tabs():
            with gr.Tab(name, id=f"{name.lower()}-tab"):
                module.build(app)
    return demo


def _optional_tabs() -> list[tuple[str, object]]:
    """Tabs whose modules exist (export, train, compare), in data-flow order."""
    import importlib

    tabs = []
    for name, mod in (("Export", "export_tab"), ("Train", "train_tab"), ("Compare", "compare_tab")):
        try:
            tabs.append((name, importlib.import_module(f"catreview.ui.{mod}")))
        except ModuleNotFoundError as exc:
            if exc.name != f"catreview.ui.{mod}":
                raise
    return tabs
