"""Command-line flags for every :class:`~catreview.adapters.train_config.TrainConfig` field.

Built from ``TrainConfig.model_fields`` (a field ``grad_accum`` is the flag ``--grad-accum``), so
``python -m training`` and ``python -m catreview train`` list every option without a hand-written
list; the values are checked by the pydantic model itself.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from catreview.adapters.train_config import TrainConfig

#: Fields that are not command-line flags (free-form notes stored with the config).
_NOT_FLAGS = ("extra",)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """``(base type, optional)`` of a field annotation (``int | None`` -> ``(int, True)``)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


class _NoneValue:
    """Marker for an optional flag given as ``none`` (argparse's ``None`` means "not given")."""

    def __repr__(self) -> str:
        return "none"


NONE_VALUE = _NoneValue()


def _optional(tp: Any) -> Any:
    def convert(text: str) -> Any:
        return NONE_VALUE if text.lower() == "none" else tp(text)

    convert.__name__ = tp.__name__
    return convert


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`TrainConfig` field (default ``None`` = keep the model's default).

    ``bool`` fields become ``--name/--no-name``; ``Literal`` fields get ``choices``; optional
    numbers accept ``none``. Values are checked by :class:`TrainConfig` itself.
    """
    group = parser.add_argument_group("training hyper-parameters (see catreview.adapters.train_config.TrainConfig)")
    for name, info in TrainConfig.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        tp, optional = _scalar_type(info.annotation)
        help_text = f"default {info.default}"
        if tp is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(tp) is Literal:
            group.add_argument(_flag(name), choices=typing.get_args(tp), default=None, help=help_text)
        else:
            conv = _optional(tp) if optional else tp
            group.add_argument(_flag(name), type=conv, default=None, metavar=tp.__name__.upper(), help=help_text)


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """:class:`TrainConfig` from ``base`` (default: the defaults) with every flag that was given.

    An optional field given as ``none`` is set to ``None``.

    Raises:
        catreview.adapters.validation.InvalidConfigError: a value out of range.
    """
    changes: dict[str, Any] = {}
    for name in TrainConfig.model_fields:
        if name in _NOT_FLAGS or not hasattr(args, name):
            continue
        value = getattr(args, name)
        if value is NONE_VALUE:
            changes[name] = None
        elif value is not None:
            changes[name] = value
    return (base or TrainConfig()).replace(**changes)


__all__ = ["NONE_VALUE", "add_config_arguments", "config_from_args"]
