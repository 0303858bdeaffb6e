"""Refuse a LoRA round that cannot work before anything starts, saying what is missing.

A round learns to tell breeds apart, picks its best checkpoint on validation photos and is gated
per breed on test photos, so :class:`catreview.adapters.jobs.TrainJobs` checks the reviews (or
the given export folder) first: training and validation photos of at least :data:`MIN_BREEDS`
breeds. Without enough test photos a round still runs; its version is left for promotion by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy.engine import Engine

from catreview.errors import CatreviewError
from catreview.export.records import ConversationRecord
from catreview.files import iter_jsonl_lines

#: A round learns to tell breeds apart and is gated per breed: fewer reviewed breeds is refused.
MIN_BREEDS = 2


class TrainJobError(CatreviewError, RuntimeError):
    """A round that cannot be started (too few photos or breeds, no exporter, unknown run to resume ...)."""


def _breed_list(counts: dict[str, int]) -> str:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{b} {n}" for b, n in ranked[:5])
    return shown + (f" and {len(ranked) - 5} more" if len(ranked) > 5 else "")


def check_training_data(train: dict[str, int], validation: dict[str, int], *, what: str) -> None:
    """Refuse a round that cannot work, with a message saying what to do.

    Args:
        train, validation: photos per breed in the two splits.
        what: what the counts describe, for the message ("the reviews", "export DIR").

    Raises:
        TrainJobError: no training photos, fewer than :data:`MIN_BREEDS` breeds, or no
            validation photos (a round picks its best checkpoint on them; the gate needs test photos,
            without enough of them a new version is left for promotion by hand).
    """
    total = {b: train.get(b, 0) + validation.get(b, 0) for b in {*train, *validation}}
    if not train:
        raise TrainJobError(
            f"Not enough reviewed photos to train: {what} give no training photos. Review some photos first."
        )
    if len(total) < MIN_BREEDS:
        raise TrainJobError(
            f"Not enough reviewed breeds to train: {what} name only {len(total)} breed(s) ({_breed_list(total)} "
            f"photos); a round needs photos of at least {MIN_BREEDS} breeds (it learns to tell breeds apart). "
            "Review photos of other breeds too."
        )
    if not validation:
        raise TrainJobError(
            f"Not enough reviewed photos to train: {what} give {sum(train.values())} training photos but no validation "
            "photo, and a round needs validation photos to pick its best checkpoint. Photos are split "
            "80/10/10 per breed, so a breed's first validation photo comes with its 4th reviewed photo; reviewed so "
            f"far: {_breed_list(total)}. Review more photos."
        )


def check_reviews_for_training(engine: Engine, *, seed: int = 0) -> dict[str, dict[str, int]]:
    """The splits an export of the current reviews would have (:func:`catreview.export.dataset.preview_splits`,
    nothing written), checked with :func:`check_training_data`.

    Raises:
        TrainJobError: too few reviewed photos or breeds (the message says what is missing).
    """
    from catreview.export.dataset import ExportError, preview_splits

    try:
        counts = preview_splits(engine, seed=seed)
    except ExportError:
        raise TrainJobError(
            "Nothing to train on: no photo's latest review names a breed yet. Review some photos first."
        ) from None
    check_training_data(counts["train"], counts["validation"], what="the reviews")
    return counts


def check_export_for_training(export_dir: str | Path) -> None:
    """:func:`check_training_data` on an export folder's ``llava/{train,validation}.jsonl``.

    Raises:
        TrainJobError: not an export folder, or too few photos/breeds in it.
    """
    root = Path(export_dir)
    if not (root / "llava" / "train.jsonl").is_file():
        raise TrainJobError(f"{root} is not an export folder: llava/train.jsonl is missing")
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "validation"):
        c: dict[str, int] = {}
        path = root / "llava" / f"{split}.jsonl"
        for _, line in iter_jsonl_lines(path) if path.is_file() else []:
            if line.strip():
                try:
                    breed = ConversationRecord.parse(json.loads(line)).metadata.breed
                except ValueError:  # json.JSONDecodeError, RecordFormatError
                    continue  # the round reports malformed records with file and line
                c[breed] = c.get(breed, 0) + 1
        counts[split] = c
    check_training_data(counts["train"], counts["validation"], what=f"export {root}")


__all__ = [
    "MIN_BREEDS",
    "TrainJobError",
    "check_export_for_training",
    "check_reviews_for_training",
    "check_training_data",
]
