"""Pydantic configs whose invalid values are reported as one line (:class:`ConfigModel`).

:class:`catreview.adapters.train_config.TrainConfig` and :class:`catreview.adapters.gate.GatePolicy`
are pydantic models: field types, ranges (``Field(ge=...)``) and choices (``Literal``) are
declared once and checked by pydantic. Their values come from people (the Train tab's form, CLI
flags, a JSON file), so a refusal is a :class:`InvalidConfigError` with one line per the rules of
:mod:`catreview.errors` -- ``"rank must be >= 1, got 0"`` -- instead of pydantic's multi-line report.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from catreview.errors import CatreviewError


class InvalidConfigError(CatreviewError, ValueError):
    """A config value outside its type, range or choices; the message names the field."""


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_BOUND_KEYS = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}


def describe_errors(exc: ValidationError) -> str:
    """One line for a pydantic ``ValidationError``: ``"<field> must be >= 1, got 0"``,
    ``"<field> must be one of 'a' or 'b', got 'c'"``, else ``"invalid <field>: <pydantic's
    message> (got <value>)"``; several problems joined by ``"; "``."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "value"
        kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
        if kind in _BOUNDS:
            parts.append(f"{name} must be {_BOUNDS[kind]} {ctx[_BOUND_KEYS[kind]]}, got {value!r}")
        elif kind == "literal_error":
            parts.append(f"{name} must be one of {ctx['expected']}, got {value!r}")
        elif kind == "value_error":
            parts.append(str(err["msg"]).removeprefix("Value error, "))
        elif kind == "extra_forbidden":
            parts.append(f"unknown field {name}")
        else:
            parts.append(f"invalid {name}: {err['msg']} (got {value!r})")
    return "; ".join(parts)


class ConfigModel(BaseModel):
    """A pydantic model whose construction raises :class:`InvalidConfigError` (a ``ValueError``)
    with :func:`describe_errors`' one line instead of a ``ValidationError``."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidConfigError(describe_errors(exc)) from None


__all__ = ["ConfigModel", "InvalidConfigError", "describe_errors"]
