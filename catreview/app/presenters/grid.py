"""Text of the Grid tab (:mod:`catreview.app.ui.grid_tab`): the intro, the page line, the
filter's description and what a bulk assignment did."""

from __future__ import annotations

from collections.abc import Sequence

from catreview.data.db import Review
from catreview.query.grid import BulkReviewError, GridFilter, GridPage

__all__ = ["ANY", "INTRO", "NO_QUEUE", "bulk_failed", "bulk_saved", "describe", "page_line"]

ANY = "(any)"
"""The label filters' value for "no filter"."""
NO_QUEUE = "(no queue)"
"""The queue filter's value for "no queue" (id order)."""
INTRO = (
    "Thumbnails of the photos that match the filters, 48 a page. Click thumbnails (or tick them below) to "
    "select them, then give all selected photos one label: each becomes its own review. **Predicted** is "
    "the active models' prediction; a **queue** shows the photos still waiting for a human decision, in "
    "that queue's order. A cell of the Evaluation tab's confusion matrix opens here as current label x "
    "predicted label."
)


def describe(flt: GridFilter) -> str:
    """The filter in words, e.g. ``"current label Persian, fused prediction Exotic Shorthair"``."""
    parts = []
    if flt.label is not None:
        parts.append(f"current label {flt.label}")
    if flt.predicted is not None:
        parts.append(f"{flt.predicted_by} prediction {flt.predicted}")
    if flt.queue is not None:
        parts.append(f"queue {flt.queue}")
    return ", ".join(parts) or "every photo"


def page_line(page: GridPage, page_number: int) -> str:
    """``"Page 2: 48 photos (every photo); more on the next page."``"""
    n = len(page.items)
    if n == 0:
        return f"No photos match ({describe(page.filter)})." if page_number == 1 else "No more photos."
    more = "more on the next page." if page.next_after is not None else "last page."
    return f"Page {page_number}: {n} photo{'s' if n != 1 else ''} ({describe(page.filter)}); {more}"


def bulk_saved(reviews: Sequence[Review], label: str) -> str:
    """``"Saved 3 reviews: Persian on #4, #7, #9."``"""
    ids = ", ".join(f"#{r.image_id}" for r in reviews)
    return f"Saved {len(reviews)} review{'s' if len(reviews) != 1 else ''}: {label} on {ids}."


def bulk_failed(exc: BulkReviewError, label: str) -> str:
    """What was saved and, one line each, why the other photos were not."""
    head = bulk_saved(exc.saved, label) if exc.saved else "Nothing saved."
    lines = [f"- #{image_id}: {reason}" for image_id, reason in exc.failed]
    return "\n".join([f"{head} Not saved ({len(exc.failed)}):", *lines])
