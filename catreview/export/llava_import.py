"""Import back: seed labels in a (fresh) database from a LLaVA JSONL export."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session

from catreview.data.db import image_by_sha
from catreview.data.importer import get_or_create_image  # the importer's single way to make image rows
from catreview.data.labels import BreedVocabulary
from catreview.data.reviews import ReviewError, latest_review, record_review
from catreview.export.conversations import IMPORT_SOURCE
from catreview.export.records import ConversationRecord, check_record, snapshot_from_predictions
from catreview.files import iter_jsonl_lines, sha256_file


@dataclass
class LlavaImportSummary:
    """What :func:`import_llava_jsonl` did. ``errors`` holds ``(line number, reason)``."""

    read: int = 0
    labels_recorded: int = 0
    images_added: int = 0
    unchanged: int = 0
    kept_human_label: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"read {self.read} records: {self.labels_recorded} labels recorded, {self.images_added} new images, "
            f"{self.unchanged} already labelled the same, {self.kept_human_label} kept a human label, "
            f"{len(self.errors)} errors"
        ]
        return out + [f"  line {n}: {why}" for n, why in self.errors]


def _resolve_image(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image path {rel!r} points outside {root}")
    if not path.is_file():
        raise ValueError(f"image file not found: {rel}")
    return path


def import_llava_jsonl(
    engine: Engine,
    jsonl_path: str | Path,
    images_root: str | Path,
    annotator: str = "import",
    *,
    vocabulary: BreedVocabulary | None = None,
) -> LlavaImportSummary:
    """Seed labels from a LLaVA JSONL export (records of :mod:`catreview.export.records`).

    For each record: the photo is found by ``metadata.sha256`` (the original photo, when this
    database has it), else by the sha256 of ``images_root / image``, else added as a new image
    (through the importer's image-row path: decoded with ``load_rgb``, failures recorded). Then
    ``metadata.breed`` is recorded as a review with source ``"import"``, carrying the record's
    ``predictions_at_review`` back as the model snapshot and the original annotator/review in
    the note. An image whose latest review is a human decision (source other than import) is
    never relabelled; the same label twice is recorded once. Each record commits on its own, so
    an interruption keeps what was done.

    Raises:
        FileNotFoundError: ``jsonl_path`` or ``images_root`` is missing. Problems with single
        records are collected in ``errors`` instead.
    """
    vocab = vocabulary or BreedVocabulary.default()
    root = Path(images_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"images root not found: {root}")
    src = Path(jsonl_path)
    summary = LlavaImportSummary()
    with Session(engine) as session:
        for line_no, line in iter_jsonl_lines(src):
            if not line.strip():
                continue
            summary.read += 1
            try:
                rec = ConversationRecord.parse(json.loads(line))
                problems = check_record(rec)
                if problems:
                    raise ValueError("; ".join(problems))
                meta = rec.metadata
                if meta.breed not in vocab:
                    raise ValueError(f"unknown breed {meta.breed!r}")
                label = vocab.canonical(meta.breed)
                path = _resolve_image(root, rec.image)
                row = image_by_sha(session, meta.sha256) if meta.sha256 is not None else None
                if row is None:
                    sha = sha256_file(path)
                    row, created = get_or_create_image(session, path, sha)
                    summary.images_added += int(created)
                if row.error is not None:
                    raise ValueError(f"image {rec.image} could not be decoded: {row.error}")
                assert row.id is not None  # a stored row has its id
                prev = latest_review(session, row.id)
                if prev is not None and prev.label == label:
                    summary.unchanged += 1
                    continue
                if prev is not None and prev.source != IMPORT_SOURCE:
                    summary.kept_human_label += 1
                    continue
                note = (
                    f"imported from {src.name} record {rec.id}; "
                    f"original annotator {meta.annotator!r}, review {meta.review!r}"
                )
                if meta.note:
                    note += f"; note: {meta.note}"
                record_review(
                    session,
                    row.id,
                    label,
                    annotator,
                    vocabulary=vocab,
                    source=IMPORT_SOURCE,
                    note=note,
                    model_snapshot=snapshot_from_predictions(meta.predictions_at_review),
                )
                summary.labels_recorded += 1
            except (ValueError, OSError, ReviewError) as exc:  # RecordFormatError is a ValueError
                session.rollback()
                summary.errors.append((line_no, str(exc)))
    return summary


__all__ = ["LlavaImportSummary", "import_llava_jsonl"]
