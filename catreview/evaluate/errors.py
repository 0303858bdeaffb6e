"""Errors of the evaluate stage: a calibration that cannot be fitted on the reviewed photos."""

from __future__ import annotations

from catreview.errors import CatreviewError


class CalibrationError(CatreviewError, ValueError):
    """Calibration cannot be fitted on these photos (too few reviewed photos, or a temperature
    that the reviews do not determine); the message says what to review or change."""


__all__ = ["CalibrationError"]
