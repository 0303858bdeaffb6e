"""Curated, versioned dataset folders of reviewed photos.

The curated dataset build, :func:`export_dataset` (a dry run of its splits: :func:`preview_splits`).
The other entry points live beside it: :func:`catreview.export.llava_jsonl.write_llava_jsonl` (the
fast path: reviewed rows straight to one LLaVA JSONL file, no image copying),
:func:`catreview.export.archive.zip_export` and :func:`catreview.export.llava_import.import_llava_jsonl`
(seeds labels in a (fresh) database from such a JSONL file).

An export folder::

      OUT/train/<id>.jpg, OUT/train/metadata.jsonl        (same for validation/, test/;
                                                          an empty split has no folder)
      OUT/llava/{train,validation,test}.jsonl             LLaVA "conversations" records
      OUT/messages/{train,validation,test}.jsonl          TRL messages + images
      OUT/llamafactory/{train,validation,test}.jsonl      LLaMA-Factory sharegpt messages
      OUT/dataset_info.json                               LLaMA-Factory registration
      OUT/manifest.csv, OUT/README.md (dataset card), OUT/export.json

  ``datasets.load_dataset("imagefolder", data_dir=OUT)`` loads the three splits (tested), and
  so does ``datasets.load_dataset(OUT)`` through the card's YAML header. ``datasets`` infers each
  split's schema from that split's own ``metadata.jsonl``, so every column there has one type in
  every row and is never null (:func:`catreview.export.conversations.metadata_row`: ``""`` for a missing
  string, e.g. ``predicted_at_review`` of imported labels). Every image path in every file is
  relative to ``OUT``.

Split rules, the per-breed cap and oversampling: :mod:`catreview.export.splits` (near duplicates by
perceptual hash, :func:`catreview.data.phash.stored_groups`, share one split); image resizing:
:mod:`catreview.export.images`; the processor / chat-template check: :mod:`catreview.export.validate`.

Scale (the users' 127K photos): nothing is held per photo but its sha256, label, review id and
split. A first pass reads only image columns (:func:`catreview.export.rows.reviewed_labels`) and
assigns the splits; the second reads the chosen reviews a batch at a time
(:func:`catreview.export.rows.rows_for_reviews`), sends the photos to a process pool that checks,
resizes and writes them (:func:`catreview.export.images.process_images`), and appends each record
to its files as its image comes back, in id order (:class:`catreview.export.layout.ExportWriter`).
Oversampled copies (``oversample_train=True``) get ids ``<id>-o<k>`` and their own
question/answer templates, point at the same image file, and appear in ``train/metadata.jsonl``
and every train JSONL.

Safety: an export is built in a hidden sibling folder and moved into place only when complete;
split assignments and the :class:`~catreview.data.db.ExportRecord` are committed in one transaction
after that, and a failed commit removes the new folder (restoring the one it replaced). A
record that fails a check (image missing or changed since import, undecodable, or rejected by
the target model's processor) is reported with its reason and never written.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.data.db import ExportRecord, SplitAssignment, redact_url, utcnow
from catreview.data.labels import BreedVocabulary
from catreview.data.phash import stored_groups
from catreview.errors import CatreviewError
from catreview.export.card import dataset_card
from catreview.export.conversations import IMPORTED_CONFIDENCE, build_record, record_id
from catreview.export.images import CHUNK, IMAGE_SIZE, JPEG_QUALITY, ImageJob, Progress, default_workers, process_images
from catreview.export.info import FORMAT_VERSION, tree_hash
from catreview.export.layout import ExportWriter
from catreview.export.rows import BATCH_SIZE, LabelledPhoto, ReviewedRow, reviewed_labels, rows_for_reviews
from catreview.export.splits import (
    DB_SPLIT,
    FRACTIONS,
    FROM_DB_SPLIT,
    OVERSAMPLE_MAX_FACTOR,
    SPLITS,
    assign_splits,
    cap_rows,
    oversample_copies,
)
from catreview.export.traits import TraitTable, load_breed_traits
from catreview.export.validate import RecordValidator, check_processor, load_processor


class ExportError(CatreviewError, RuntimeError):
    """An export that cannot be made; nothing was written and the database is unchanged."""


@dataclass
class ExportSummary:
    """What :func:`export_dataset` wrote.

    ``counts[split][breed]`` counts photos (unique images); ``rows_per_split`` counts records
    including oversampled copies. ``skipped`` counts reviewed photos left out on purpose
    (``Not a cat``, ``Unsure``, ``failed image``, ``unknown label``, ``capped``); ``failed`` lists
    ``(sha256 prefix or path, reason)`` for photos that should have been exported but were not.
    """

    version: int
    out_dir: Path
    content_hash: str
    n_photos: int
    rows_per_split: dict[str, int]
    counts: dict[str, dict[str, int]]
    skipped: dict[str, int]
    failed: list[tuple[str, str]]
    new_assignments: int
    changed_assignments: int
    kept_assignments: int
    oversampled_rows: int
    created_at: str
    unreadable_snapshots: int = 0

    def audit_detail(self) -> dict[str, Any]:
        """What the audit row of this export records (the app and the CLI write the same):
        ``version``, ``photos``, ``content_hash``."""
        return {"version": self.version, "photos": self.n_photos, "content_hash": self.content_hash}

    def lines(self) -> list[str]:
        """The summary as lines for a terminal or the UI."""
        rows = ", ".join(f"{s} {self.rows_per_split[s]}" for s in SPLITS)
        out = [
            f"export v{self.version} -> {self.out_dir}: {self.n_photos} photos ({rows} records)",
            f"content hash {self.content_hash[:16]}; splits: {self.kept_assignments} kept, "
            f"{self.new_assignments} new, {self.changed_assignments} changed",
        ]
        if self.oversampled_rows:
            out.append(f"oversampled train records: {self.oversampled_rows}")
        if self.skipped:
            out.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        out += [f"  failed: {who}: {why}" for who, why in self.failed]
        if self.unreadable_snapshots:
            out.append(
                f"{self.unreadable_snapshots} reviews have an unreadable stored model snapshot: exported "
                "without the predictions at review time (status 'labelled')"
            )
        return out


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose a new folder or pass overwrite=True")
        if not (out / "export.json").is_file():
            raise FileExistsError(f"{out} is not a catreview export (no export.json); refusing to replace it")


def export_dataset(
    engine: Engine,
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    cap_per_breed: int | None = None,
    oversample_train: bool = False,
    resplit: bool = False,
    processor: Any = None,
    model_config: Any = None,
    max_length: int | None = None,
    vocabulary: BreedVocabulary | None = None,
    traits: TraitTable | None = None,
    fractions: Sequence[float] = FRACTIONS,
    imported_confidence: float = IMPORTED_CONFIDENCE,
    oversample_max_factor: int = OVERSAMPLE_MAX_FACTOR,
    jpeg_quality: int = JPEG_QUALITY,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> ExportSummary:
    """Export every photo whose latest review names a breed as a new dataset version.

    Args:
        engine: the catreview database.
        out_dir: export root (created; must be absent or empty unless ``overwrite``).
        seed: split and cap randomness; same seed and same reviews give the same export.
        image_size: shortest side of exported images, px (never enlarged).
        cap_per_breed: at most this many photos of a breed (``None``: no cap).
        oversample_train: repeat minority-breed train records (module docstring).
        resplit: ignore and overwrite sticky split assignments of the exported photos.
        processor: a multimodal processor, or a model folder to load one (and its config) from;
            each record is checked with :class:`~catreview.export.validate.RecordValidator` and failures are
            reported, not written.
        model_config: the target model's config (loaded from ``processor`` when it is a path).
        max_length: training sequence limit for the processor check.
        vocabulary: when given, labels are canonicalised through it and unknown ones skipped;
            also used to compare predictions with labels.
        traits: trait table for answers (default ``assets/breed_traits.json``).
        fractions: train/validation/test shares (three numbers summing to 1).
        overwrite: replace an existing export in ``out_dir`` (only a catreview export).
        workers: image processes (default: the CPU cores available,
            :func:`~catreview.export.images.default_workers`); ``1`` resizes in this process. Never
            more than one per :data:`~catreview.export.images.CHUNK` photos, so a small export
            starts no pool.
        progress: ``progress(done, total)`` while images are written (``total``: photos planned).

    Returns:
        :class:`ExportSummary`; ``version`` is the new :class:`~catreview.data.db.ExportRecord` id.

    Raises:
        FileExistsError: ``out_dir`` holds something and ``overwrite`` is false (or it is not an
            export).
        ValueError: invalid options.
        ProcessorMismatchError: the processor cannot serve the model (checked before any work).
        ExportError: nothing to export, every photo failed, or an image worker process died.
    """
    _check_options(fractions, image_size, cap_per_breed)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out = Path(out_dir).resolve()
    _prepare_out_dir(out, overwrite)
    if isinstance(processor, (str, Path)):
        processor, loaded_config = load_processor(processor)
        model_config = model_config if model_config is not None else loaded_config
    validator = None
    if processor is not None:
        check_processor(processor, model_config)
        validator = RecordValidator(processor, model_config=model_config, max_length=max_length)
    options = {
        "seed": seed,
        "image_size": image_size,
        "cap_per_breed": cap_per_breed,
        "oversample_train": oversample_train,
        "oversample_max_factor": oversample_max_factor,
        "resplit": resplit,
        "fractions": list(fractions),
        "imported_confidence": imported_confidence,
        "jpeg_quality": jpeg_quality,
        "processor": type(processor).__name__ if processor is not None else None,
        "max_length": max_length,
    }
    make = functools.partial(
        build_record,
        traits=traits or load_breed_traits(),
        vocabulary=vocabulary,
        imported_confidence=imported_confidence,
    )
    plan = _plan_export(
        engine, vocabulary=vocabulary, seed=seed, cap=cap_per_breed, resplit=resplit, fractions=fractions
    )
    n_workers = max(1, min(workers or default_workers(), len(plan.photos) // CHUNK))

    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        built = _build(
            engine, plan, tmp, make, validator, vocabulary=vocabulary, image_size=image_size, quality=jpeg_quality,
            workers=n_workers, progress=progress,
            oversample=(seed, oversample_max_factor) if oversample_train else None,
        )  # fmt: skip
        info = _export_info(engine, tmp, options, built, plan.skipped)
        backup = _commit_export(engine, tmp, out, info, built.to_store, seed)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    rows_per_split = info["rows_per_split"]
    return ExportSummary(
        version=int(info["version"]),
        out_dir=out,
        content_hash=info["content_hash"],
        n_photos=built.n_photos,
        rows_per_split=rows_per_split,
        counts=info["counts"],
        skipped=dict(plan.skipped),
        failed=built.failed,
        new_assignments=built.new,
        changed_assignments=built.changed,
        kept_assignments=built.n_photos - built.new - built.changed,
        oversampled_rows=sum(rows_per_split.values()) - built.n_photos,
        created_at=info["created_at"],
        unreadable_snapshots=built.unreadable_snapshots,
    )


def _check_options(fractions: Sequence[float], image_size: int, cap: int | None) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px, got {image_size}")
    if cap is not None and cap < 1:
        raise ValueError(f"cap_per_breed must be at least 1, got {cap}")


@dataclass
class _Plan:
    """Which photos go where: ``photos`` (after the cap, by sha256), ``splits`` ``{sha256:
    split}``, ``sticky`` (valid stored assignments) and ``skipped`` counts."""

    photos: list[LabelledPhoto]
    splits: dict[str, str]
    sticky: dict[str, str]
    skipped: Counter[str]


def _plan_export(
    engine: Engine,
    *,
    vocabulary: BreedVocabulary | None,
    seed: int,
    cap: int | None,
    resplit: bool,
    fractions: Sequence[float],
) -> _Plan:
    with Session(engine) as session:
        photos, skipped = reviewed_labels(session, vocabulary)
        q = select(col(SplitAssignment.sha256), col(SplitAssignment.split)).execution_options(yield_per=BATCH_SIZE)
        stored = {sha: FROM_DB_SPLIT.get(split, split) for sha, split in session.execute(q)}
    sticky = {sha: split for sha, split in stored.items() if split in SPLITS}  # unknown values: reassigned
    photos, n_capped = cap_rows(photos, cap, seed=seed)
    if n_capped:
        skipped["capped"] += n_capped
    if not photos:
        raise ExportError("nothing to export: no photo's latest review names a breed")
    ids = [record_id(p.sha256) for p in photos]  # sorted, so a shared id prefix is a neighbour
    if any(a == b for a, b in itertools.pairwise(ids)):
        raise ExportError("two photos share an id prefix; this needs a longer id (please report)")
    with Session(engine) as session:  # near duplicates (perceptual hash) share one split
        groups = stored_groups(session, [p.sha256 for p in photos])
    splits = assign_splits(
        {p.sha256: p.label for p in photos}, {} if resplit else sticky, seed=seed, fractions=fractions, groups=groups
    )
    return _Plan(photos, splits, sticky, skipped)


def preview_splits(
    engine: Engine,
    *,
    seed: int = 0,
    cap_per_breed: int | None = None,
    resplit: bool = False,
    vocabulary: BreedVocabulary | None = None,
    fractions: Sequence[float] = FRACTIONS,
) -> dict[str, dict[str, int]]:
    """Photos per split and breed that :func:`export_dataset` with these options would export now,
    without writing anything (``{split: {breed: n}}``, every split present). Photos that would
    fail at export time (missing or changed files) cannot be foreseen and are counted.

    Raises:
        ExportError: no photo's latest review names a breed.
    """
    _check_options(fractions, IMAGE_SIZE, cap_per_breed)
    plan = _plan_export(
        engine, vocabulary=vocabulary, seed=seed, cap=cap_per_breed, resplit=resplit, fractions=fractions
    )
    counts: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    for photo in plan.photos:
        counts[plan.splits[photo.sha256]][photo.label] += 1
    return {s: dict(sorted(c.items())) for s, c in counts.items()}


@dataclass
class _Built:
    """What was written to the temporary folder: ``n_photos`` exported photos, ``counts[split][breed]``,
    records per split, ``failed`` ``(sha256 prefix, reason)``, and the split assignments to store
    (``to_store``: ``new`` ones and ``changed`` ones)."""

    n_photos: int = 0
    counts: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    rows_per_split: dict[str, int] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    to_store: dict[str, str] = field(default_factory=dict)
    new: int = 0
    changed: int = 0
    unreadable_snapshots: int = 0


def _planned_rows(
    engine: Engine, plan: _Plan, vocabulary: BreedVocabulary | None, built: _Built
) -> Iterator[tuple[tuple[LabelledPhoto, ReviewedRow], ImageJob]]:
    """The image job of every planned photo, its full row read a batch at a time (a short
    session per batch), in the plan's (id) order. A review no longer stored is a failure."""
    for start in range(0, len(plan.photos), BATCH_SIZE):
        batch = plan.photos[start : start + BATCH_SIZE]
        with Session(engine) as session:
            rows = list(rows_for_reviews(session, [p.review_id for p in batch], vocabulary))
        for photo, row in zip(batch, rows):
            if isinstance(row, int):
                built.failed.append((photo.sha256[:12], f"its review #{row} is no longer in the database"))
                continue
            if row.label != photo.label:
                raise ExportError(
                    f"photo {photo.sha256[:12]}: the stored current label {photo.label!r} disagrees with its review "
                    f"#{photo.review_id} ({row.label!r}); the database needs repair (please report)"
                )
            built.unreadable_snapshots += row.snapshot_unreadable
            rel = f"{plan.splits[photo.sha256]}/{record_id(photo.sha256)}.jpg"
            yield (photo, row), ImageJob(row.path, row.sha256, rel)


def _build(
    engine: Engine,
    plan: _Plan,
    tmp: Path,
    make: Callable[..., dict[str, Any]],
    validator: RecordValidator | None,
    *,
    vocabulary: BreedVocabulary | None,
    image_size: int,
    quality: int,
    workers: int,
    progress: Progress | None,
    oversample: tuple[int, int] | None,
) -> _Built:
    """Write every planned photo into ``tmp/<split>/<id>.jpg`` and its records into the split's
    files; photos that fail (image or template check) are reported and leave no file.
    ``oversample``: ``(seed, max_factor)`` of the train copies, or ``None``."""
    for s in SPLITS:
        (tmp / s).mkdir(parents=True)
    built = _Built()
    writer = ExportWriter(tmp, spool_train=oversample is not None)
    train: dict[str, list[str]] = defaultdict(list)  # breed -> sha256 of exported train photos
    results = process_images(
        _planned_rows(engine, plan, vocabulary, built), tmp, image_size=image_size, quality=quality,
        workers=workers, progress=progress, total=len(plan.photos),
    )  # fmt: skip
    try:
        for (photo, row), job, size, error in results:
            if size is None:
                built.failed.append((photo.sha256[:12], error or "image failed"))
                continue
            rec = make(row, job.rel)
            if validator is not None:
                check = validator(rec, images_root=tmp, image_size=size)
                if not check.ok:
                    (tmp / job.rel).unlink()
                    built.failed.append((photo.sha256[:12], f"template check: {check.reason}"))
                    continue
            split = plan.splits[photo.sha256]
            writer.add(rec, split, size, row)
            built.n_photos += 1
            built.counts[split][photo.label] += 1
            if photo.sha256 not in plan.sticky:
                built.new += 1
                built.to_store[photo.sha256] = split
            elif plan.sticky[photo.sha256] != split:
                built.changed += 1
                built.to_store[photo.sha256] = split
            if oversample is not None and split == "train":
                train[photo.label].append(photo.sha256)
        if not built.n_photos:
            raise ExportError(f"every photo failed; first: {built.failed[0][0]}: {built.failed[0][1]}")
        copies = oversample_copies(train, seed=oversample[0], max_factor=oversample[1]) if oversample else {}
        built.rows_per_split = writer.finish(copies, lambda row, image, k: make(row, image, copy=k))
    except BrokenProcessPool as exc:
        raise ExportError(
            f"an image worker process stopped unexpectedly ({exc}); nothing was exported. Out of memory? Try fewer "
            "workers. (A script calling export_dataset needs the `if __name__ == '__main__':` guard.)"
        ) from exc
    finally:
        results.close()  # stops the pool now, also on an error
        writer.close()
    return built


def _export_info(
    engine: Engine, tmp: Path, options: dict[str, Any], built: _Built, skipped: Counter[str]
) -> dict[str, Any]:
    """The ``export.json`` content (without ``version``); computes the content hash of ``tmp``."""
    return {
        "format": "catreview-export",
        "format_version": FORMAT_VERSION,
        "created_at": utcnow().isoformat(timespec="seconds"),
        "source_db": redact_url(engine.url),
        "content_hash": tree_hash(tmp),
        "options": options,
        "n_photos": built.n_photos,
        "rows_per_split": built.rows_per_split,
        "counts": {s: dict(sorted(built.counts[s].items())) for s in SPLITS},
        "skipped": dict(skipped),
        "failed": [list(f) for f in built.failed],
    }


def _commit_export(
    engine: Engine, tmp: Path, out: Path, info: dict[str, Any], assignments: dict[str, str], seed: int
) -> Path | None:
    """Record the version and the split assignments, move ``tmp`` to ``out``, then commit.

    The ExportRecord is flushed first (its id is the version written into export.json and the
    card); a failed commit moves the previous export back. Returns the moved-aside previous
    export (to delete) or ``None``.
    """
    now = utcnow()
    with Session(engine) as session:
        _store_assignments(session, assignments, now)
        summary = {k: info[k] for k in ("rows_per_split", "skipped")} | {"n_failed": len(info["failed"])}
        rec = ExportRecord(
            out_dir=str(out),
            content_hash=info["content_hash"],
            n_records=info["n_photos"],
            seed=seed,
            options_json=json.dumps({**info["options"], **summary}),
            created_at=now,
        )
        session.add(rec)
        session.flush()
        info["version"] = rec.id
        (tmp / "export.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(dataset_card(info), encoding="utf-8")
        backup = _swap_in(tmp, out)
        try:
            session.commit()
        except Exception:  # any database failure: put the previous export back, then re-raise
            _swap_back(out, backup)
            raise
    return backup


def _store_assignments(session: Session, assignments: dict[str, str], now: datetime) -> None:
    """Insert or update ``{sha256: split}`` in ``split_assignments``, :data:`BATCH_SIZE` rows a
    statement (bulk INSERT of the new rows, bulk UPDATE by primary key of the stored ones), in the
    session's transaction (not committed)."""
    items = list(assignments.items())
    for start in range(0, len(items), BATCH_SIZE):
        batch = items[start : start + BATCH_SIZE]
        stored = set(
            session.exec(select(SplitAssignment.sha256).where(col(SplitAssignment.sha256).in_([s for s, _ in batch])))
        )
        values = [{"sha256": sha, "split": DB_SPLIT[split], "assigned_at": now} for sha, split in batch]
        fresh = [v for v in values if v["sha256"] not in stored]
        known = [v for v in values if v["sha256"] in stored]
        if fresh:
            session.execute(insert(SplitAssignment), fresh)
        if known:
            session.execute(update(SplitAssignment), known)


def _swap_in(tmp: Path, out: Path) -> Path | None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is moved aside and returned."""
    backup = None
    if out.exists():
        if any(out.iterdir()):
            backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, backup)
        else:
            out.rmdir()
    try:
        os.replace(tmp, out)
    except OSError:
        if backup is not None:
            os.replace(backup, out)
        raise
    return backup


def _swap_back(out: Path, backup: Path | None) -> None:
    shutil.rmtree(out, ignore_errors=True)
    if backup is not None:
        os.replace(backup, out)


__all__ = ["ExportError", "ExportSummary", "export_dataset", "preview_splits"]
