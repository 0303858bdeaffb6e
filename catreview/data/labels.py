"""Breed names: one normalisation and one alias table for every place a label enters the tool.

Labels arrive spelled many ways: folder names with underscores (``Maine_Coon``), other case
(``maine coon``), or short forms of the users' class names (``Sphynx`` for
``Sphynx - Hairless Cat``). :class:`BreedVocabulary` maps all of them onto the canonical class
names of the stage-1 classifier (by default the 67 classes of the users' Petfinder-derived
"Cat Breeds Dataset", ``assets/breeds67.txt``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from catreview.config import ASSETS_DIR
from catreview.errors import CatreviewError

BREEDS67_FILE = ASSETS_DIR / "breeds67.txt"

#: Review outcomes that are not breeds. They are stored as labels of their own.
NOT_A_CAT = "Not a cat"
UNSURE = "Unsure"
SPECIAL_LABELS = (NOT_A_CAT, UNSURE)
#: The VLM's extra candidate meaning "none of the stage-1 candidates".
OTHER = "other"

#: Alternative spellings -> canonical class name of the users' 67 classes. Keys are compared
#: after :func:`normalise`, so case, underscores and hyphens do not matter.
ALIASES: dict[str, str] = {
    "sphynx": "Sphynx - Hairless Cat",
    "sphinx": "Sphynx - Hairless Cat",
    "hairless cat": "Sphynx - Hairless Cat",
    "extra toes cat": "Extra-Toes Cat - Hemingway Polydactyl",
    "hemingway polydactyl": "Extra-Toes Cat - Hemingway Polydactyl",
    "polydactyl": "Extra-Toes Cat - Hemingway Polydactyl",
    "norwegian forest": "Norwegian Forest Cat",
    "domestic shorthair": "Domestic Short Hair",
    "domestic longhair": "Domestic Long Hair",
    "domestic mediumhair": "Domestic Medium Hair",
    "dsh": "Domestic Short Hair",
    "dlh": "Domestic Long Hair",
    "dmh": "Domestic Medium Hair",
    "oriental shorthair": "Oriental Short Hair",
    "oriental longhair": "Oriental Long Hair",
    "ragamuffin cat": "Ragamuffin",
    "tortie": "Tortoiseshell",
    "mau": "Egyptian Mau",
    "not a cat": NOT_A_CAT,
    "not cat": NOT_A_CAT,
    "unsure": UNSURE,
}


class UnknownLabelError(CatreviewError, ValueError):
    """A label that matches no class name and no alias."""


def normalise(name: str) -> str:
    """Normalise a label for matching: case-folded, ``_``/``-`` as spaces, spaces collapsed.

    >>> normalise("Maine_Coon")
    'maine coon'
    >>> normalise("Sphynx - Hairless Cat")
    'sphynx hairless cat'
    """
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", name)).strip().casefold()


def read_label_file(path: str | Path) -> list[str]:
    """Read class names, one per line, blank lines ignored, in logit order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no names or the same name twice.
    """
    names = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"label file {path} holds no class names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"label file {path} names these classes twice: {dupes}")
    return names


class BreedVocabulary:
    """The canonical class names plus the special review labels, with alias matching.

    Args:
        names: canonical class names in the classifier's logit order (length C).
        aliases: extra ``alias -> canonical`` entries (merged over :data:`ALIASES`); aliases
            whose target is not in ``names`` or :data:`SPECIAL_LABELS` are ignored.
    """

    def __init__(self, names: Sequence[str], aliases: dict[str, str] | None = None) -> None:
        self.names: list[str] = list(names)
        self._lookup: dict[str, str] = {}
        known = set(self.names) | set(SPECIAL_LABELS)
        for alias, target in {**ALIASES, **(aliases or {})}.items():
            if target in known:
                self._lookup[normalise(alias)] = target
        for n in [*self.names, *SPECIAL_LABELS]:
            self._lookup[normalise(n)] = n

    @classmethod
    def default(cls) -> BreedVocabulary:
        """The users' 67 classes from ``assets/breeds67.txt``."""
        return cls(read_label_file(BREEDS67_FILE))

    @classmethod
    def from_labels_file(cls, path: str | Path | None) -> BreedVocabulary:
        """The classes of ``path`` (one per line, logit order), or :meth:`default` when ``None``
        (``classifier.labels_file`` in the settings).

        Raises:
            ValueError: as :func:`read_label_file`.
        """
        return cls(read_label_file(path)) if path else cls.default()

    def canonical_or_same(self, label: str) -> str:
        """:meth:`canonical` for a label the vocabulary knows, else ``label`` unchanged (stage-1
        labels of a checkpoint may include classes the vocabulary lacks)."""
        return self.canonical(label) if label in self else label

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, label: object) -> bool:
        return isinstance(label, str) and normalise(label) in self._lookup

    def canonical(self, label: str) -> str:
        """Map any accepted spelling to its canonical name.

        Raises:
            UnknownLabelError: no class name or alias matches; the message suggests close names.
        """
        key = normalise(label)
        if key in self._lookup:
            return self._lookup[key]
        close = [n for n in self.names if key and (key in normalise(n) or normalise(n) in key)]
        hint = f"; did you mean {close[:3]}?" if close else ""
        raise UnknownLabelError(f"unknown breed label {label!r}{hint}")

    def choices(self) -> list[str]:
        """All labels a reviewer may pick: the classes, then the special labels."""
        return [*self.names, *SPECIAL_LABELS]


def is_breed(label: str | None) -> bool:
    """True for a real class label (not ``None``, not a special review label)."""
    return bool(label) and label not in SPECIAL_LABELS
