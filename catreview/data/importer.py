"""Importing a folder of photos (and optionally their existing labels) into the database.

Each photo is recorded once by content hash; re-importing is idempotent. Files that fail to
decode become rows with an ``error`` reason, never stop the import; files and folders that
cannot be read at all (no permission, vanished, I/O error) are reported and get no row. Existing
labels (CSV or folder names) are recorded as reviews by the annotator ``import``.

How it scales (the users' collection is about 127,000 photos):

- Hashing and decoding run in a process pool (:func:`catreview.data.images.scan_file`, ``spawn``
  start method: the parent may hold torch and threads, and workers import only Pillow, NumPy and
  hashlib); results come back in file order.
- Rows are written :data:`BATCH_SIZE` photos per transaction: image rows by
  ``INSERT ... ON CONFLICT (sha256) DO NOTHING`` (race-free get-or-create, so parallel imports of
  one folder never collide), their labels as compare-and-set reviews, and the running totals
  (:mod:`catreview.data.counts`), all in that one transaction. A kill at any point leaves whole
  batches only; importing again finishes the job.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import ColumnElement, update
from sqlalchemy import select as sa_select  # sqlmodel's select types at most 4 columns
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, col

from catreview.data import counts
from catreview.data.db import ImageRecord, Review, image_by_sha, insert_ignoring_conflicts, utcnow
from catreview.data.images import (
    FileScan,
    decoder_limits,
    init_scan_worker,
    iter_image_files,
    read_error_reason,
    scan_file,
)
from catreview.data.labels import BreedVocabulary
from catreview.data.reviews import MAX_ATTEMPTS, append_first_reviews, append_review
from catreview.errors import CatreviewError

IMPORT_ANNOTATOR = "import"
IMPORT_SOURCE = "import"
Progress = Callable[[int, int], None]

BATCH_SIZE = 256
"""Photos per transaction: large enough that the per-commit cost (an fsync in SQLite) is
amortised, small enough that a transaction holds the write lock for tens of milliseconds, so
parallel importers and the app's saves interleave."""

POOL_MIN_FILES = 64
"""With ``workers=None``, imports of fewer files run inline: starting worker processes (about
0.3 s each with ``spawn``) costs more than hashing and decoding a few dozen photos."""

BATCH_ATTEMPTS = 5
"""Tries of one batch transaction that lost a race the database detected (a PostgreSQL deadlock
or serialization failure, a SQLite write lock not granted within the busy timeout, a unique
key taken meanwhile); the batch is rolled back each time, so nothing is written twice."""


@dataclass
class ImportSummary:
    """What an import did. Lists hold human-readable entries (paths relative to the root)."""

    scanned: int = 0
    added: int = 0  # new photo rows, unreadable ones included
    added_unreadable: int = 0
    already_present: int = 0  # content already in the database before this import
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason); folders end with "/"
    not_stored: int = 0  # entries of ``failed`` that could not be read at all (files, folders): no row
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, same content as)
    labels_recorded: int = 0
    labels_unchanged: int = 0  # the same label was already recorded
    labels_kept_human: int = 0  # a person's review exists; an import never overrides it
    unknown_labels: list[tuple[str, str]] = field(default_factory=list)  # (path, label)
    label_conflicts: list[tuple[str, str]] = field(default_factory=list)  # (path, its label vs its copy's)
    missing_files: list[str] = field(default_factory=list)  # label rows whose file is absent
    duplicate_label_rows: list[str] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # failed before, decode now (e.g. pillow-heif installed)
    moved: list[str] = field(default_factory=list)  # known content whose stored path no longer exists

    def lines(self) -> list[str]:
        """The summary as lines for a terminal or the UI."""
        unreadable = f" ({self.added_unreadable} of them unreadable)" if self.added_unreadable else ""
        not_read = (
            f" ({self.not_stored} of them could not be read at all and are not stored: fix them and import again)"
            if self.not_stored
            else ""
        )
        out = [
            f"scanned {self.scanned} files: {self.added} new{unreadable}, {self.already_present} already in the "
            f"database, {len(self.duplicates)} copies of another file here; {len(self.failed)} unreadable in all"
            + not_read
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
            or self.label_conflicts
            or self.missing_files
            or self.duplicate_label_rows
        ):
            out.append(
                f"labels recorded as reviews: {self.labels_recorded}; already recorded: {self.labels_unchanged}; "
                f"left alone because a person reviewed the photo: {self.labels_kept_human}"
            )
            out += [f"  unknown label: {p}: {lab!r}" for p, lab in self.unknown_labels]
            out += [f"  conflicting label (the first file's is kept): {p}: {why}" for p, why in self.label_conflicts]
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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset``
    narrow; ``os.process_cpu_count`` on Python >= 3.13), at least 1."""
    count = getattr(os, "process_cpu_count", None)
    if count is not None:
        return max(1, count() or 1)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextmanager
def scanned(paths: list[str], workers: int) -> Iterator[Iterator[FileScan]]:
    """:func:`~catreview.data.images.scan_file` of each path, in order: inline for
    ``workers <= 1`` (or when workers cannot start: a main program read from stdin), else in a pool of ``workers`` processes (``spawn``; each worker adopts this
    process's decoder limits and exits when this process dies, :func:`init_scan_worker`).
    Leaving the block early cancels the work not started yet.

    A ``spawn`` worker imports :mod:`catreview.data.images` (about 0.1 s) and, as ``spawn``
    does, the parent's main script if it is a file (``python -m catreview`` and ``app.py`` are
    light): a script that calls the importer keeps heavy imports out of its top level."""
    if workers <= 1 or len(paths) <= 1 or not _spawn_can_start():
        yield map(scan_file, paths)
        return
    workers = min(workers, len(paths))
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_scan_worker,
        initargs=(decoder_limits(), os.getpid()),
    )
    try:
        # chunks of a few dozen files: small enough to keep every worker busy to the end and the
        # first batch early, large enough that the pickling round trips do not matter
        yield pool.map(scan_file, paths, chunksize=max(1, min(32, len(paths) // (workers * 8))))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _spawn_can_start() -> bool:
    """Whether ``spawn`` workers can start: each re-imports the parent's main script from its
    file, which fails for a program read from stdin (``__file__`` is ``"<stdin>"``)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


@dataclass
class _Occurrence:
    """One file of the walk, as scanned (read or not)."""

    rel: str
    scan: FileScan
    twin: str | None  # the earlier path in this import with the same content
    label: str | None


class ImportConflictError(CatreviewError):
    """A batch kept losing races with other writers (every attempt rolled back); import again."""


@dataclass
class _Head:
    """An image row as the batch sees it: its stored state and its newest review."""

    id: int
    path: str
    error: str | None
    review_id: int | None
    review_label: str | None
    review_source: str | None


def import_folder(
    engine: Engine,
    root: str | Path,
    *,
    vocabulary: BreedVocabulary,
    labels_csv: str | Path | None = None,
    labels_from_folders: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
    batch_size: int = BATCH_SIZE,
) -> ImportSummary:
    """Import every photo below ``root``; optionally record existing labels as reviews.

    Rules: one row per content hash (a second file with the same bytes is reported as a copy);
    a known photo is counted as already present, its failed decode retried (``recovered``) and a
    stored path that no longer exists replaced (``moved``); a label becomes an ``import`` review
    unless the photo's newest review is a person's (kept) or has that label already (unchanged);
    a photo gets at most one label per import, its first labelled file's (a copy labelled
    otherwise is reported in ``label_conflicts``); unknown labels, label rows for absent files
    and duplicate label rows are reported. Files
    that cannot be read and folders that cannot be listed are reported in ``failed`` (counted in
    ``not_stored``) and the import goes on.

    Safe from many processes: each batch of ``batch_size`` photos is one transaction (image rows
    inserted on conflict do nothing, their reviews by compare-and-set on the photo's newest
    review, the running totals), so parallel imports of one folder store every photo once and
    one import review per photo, and an interruption leaves only whole batches.

    Args:
        workers: processes hashing and decoding; ``None``: :func:`usable_cores` (inline below
            :data:`POOL_MIN_FILES` files); ``1``: inline, in this process.
        progress: called as ``progress(done, total)`` files after each committed batch (and
            once with ``done=0`` after the folder walk).

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        FileNotFoundError: ``labels_csv`` does not exist.
        ValueError: a malformed labels CSV, both label sources given, ``workers`` or
            ``batch_size`` below 1.
    """
    if labels_csv and labels_from_folders:
        raise ValueError("give either --labels FILE.csv or --labels-from-folders, not both")
    if (workers is not None and workers < 1) or batch_size < 1:
        raise ValueError(f"workers and batch_size must be at least 1 (got {workers} and {batch_size})")
    root = Path(root).resolve()
    summary = ImportSummary()

    def folder_error(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else root
        rel = where.relative_to(root).as_posix() if where.is_relative_to(root) else str(where)
        reason = read_error_reason(where, exc, what="folder")
        summary.failed.append(("./" if rel == "." else rel + "/", f"folder not imported: {reason}"))
        summary.not_stored += 1

    files = list(iter_image_files(root, on_error=folder_error))
    summary.scanned = len(files)
    rels = [p.relative_to(root).as_posix() for p in files]
    labels: dict[str, str] = {}
    if labels_csv:
        labels, summary.duplicate_label_rows = read_labels_csv(labels_csv)
        summary.missing_files = sorted(set(labels) - set(rels))
    if workers is None:
        workers = usable_cores() if len(files) >= POOL_MIN_FILES else 1

    def label_of(path: Path, rel: str) -> str | None:
        if labels_csv:
            return labels.get(rel)
        return path.parent.name if labels_from_folders and path.parent != root else None

    writer = _BatchWriter(engine, vocabulary, summary)
    if progress:
        progress(0, len(files))
    done = 0
    pending: list[_Occurrence] = []
    with scanned([str(p) for p in files], workers) as results:
        for path, rel, scan in zip(files, rels, results):
            done += 1
            twin = writer.seen.get(scan.sha256) if scan.sha256 is not None else None
            pending.append(_Occurrence(rel, scan, twin, label_of(path, rel)))
            if scan.sha256 is not None:
                writer.seen.setdefault(scan.sha256, rel)
            if len(pending) >= batch_size or done == len(files):
                writer.write(pending)
                pending = []
                if progress:
                    progress(done, len(files))
    return summary


class _BatchWriter:
    """Writes batches of read files for one import (:meth:`write`), adding to its summary only
    what a committed transaction did."""

    def __init__(self, engine: Engine, vocabulary: BreedVocabulary, summary: ImportSummary) -> None:
        self.engine = engine
        self.vocabulary = vocabulary
        self.summary = summary
        self.seen: dict[str, str] = {}  # sha256 -> first path of this import with that content
        self.decided: dict[int, tuple[str, str, str]] = {}  # image id -> (label, first path, outcome), committed
        self._batch_decided: dict[int, tuple[str, str, str]] = {}
        self._ids: set[int] = set()

    def write(self, batch: list[_Occurrence]) -> None:
        """Store one batch in one transaction, retried (from scratch) when the database reports
        a lost race (:data:`BATCH_ATTEMPTS`).

        Raises:
            sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, ImportConflictError:
                still failing after the last attempt (nothing of the batch is stored).
        """
        if not batch:
            return
        for attempt in range(BATCH_ATTEMPTS):
            part = ImportSummary()
            self._batch_decided = {}
            try:
                with Session(self.engine) as session:
                    self._write(session, batch, part)
                    session.commit()
            except (IntegrityError, OperationalError, _HeadKeptMoving):
                if attempt == BATCH_ATTEMPTS - 1:
                    raise
                continue
            self._merge(part)
            self.decided.update(self._batch_decided)
            return

    def _merge(self, part: ImportSummary) -> None:
        s = self.summary
        s.added += part.added
        s.added_unreadable += part.added_unreadable
        s.already_present += part.already_present
        s.failed += part.failed
        s.not_stored += part.not_stored
        s.duplicates += part.duplicates
        s.labels_recorded += part.labels_recorded
        s.labels_unchanged += part.labels_unchanged
        s.labels_kept_human += part.labels_kept_human
        s.unknown_labels += part.unknown_labels
        s.label_conflicts += part.label_conflicts
        s.recovered += part.recovered
        s.moved += part.moved
        for image_id in part.image_ids:
            if image_id not in self._ids:
                self._ids.add(image_id)
                s.image_ids.append(image_id)

    def _write(self, session: Session, batch: list[_Occurrence], part: ImportSummary) -> None:
        # 1. image rows: the first file of each content in the batch, in walk order (ids follow the
        #    folder order, which is the review order; two imports of overlapping folders meet the
        #    shared files in the same relative order, and a deadlock PostgreSQL detects is retried).
        #    The INSERT is the transaction's first statement: SQLite takes its write lock here.
        first: dict[str, _Occurrence] = {}
        for occ in batch:
            if occ.scan.sha256 is not None:
                first.setdefault(occ.scan.sha256, occ)
        now = utcnow()
        rows = [
            {
                "sha256": sha,
                "path": occ.scan.path,
                "size": occ.scan.size,
                "width": occ.scan.width,
                "height": occ.scan.height,
                "error": occ.scan.error,
                "phash": occ.scan.phash,  # from the scan's own decode (catreview.data.phash)
                "imported_at": now,
            }
            for sha, occ in first.items()
        ]
        created: set[str] = set()
        if rows:
            insert = insert_ignoring_conflicts(session, ImageRecord, ["sha256"]).returning(col(ImageRecord.sha256))
            created = set(session.exec(insert, params=rows).scalars())
        heads = self._heads(session, col(ImageRecord.sha256).in_(list(first))) if first else {}
        # 2. each file in walk order: counts, refresh of known rows; then the labels
        photos = failed = 0
        labelled: list[tuple[_Occurrence, _Head]] = []
        for occ in batch:
            sha = occ.scan.sha256
            if sha is None:  # not read: reported, no row
                part.failed.append((occ.rel, occ.scan.read_error or "the file could not be read"))
                part.not_stored += 1
                continue
            head = heads[sha]
            if occ.twin is not None:
                part.duplicates.append((occ.rel, occ.twin))
            if sha in created and first[sha] is occ:
                part.added += 1
                if head.error is not None:
                    part.added_unreadable += 1
                    failed += 1
                else:
                    photos += 1
            elif occ.twin is None:  # a copy of a file met earlier in this folder is counted as a duplicate only
                part.already_present += 1
                change = self._refresh(session, head, occ.scan)
                if change == "recovered":
                    part.recovered.append(occ.rel)
                    photos, failed = photos + 1, failed - 1
                elif change == "moved":
                    part.moved.append(occ.rel)
            if head.error is not None:
                part.failed.append((occ.rel, head.error))
                continue
            part.image_ids.append(head.id)
            if occ.label is not None:
                labelled.append((occ, head))
        self._labels(session, labelled, part)
        counts.bump(session, photos=photos, failed=failed)

    @staticmethod
    def _heads(session: Session, where: ColumnElement[bool]) -> dict[str, _Head]:
        """``{sha256: _Head}`` of the image rows matching ``where``, with their newest review (one query)."""
        q = (
            sa_select(
                col(ImageRecord.sha256),
                col(ImageRecord.id),
                col(ImageRecord.path),
                col(ImageRecord.error),
                col(ImageRecord.current_review_id),
                col(Review.label),
                col(Review.source),
            )
            .outerjoin(Review, col(Review.id) == col(ImageRecord.current_review_id))
            .where(where)
        )
        heads: dict[str, _Head] = {}
        for sha, image_id, path, err, rid, lab, src in session.connection().execute(q):
            assert image_id is not None  # a stored row
            heads[sha] = _Head(image_id, path, err, rid, lab, src)
        return heads

    def _refresh(self, session: Session, head: _Head, scan: FileScan) -> str | None:
        """Bring a known photo's row up to date with the same content found at ``scan.path``.

        * A row whose decode failed, with content that decodes now (the bytes are the same, but
          the decoder may have changed, e.g. pillow-heif installed since): error cleared, size
          and path set -> ``"recovered"``.
        * A row whose stored path no longer exists points to the new path -> ``"moved"``.

        Both updates are conditional on the row still being as read, so two parallel imports
        never both count a recovery. Reviews and predictions are keyed by the row id and content
        hash, so they are kept. Returns ``"recovered"``, ``"moved"`` or ``None``; not committed.
        """
        row = col(ImageRecord.id) == head.id
        if head.error is not None:
            if scan.error is not None:
                return None
            done = session.exec(
                update(ImageRecord)
                .where(row, col(ImageRecord.error).is_not(None))
                .values(path=scan.path, width=scan.width, height=scan.height, error=None, phash=scan.phash)
            ).rowcount
            head.error, head.path = None, scan.path
            return "recovered" if done == 1 else None
        if head.path != scan.path and not Path(head.path).exists():
            done = session.exec(
                update(ImageRecord).where(row, col(ImageRecord.path) == head.path).values(path=scan.path)
            ).rowcount
            head.path = scan.path
            return "moved" if done == 1 else None
        return None

    def _labels(self, session: Session, labelled: list[tuple[_Occurrence, _Head]], part: ImportSummary) -> None:
        """Record the files' labels (walk order) as import reviews: one label per photo per import.

        A photo's first labelled file in this import decides: its label is recorded unless a
        person reviewed the photo (kept) or the newest review has that label already (unchanged).
        A later file with the same content (a copy) changes nothing: same label -> unchanged,
        person's review -> kept, another label -> reported in ``label_conflicts`` (so importing a
        folder again, or many times at once, never adds reviews).

        Photos without any review (the common case) are written for the whole batch in a few
        statements (:func:`~catreview.data.reviews.append_first_reviews`); the others, and any photo someone reviewed
        meanwhile, go through :func:`~catreview.data.reviews.append_review` one by one (:meth:`_label`).
        """
        firsts: dict[int, tuple[_Occurrence, _Head, str]] = {}  # image id -> its first labelled file
        copies: list[tuple[_Occurrence, _Head, str]] = []
        for occ, head in labelled:
            assert occ.label is not None
            if occ.label not in self.vocabulary:
                part.unknown_labels.append((occ.rel, occ.label))
                continue
            item = (occ, head, self.vocabulary.canonical(occ.label))
            if head.id in firsts or head.id in self.decided:
                copies.append(item)
            else:
                firsts[head.id] = item
        bulk = {i: label for i, (_, head, label) in firsts.items() if head.review_id is None}
        made = append_first_reviews(session, bulk, IMPORT_ANNOTATOR, source=IMPORT_SOURCE)
        lost = set(bulk) - set(made)
        if lost:  # reviewed by another transaction meanwhile (PostgreSQL): read again, decide again
            for again in self._heads(session, col(ImageRecord.id).in_(sorted(lost))).values():
                head = firsts[again.id][1]
                head.review_id, head.review_label, head.review_source = (
                    again.review_id,
                    again.review_label,
                    again.review_source,
                )
        decided = self._batch_decided
        for image_id, (occ, head, label) in firsts.items():
            if image_id in bulk and image_id not in lost:
                outcome = "recorded"
            else:
                outcome = self._label(session, head, occ, label)
            decided[image_id] = (label, occ.rel, outcome)
            if outcome == "recorded":
                part.labels_recorded += 1
            elif outcome == "unchanged":
                part.labels_unchanged += 1
            else:
                part.labels_kept_human += 1
        for occ, head, label in copies:
            first_label, first_rel, outcome = decided.get(head.id) or self.decided[head.id]
            if outcome == "kept":
                part.labels_kept_human += 1
            elif label == first_label:
                part.labels_unchanged += 1
            else:
                part.label_conflicts.append((occ.rel, f"{label!r}, but its copy {first_rel} says {first_label!r}"))

    def _label(self, session: Session, head: _Head, occ: _Occurrence, canonical: str) -> str:
        """Record ``canonical`` as an import review of ``head`` unless a person reviewed the photo
        or its newest review has that label; compare-and-set (:func:`~catreview.data.reviews.append_review`)
        on the head read, read again and decided again when it moved.

        Returns:
            ``"recorded"``, ``"unchanged"`` or ``"kept"`` (a person's review).

        Raises:
            ImportConflictError: the head moved :data:`~catreview.data.reviews.MAX_ATTEMPTS` times.
        """
        for _ in range(MAX_ATTEMPTS):
            if head.review_id is not None and head.review_source != IMPORT_SOURCE:
                return "kept"  # never let an import override a human decision
            if head.review_id is not None and head.review_label == canonical:
                return "unchanged"  # idempotent
            review = append_review(
                session, head.id, canonical, IMPORT_ANNOTATOR, replaces=head.review_id, source=IMPORT_SOURCE
            )
            if review is not None:
                head.review_id, head.review_label, head.review_source = review.id, canonical, IMPORT_SOURCE
                return "recorded"
            # another transaction moved the head meanwhile (PostgreSQL): read it again, decide again
            (again,) = self._heads(session, col(ImageRecord.id) == head.id).values()
            head.review_id, head.review_label, head.review_source = (
                again.review_id,
                again.review_label,
                again.review_source,
            )
        raise _HeadKeptMoving(f"photo {occ.rel}: its newest review kept changing while the import labelled it")


class _HeadKeptMoving(ImportConflictError):
    """Raised inside a batch; the batch is rolled back and tried again."""


def get_or_create_image(session: Session, path: Path, sha: str) -> tuple[ImageRecord, bool]:
    """The image row for content hash ``sha``, created (decoded, committed) if absent.

    Race-free: the row is inserted with ``ON CONFLICT (sha256) DO NOTHING`` and read back, so two
    processes adding the same photo get the same row; the running totals change only for the one
    that created it. Returns ``(row, created)``. A file that fails to decode becomes a row with
    ``error`` set.

    Raises:
        OSError: the file cannot be read (it gets no row).
    """
    row = image_by_sha(session, sha)
    if row is not None:
        return row, False
    fresh = new_image_row(path, sha)
    insert = insert_ignoring_conflicts(session, ImageRecord, ["sha256"]).returning(col(ImageRecord.id))
    values = fresh.model_dump(exclude={"id", "current_review_id", "current_label"})
    created = session.exec(insert.values(**values)).first() is not None
    if created:
        counts.bump(session, photos=int(fresh.error is None), failed=int(fresh.error is not None))
    session.commit()
    row = image_by_sha(session, sha)
    assert row is not None  # inserted now or by another process before
    return row, created


def new_image_row(path: Path, sha: str) -> ImageRecord:
    """An uncommitted image row for ``path``: size, and width/height or the decode error.

    Raises:
        OSError: the file cannot be read (no permission, vanished, I/O error, not a regular file).
    """
    scan = scan_file(str(path))
    if scan.read_error is not None or scan.size is None:
        raise OSError(f"{path}: {scan.read_error}")
    return ImageRecord(
        sha256=sha,
        path=str(path),
        size=scan.size,
        width=scan.width,
        height=scan.height,
        error=scan.error,
        phash=scan.phash,
    )
