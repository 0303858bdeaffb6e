"""Text of the Export tab: the intro and the notices after an export (or a refused one).

Made from :class:`~catreview.export.dataset.ExportSummary`; :mod:`catreview.app.ui.export_tab` lays
it out. (The dataset card inside an export is data of the export: :mod:`catreview.export.card`.)
"""

from __future__ import annotations

from catreview.export.dataset import ExportSummary

__all__ = ["INTRO", "bad_image_size", "export_failed", "summary_text"]

INTRO = (
    "Exports every photo whose latest review names a breed: stratified 80/10/10 split by breed "
    "(sticky across exports), resized images, LLaVA JSONL conversations, TRL/LLaMA-Factory "
    "`messages`, a manifest and a dataset card. Each record is checked against the active VLM's "
    "processor and chat template first."
)
"""The tab's first paragraph (Markdown)."""


def export_failed(reason: object) -> str:
    """The one-line notice for an export that was refused or failed (nothing was written)."""
    return f"Export failed, nothing written: {reason}"


def bad_image_size(value: float | None) -> str:
    """:func:`export_failed` for an image size that is not a positive whole number of pixels."""
    return export_failed(f"image size must be a positive whole number of pixels (e.g. 336), got {value}")


def summary_text(summary: ExportSummary) -> str:
    """The summary box after an export: :meth:`ExportSummary.lines`, one per line."""
    return "\n".join(summary.lines())
