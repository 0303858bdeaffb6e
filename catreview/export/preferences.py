"""Blind preferences as DPO preference pairs (TRL's ``prompt``/``chosen``/``rejected`` JSONL).

The compare stage stores each blind choice in ``preferences`` with both outputs in display order
(``model_a`` = what was shown as Model 1, ``choice`` a/b/tie). This module reads those rows only
(it does not import :mod:`catreview.compare`): the newest choice of an annotator for a photo and
model pair becomes one pair; ties, and pairs whose chosen and rejected texts match, are left out
and counted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypedDict

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from catreview.data.db import ImageRecord, Preference, get_image
from catreview.files import write_jsonl


class DPOMetadata(TypedDict):
    """Where a DPO pair came from. Model labels are ``"<profile>|<model_version>"``;
    ``created_at`` is ISO 8601."""

    preference_id: int | None
    image_id: int
    sha256: str
    annotator: str
    chosen_model: str
    rejected_model: str
    model_1: str
    model_2: str
    created_at: str


class DPORecord(TypedDict):
    """One line of the preference export: TRL's prompt/chosen/rejected, the photo's path, metadata."""

    prompt: str
    chosen: str
    rejected: str
    image: str
    metadata: DPOMetadata


def _plural(n: int, word: str) -> str:
    # Same wording as catreview.compare.aggregate.plural (this stage may not import catreview.compare).
    return f"{n} {word if n == 1 else word + 's'}"


@dataclass(frozen=True)
class PreferenceExport:
    """What :func:`export_preference_pairs` wrote: pairs, ties left out, superseded choices, and
    pairs left out because chosen == rejected (``identical``)."""

    path: Path
    pairs: int
    ties: int
    superseded: int
    identical: int = 0

    def text(self) -> str:
        """One line saying what was written and what was left out (the CLI and the Compare tab show it)."""
        return (
            f"Wrote {_plural(self.pairs, 'preference pair')} to {self.path}; {_plural(self.ties, 'tie')} left out; "
            f"{_plural(self.identical, 'pair')} with chosen == rejected left out; "
            f"{_plural(self.superseded, 'earlier choice')} superseded by a later one of the same annotator."
        )


def latest_preferences(session: Session) -> tuple[list[Preference], int]:
    """The newest preference per (photo, annotator, unordered model pair); returns ``(rows,
    superseded)`` with rows by id."""
    newest: dict[tuple[int, str, frozenset[str]], Preference] = {}
    rows = session.exec(select(Preference).order_by(Preference.id)).all()  # type: ignore[arg-type]
    for r in rows:
        newest[(r.image_id, r.annotator, frozenset((r.model_a, r.model_b)))] = r
    kept = sorted(newest.values(), key=lambda r: r.id or 0)
    return kept, len(rows) - len(kept)


def preference_pair(pref: Preference, image: ImageRecord) -> DPORecord | None:
    """One DPO record (TRL's prompt/chosen/rejected, plus ``image`` and ``metadata``), or
    ``None`` for a tie.

    ``metadata``: preference id, image id and sha256, annotator, chosen/rejected model labels
    (``"<profile>|<model_version>"``), the display order (``model_1``, ``model_2``), time.

    Raises:
        ValueError: ``pref.choice`` is not a, b or tie.
    """
    if pref.choice == "tie":
        return None
    if pref.choice not in ("a", "b"):
        raise ValueError(f"preference #{pref.id} has choice {pref.choice!r}; expected a, b or tie")
    a_wins = pref.choice == "a"
    return {
        "prompt": pref.prompt,
        "chosen": pref.output_a if a_wins else pref.output_b,
        "rejected": pref.output_b if a_wins else pref.output_a,
        "image": image.path,
        "metadata": {
            "preference_id": pref.id,
            "image_id": pref.image_id,
            "sha256": image.sha256,
            "annotator": pref.annotator,
            "chosen_model": pref.model_a if a_wins else pref.model_b,
            "rejected_model": pref.model_b if a_wins else pref.model_a,
            "model_1": pref.model_a,
            "model_2": pref.model_b,
            "created_at": pref.created_at.isoformat()
            if isinstance(pref.created_at, datetime)
            else str(pref.created_at),
        },
    }


def export_preference_pairs(engine: Engine, path: str | Path) -> PreferenceExport:
    """Write the blind preferences as JSONL, one DPO pair per line (:func:`catreview.files.write_jsonl`:
    written to a temporary sibling and renamed into place; the parent folder is created).

    Only the newest choice of an annotator for a photo and model pair is exported. Ties and pairs
    whose chosen and rejected texts are equal (ignoring surrounding whitespace; e.g. a model
    compared with itself) are left out and counted.
    """
    out = Path(path)
    left_out = {"tie": 0, "identical": 0}

    def records(session: Session, prefs: Sequence[Preference]) -> Iterator[DPORecord]:
        for pref in prefs:
            record = preference_pair(pref, get_image(session, pref.image_id))
            if record is None:
                left_out["tie"] += 1
            elif (record["chosen"] or "").strip() == (record["rejected"] or "").strip():
                left_out["identical"] += 1
            else:
                yield record

    with Session(engine) as s:
        prefs, superseded = latest_preferences(s)
        pairs = write_jsonl(records(s, prefs), out)
    return PreferenceExport(out, pairs, left_out["tie"], superseded, left_out["identical"])


__all__ = [
    "DPOMetadata",
    "DPORecord",
    "PreferenceExport",
    "export_preference_pairs",
    "latest_preferences",
    "preference_pair",
]
