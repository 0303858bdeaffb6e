"""Breed trait descriptions (``assets/breed_traits.json``) for the answers of exported conversations.

The file holds ``{"classes": {name: {"kind", "display", "traits"}}, "aliases": {spelling: name}}``;
:func:`load_breed_traits` reads and checks it, :class:`TraitTable` looks classes up in any accepted
spelling.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from catreview.config import ASSETS_DIR
from catreview.data.labels import BreedVocabulary, UnknownLabelError, normalise

TRAITS_FILE = ASSETS_DIR / "breed_traits.json"
#: ``kind`` values in ``assets/breed_traits.json``.
KINDS = ("breed", "colour_pattern", "landrace")


@dataclass(frozen=True)
class BreedTraits:
    """One class of ``assets/breed_traits.json``: canonical ``name``, ``kind`` (one of
    :data:`KINDS`), ``display`` (the name used in answer text) and ``traits`` (one paragraph)."""

    name: str
    kind: str
    display: str
    traits: str


class TraitTable:
    """Trait descriptions keyed by class name, with alias lookup.

    Args:
        classes: ``{canonical name: BreedTraits}``.
        aliases: ``{other spelling: canonical name}`` (e.g. the shared photos' folder names).

    Lookup order in :meth:`get`: exact name, the file's aliases, then
    :class:`~catreview.data.labels.BreedVocabulary` matching (case, ``_``/``-`` and the built-in
    alias table such as ``Sphynx`` -> ``Sphynx - Hairless Cat``).
    """

    def __init__(self, classes: Mapping[str, BreedTraits], aliases: Mapping[str, str] | None = None) -> None:
        self.classes = dict(classes)
        self.aliases = {normalise(k): v for k, v in (aliases or {}).items() if v in self.classes}

    @cached_property
    def _vocabulary(self) -> BreedVocabulary:
        return BreedVocabulary(list(self.classes))

    def get(self, label: str) -> BreedTraits | None:
        """Traits for ``label`` in any accepted spelling, or ``None`` when unknown."""
        if label in self.classes:
            return self.classes[label]
        alias = self.aliases.get(normalise(label))
        if alias is not None:
            return self.classes[alias]
        try:
            return self.classes.get(self._vocabulary.canonical(label))
        except UnknownLabelError:
            return None

    def __len__(self) -> int:
        return len(self.classes)


def load_breed_traits(path: str | Path = TRAITS_FILE) -> TraitTable:
    """Read and check a traits file (format of ``assets/breed_traits.json``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, no ``classes`` object, an entry without ``traits`` text, or a
            ``kind`` outside :data:`KINDS`.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    raw = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected an object with a non-empty 'classes' object")
    classes: dict[str, BreedTraits] = {}
    for name, entry in raw.items():
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{path}: class {name!r} has kind {kind!r}; expected one of {KINDS}")
        text = (entry.get("traits") or "").strip()
        if not text:
            raise ValueError(f"{path}: class {name!r} has no traits text")
        classes[name] = BreedTraits(name, kind, (entry.get("display") or name).strip(), text)
    return TraitTable(classes, data.get("aliases"))


__all__ = ["KINDS", "TRAITS_FILE", "BreedTraits", "TraitTable", "load_breed_traits"]
