"""The one error of the training recipes: a round that cannot run."""

from __future__ import annotations

from catreview.errors import CatreviewError


class TrainingError(CatreviewError, RuntimeError):
    """A round that cannot run (bad export, model not found, checkpoint of another config)."""


__all__ = ["TrainingError"]
