"""Errors of the compare stage: a comparison that cannot run as asked, or models in use."""

from __future__ import annotations

from catreview.errors import CatreviewError

BUSY_PHOTO = "Background predictions are still running; compare when they finish."
"""Message of :class:`ModelsBusy` from :meth:`catreview.compare.session.CompareSession.compare_photo`."""


class CompareError(CatreviewError, ValueError):
    """A comparison that cannot run as asked (unknown profile, bad adapter folder, no reviewed
    photos, unknown blind trial); the message says what to change."""


class ModelsBusy(CompareError):
    """Another job (the app's background predictions) is using the models; the message says to
    try again when it finishes. Shown as a plain notice, not a warning
    (:func:`catreview.app.presenters.compare.error_notice`)."""


__all__ = ["BUSY_PHOTO", "CompareError", "ModelsBusy"]
