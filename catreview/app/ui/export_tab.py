"""Export tab: the reviewed photos as a curated, versioned dataset, downloadable as a zip.

An export carries every annotator's name and notes, so it needs the ``export`` action (admins);
each one is recorded in the audit log under the caller's name."""

from __future__ import annotations

from datetime import UTC, datetime

import gradio as gr

from catreview.app.auth import Caller, Guards
from catreview.app.core import ReviewApp
from catreview.app.presenters import export as text
from catreview.app.public_errors import redact
from catreview.data.accounts import Action
from catreview.errors import CatreviewError


def build(app: ReviewApp, guards: Guards) -> None:
    """Lay out the Export tab; its event is guarded by ``guards`` (``export``)."""
    gr.Markdown(text.INTRO)
    with gr.Row():
        seed = gr.Number(0, label="Split seed", precision=0, elem_id="export-seed")
        size = gr.Number(336, label="Image size (shortest side, px)", precision=0, elem_id="export-size")
        cap = gr.Number(0, label="Cap per breed (0 = no cap)", precision=0, minimum=0, elem_id="export-cap")
    with gr.Row():
        oversample = gr.Checkbox(False, label="Oversample minority breeds (train only)", elem_id="export-oversample")
        resplit = gr.Checkbox(False, label="Re-split (forget sticky splits)", elem_id="export-resplit")
    go = gr.Button("Export dataset", variant="primary", elem_id="export-run")
    summary = gr.Textbox(label="Summary", lines=8, interactive=False, elem_id="export-summary")
    download = gr.File(label="Download (zip)", elem_id="export-download")

    def run(
        seed_v: float | None,
        size_v: float | None,
        cap_v: float | None,
        over: bool,
        re: bool,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 -- Gradio injects its tracker through this default
        who: Caller | None = None,
    ) -> tuple[str, str | None]:
        """Export with the tab's options as ``who`` (the guard passes the caller); returns
        ``(summary text, zip path or None)``.

        ``size_v`` is the shortest side in px (a positive whole number; the export itself needs
        at least 16), ``cap_v`` the most photos per breed (0 or empty: no cap; Gradio refuses a
        negative one before this runs). Bad options and
        failed exports come back as a one-line message and nothing is written.
        """
        if who is None:
            raise gr.Error("an export needs a caller")
        if size_v is None or size_v <= 0 or size_v != int(size_v):
            return text.bad_image_size(size_v), None
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        out = app.settings.data_dir / "exports" / f"export-{stamp}"
        try:
            result, archive = app.export(
                out,
                actor=who.name,
                seed=int(seed_v or 0),
                image_size=int(size_v),
                cap_per_breed=int(cap_v) if cap_v else None,
                oversample_train=over,
                resplit=re,
                progress=lambda d, t: progress((d, t), desc="exporting"),
            )
        except (CatreviewError, ValueError, OSError) as exc:  # ExportError, unknown profile, disk
            return text.export_failed(exc), None
        return redact(text.summary_text(result)), str(archive)  # the zip is served; its folder is not said

    go.click(
        guards(Action.EXPORT, run, with_caller=True),
        inputs=[seed, size, cap, oversample, resplit],
        outputs=[summary, download],
        api_name="export",
    )
