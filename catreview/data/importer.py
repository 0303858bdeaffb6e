"""Importing a folder of photos (and optionally their existing labels) into the database.

Each photo is recorded once by content hash; re-importing is idempotent. Files that fail to
decode become rows with an ``error`` reason, never stop the import. Existing labels (CSV or
folder names) are recorded as reviews by the annotator ``import``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session

from catreview.data import counts
from catreview.data.db import ImageRecord, image_by_sha
from catreview.data.images import ImageDecodeError, iter_image_files, load_rgb
from catreview.data.labels import BreedVocabulary
from catreview.data.reviews import latest_review, record_review
from catreview.files import sha256_file

IMPORT_ANNOTATOR = "import"
Progress = Callable[[int, int], None]


@dataclass
class ImportSummary:
    """What an import did. Lists hold human-readable entries (paths relative to the root)."""

    scanned: int = 0
    added: int = 0  # new photo rows, unreadable ones included
    added_unreadable: int = 0
    already_present: int = 0  # content already in the database before this import
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, same content as)
    labels_recorded: int = 0
    labels_unchanged: int = 0  # the same label was already recorded
    labels_kept_human: int = 0  # a person's review exists; an import never overrides it
    unknown_labels: list[tuple[str, str]] = field(default_factory=list)  # (path, label)
    missing_files: list[str] = field(default_factory=list)  # label rows whose file is absent
    duplicate_label_rows: list[str] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # failed before, decode now (e.g. pillow-heif installed)
    moved: list[str] = field(default_factory=list)  # known content whose stored path no longer exists

    def lines(self) -> list[str]:
        """The summary as lines for a terminal or the UI."""
        unreadable = f" ({self.added_unreadable} of them unreadable)" if self.added_unreadable else ""
        out = [
            f"scanned {self.scanned} files: {self.added} new{unreadable}, {self.already_present} already in the "
            f"database, {len(self.duplicates)} copies of another file here; {len(self.failed)} unreadable in all"
        ]
        if self.recovered:
            out.append(
                f"  {len(self.recovered)} photos that failed before are readable now: {', '.join(self.recovered[:5])}"
            )
        if self.moved:
            out.append(f"  {len(self.moved)} known photos found at a new path (old path gone), path updated")
        out += [f"  failed: {p}: {r}" for p, r in self.failed]
        out += [f"  duplicate: {p} has the same content as {q}" for p, q in self.duplicates]
        if (
            self.labels_recorded
            or self.labels_unchanged
            or self.labels_kept_human
            or self.unknown_labels
            or self.missing_files
            or self.duplicate_label_rows
        ):
            out.append(
                f"labels recorded as reviews: {self.labels_recorded}; already recorded: {self.labels_unchanged}; "
                f"left alone because a person reviewed the photo: {self.labels_kept_human}"
            )
            out += [f"  unknown label: {p}: {lab!r}" for p, lab in self.unknown_labels]
            out += [f"  label row for a missing file: {p}" for p in self.missing_files]
            out += [f"  duplicate label row: {p}" for p in self.duplicate_label_rows]
        return out


def read_labels_csv(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """Read ``path,label`` rows (a ``breed`` column is accepted for ``label``).

    Returns ``({relative path: label}, duplicate_rows)``; a path listed twice keeps its first
    label and is reported (with both labels when they differ).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file lacks a ``path`` or ``label``/``breed`` column.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        label_col = "label" if "label" in cols else "breed" if "breed" in cols else None
        if "path" not in cols or label_col is None:
            raise ValueError(f"{path}: expected columns 'path,label' or 'path,breed' (found {sorted(cols)})")
        labels: dict[str, str] = {}
        dupes: list[str] = []
        for row in reader:
            rel = Path(row["path"].strip()).as_posix()
            if rel in labels:
                other = row[label_col].strip()
                dupes.append(
                    rel if other == labels[rel] else f"{rel} (labels {labels[rel]!r} and {other!r}; the first is kept)"
                )
                continue
            labels[rel] = row[label_col].strip()
    return labels, dupes


def import_folder(
    engine: Engine,
    root: str | Path,
    *,
    vocabulary: BreedVocabulary,
    labels_csv: str | Path | None = None,
    labels_from_folders: bool = False,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import every photo below ``root``; optionally record existing labels as reviews.

    Each photo is committed in its own transaction, so an interruption keeps what was done and
    leaves no partial row. Raises ``NotADirectoryError`` for a missing root, ``ValueError`` for
    a malformed labels CSV, ``ValueError`` when both label sources are given.
    """
    if labels_csv and labels_from_folders:
        raise ValueError("give either --labels FILE.csv or --labels-from-folders, not both")
    root = Path(root).resolve()
    files = list(iter_image_files(root))
    summary = ImportSummary(scanned=len(files))
    labels: dict[str, str] = {}
    if labels_csv:
        labels, summary.duplicate_label_rows = read_labels_csv(labels_csv)
        present = {p.relative_to(root).as_posix() for p in files}
        summary.missing_files = sorted(set(labels) - present)
    seen: dict[str, str] = {}
    with Session(engine) as session:
        for i, path in enumerate(files):
            rel = path.relative_to(root).as_posix()
            sha = sha256_file(path)
            twin = seen.get(sha)
            if twin is not None:
                summary.duplicates.append((rel, twin))
            seen.setdefault(sha, rel)
            row, created = get_or_create_image(session, path, sha)
            if created:
                summary.added += 1
                if row.error is not None:
                    summary.added_unreadable += 1
            elif twin is None:  # a copy of a file met earlier in this folder is counted as a duplicate only
                summary.already_present += 1
                change = refresh_image_row(session, row, path)
                if change == "recovered":
                    summary.recovered.append(rel)
                elif change == "moved":
                    summary.moved.append(rel)
            if row.error is not None:
                summary.failed.append((rel, row.error))
            elif row.id not in summary.image_ids:
                summary.image_ids.append(row.id)  # type: ignore[arg-type]
            label = (
                labels.get(rel)
                if labels_csv
                else (path.parent.name if labels_from_folders and path.parent != root else None)
            )
            if label is not None and row.error is None:
                _record_import_label(session, row.id, rel, label, vocabulary, summary)  # type: ignore[arg-type]
            if progress:
                progress(i + 1, len(files))
    return summary


def get_or_create_image(session: Session, path: Path, sha: str) -> tuple[ImageRecord, bool]:
    """The image row for content hash ``sha``, created (decoded, committed) if absent.

    Returns ``(row, created)``. A file that fails to decode becomes a row with ``error`` set.
    """
    row = image_by_sha(session, sha)
    if row is not None:
        return row, False
    row = new_image_row(path, sha)
    session.add(row)
    counts.bump(session, photos=int(row.error is None), failed=int(row.error is not None))
    session.commit()
    session.refresh(row)
    return row, True


def refresh_image_row(session: Session, row: ImageRecord, path: Path) -> str | None:
    """Bring a known photo's row up to date with the same content found at ``path``.

    * A row whose decode failed is decoded again (the bytes are the same, but the decoder may
      have changed, e.g. pillow-heif installed since): on success its error is cleared, its size
      set and its path updated -> ``"recovered"``.
    * A row whose stored path no longer exists points to ``path`` from now on -> ``"moved"``.

    Reviews and predictions are keyed by the row id and content hash, so they are kept.

    Returns:
        ``"recovered"``, ``"moved"`` or ``None`` (nothing changed); changes are committed.
    """
    if row.error is not None:
        fresh = new_image_row(path, row.sha256)
        if fresh.error is None:
            row.path, row.width, row.height, row.error = str(path), fresh.width, fresh.height, None
            session.add(row)
            counts.bump(session, photos=1, failed=-1)
            session.commit()
            return "recovered"
        return None
    if row.path != str(path) and not Path(row.path).exists():
        row.path = str(path)
        session.add(row)
        session.commit()
        return "moved"
    return None


def new_image_row(path: Path, sha: str) -> ImageRecord:
    """An uncommitted image row for ``path``: size, and width/height or the decode error."""
    try:
        img = load_rgb(path)
        width, height, error = img.width, img.height, None
    except ImageDecodeError as exc:
        width, height, error = None, None, str(exc)
    return ImageRecord(sha256=sha, path=str(path), size=path.stat().st_size, width=width, height=height, error=error)


def _record_import_label(
    session: Session, image_id: int, rel: str, label: str, vocabulary: BreedVocabulary, summary: ImportSummary
) -> None:
    if label not in vocabulary:
        summary.unknown_labels.append((rel, label))
        return
    canonical = vocabulary.canonical(label)
    prev = latest_review(session, image_id)
    if prev is not None and prev.source != "import":
        summary.labels_kept_human += 1  # never let an import override a human decision
        return
    if prev is not None and prev.label == canonical:
        summary.labels_unchanged += 1  # idempotent
        return
    record_review(session, image_id, canonical, IMPORT_ANNOTATOR, vocabulary=vocabulary, source="import")
    summary.labels_recorded += 1
