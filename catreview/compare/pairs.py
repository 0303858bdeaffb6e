"""Which two models a comparison puts side by side, how they are named, and the blind order.

The two sides are two *profiles* of :attr:`Settings.vlm_profiles` (:func:`default_pair`), or two
adapter versions of one profile (:func:`adapter_variant`). A side is recorded in
``preferences.model_a/model_b`` as ``"<profile>|<model_version>"`` (:func:`model_label`). In
blind mode the sides are shown as "Model 1"/"Model 2" in a per-photo order derived
deterministically from ``(seed, image id, the two profile names)`` (:func:`blind_swapped`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from catreview.compare.errors import CompareError
from catreview.config import DEMO_PROFILE, VLMProfile
from catreview.data.db import AdapterVersion


@dataclass(frozen=True)
class PairChoice:
    """The default pair of profiles and, when the configured pair could not be used, why."""

    a: str
    b: str
    note: str = ""


def default_pair(preferred: Sequence[str], available: Sequence[str]) -> PairChoice:
    """The two profiles to compare by default.

    Args:
        preferred: ``Settings.compare_profiles`` (e.g. ``("7B", "13B")``).
        available: profile names in configuration order (``ModelRegistry.profiles()``).

    Returns:
        ``preferred`` when both are available and differ; else the first two available, with a
        note; with a single profile (the demo), that profile on both sides and a note saying so.

    Raises:
        CompareError: no profile at all.
    """
    names = list(available)
    a, b = preferred
    if a in names and b in names and a != b:
        return PairChoice(a, b)
    if len(names) >= 2:
        return PairChoice(
            names[0],
            names[1],
            f"compare_profiles {tuple(preferred)} are not both configured; comparing the first two "
            f"profiles, {names[0]!r} and {names[1]!r}.",
        )
    if names:
        only = names[0]
        what = "the demo profile (tiny random-weight LLaVA)" if only == DEMO_PROFILE else f"one profile ({only!r})"
        return PairChoice(
            only,
            only,
            f"Only {what} is available, so it is compared with itself. Configure two VLM profiles "
            "([vlm_profiles.7B] and [vlm_profiles.13B] in the TOML, see assets/example_config.toml) "
            "or build an adapter pair to compare two models.",
        )
    raise CompareError("no VLM profile is configured")


def adapter_variant(base_name: str, base: VLMProfile, adapter: str | Path | None) -> tuple[str, VLMProfile]:
    """A profile equal to ``base`` except for its LoRA ``adapter`` folder (``None``: no adapter).

    Returns:
        ``(name, profile)``; the name is ``"<base>+<folder name>@<8 hex of the adapter's files>"``
        (``"<base> (no adapter)"`` without one), so two folders with the same name differ.

    Raises:
        CompareError: the folder has no ``adapter_config.json``.
    """
    from catreview.models.vlm.loading import adapter_identity
    from catreview.models.vlm.types import VLMError

    if adapter is None or str(adapter).strip() == "":
        return f"{base_name} (no adapter)", base.model_copy(update={"adapter": None})
    path = Path(adapter).expanduser().resolve()
    try:
        digest = adapter_identity(path)[:8]
    except VLMError as exc:
        raise CompareError(str(exc)) from exc
    return f"{base_name}+{path.name}@{digest}", base.model_copy(update={"adapter": path})


def known_adapters(engine: Engine) -> list[tuple[str, str]]:
    """``(label, folder)`` of the adapters recorded in the ``adapters`` table, newest first."""
    with Session(engine) as s:
        rows = s.exec(select(AdapterVersion).order_by(AdapterVersion.id.desc())).all()  # type: ignore[union-attr]
    return [(f"#{r.id} {Path(r.path).name}{' (active)' if r.active else ''} — {r.base_model}", r.path) for r in rows]


def blind_swapped(image_id: int, name_a: str, name_b: str, seed: int = 0) -> bool:
    """Whether side B is shown as "Model 1" for this photo (deterministic, ~50 % of photos).

    Derived from sha256 of ``(seed, image_id, name_a, name_b)``, so a reload shows the same order
    and the order is recorded with each preference anyway.
    """
    digest = hashlib.sha256(json.dumps([seed, image_id, name_a, name_b]).encode()).digest()
    return bool(digest[0] & 1)


def model_label(name: str, model_version: str) -> str:
    """How a model is named in ``preferences.model_a/model_b``: ``"<profile>|<model_version>"``."""
    return f"{name}|{model_version}"


def split_model_label(label: str) -> tuple[str, str]:
    """Inverse of :func:`model_label`: ``(profile name, model_version)``."""
    name, _, version = label.rpartition("|")
    return name, version


__all__ = [
    "PairChoice",
    "adapter_variant",
    "blind_swapped",
    "default_pair",
    "known_adapters",
    "model_label",
    "split_model_label",
]
