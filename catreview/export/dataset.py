"""Exports: conversation JSONL files and curated, versioned datasets of reviewed photos.

Three entry points:

* :func:`write_llava_jsonl` -- the fast path: reviewed rows straight to one LLaVA JSONL file,
  no image copying (127K rows in ~4 s on 2 CPU cores, see ``benchmarks/export_bench.py``).
* :func:`export_dataset` -- a curated dataset version::

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
* :func:`import_llava_jsonl` -- seeds labels in a (fresh) database from such a JSONL file.

Split rules (:func:`assign_splits`): stratified 80/10/10 by breed, deterministic for a seed;
one record per photo *content* (sha256), so equal bytes can never sit in two splits; a photo
keeps its split across exports (table ``split_assignments``) unless ``resplit=True``; new photos
go wherever their breed is furthest below its target counts. ``SplitAssignment.split`` holds
``train``/``val``/``test`` (the column is 8 characters); folders use ``validation``.

Images are decoded with :func:`catreview.data.images.load_rgb` (EXIF orientation applied, RGB),
resized so the **shortest side** is ``image_size`` px (aspect kept, never enlarged) and saved as
JPEG quality 95. Shortest side, because CLIP-style processors (LLaVA's) resize the shortest side
to their input size and centre-crop: at ``image_size=336`` every pixel llava-1.5 would see is
kept, and no processor has to upsample.

Oversampling (``oversample_train=True``) repeats train records of minority breeds, up to the
largest breed's train count but at most :data:`OVERSAMPLE_MAX_FACTOR` times a breed's own
count. Copies get ids ``<id>-o<k>`` and their own question/answer templates, point at the same
image file, and appear in ``train/metadata.jsonl`` and every train JSONL; validation and test
are never oversampled. ``cap_per_breed`` keeps at most that many photos of a breed (chosen by a
seeded hash), before splitting.

Safety: an export is built in a hidden sibling folder and moved into place only when complete;
split assignments and the :class:`~catreview.data.db.ExportRecord` are committed in one transaction
after that, and a failed commit removes the new folder (restoring the one it replaced). A
record that fails a check (image missing or changed since import, undecodable, or rejected by
the target model's processor) is reported with its reason and never written.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import shutil
import uuid
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from catreview.data.db import ExportRecord, ImageRecord, Review, SplitAssignment, image_by_sha, redact_url, utcnow
from catreview.data.images import ImageDecodeError, load_rgb
from catreview.data.labels import SPECIAL_LABELS, BreedVocabulary, is_breed
from catreview.data.reviews import ReviewError, latest_review, record_review
from catreview.errors import CatreviewError
from catreview.export.conversations import (
    IMAGE_TOKEN,
    IMPORT_SOURCE,
    IMPORTED_CONFIDENCE,
    ReviewedRow,
    TraitTable,
    build_record,
    check_record,
    load_breed_traits,
    metadata_row,
    parse_snapshot,
    record_id,
    snapshot_from_predictions,
    to_messages,
)
from catreview.files import jsonl_line, read_jsonl, sha256_file, write_jsonl

SPLITS = ("train", "validation", "test")
#: Folder split name -> value stored in ``SplitAssignment.split`` (an 8-character column).
DB_SPLIT = {"train": "train", "validation": "val", "test": "test"}
FROM_DB_SPLIT = {v: k for k, v in DB_SPLIT.items()}
FRACTIONS = (0.8, 0.1, 0.1)
IMAGE_SIZE = 336
JPEG_QUALITY = 95
OVERSAMPLE_MAX_FACTOR = 10
FORMAT_VERSION = 1
#: Files not covered by the content hash (they hold the time and the hash itself).
UNHASHED_FILES = frozenset({"README.md", "export.json"})
Progress = Callable[[int, int], None]


class ExportError(CatreviewError, RuntimeError):
    """An export that cannot be made; nothing was written and the database is unchanged."""


class ProcessorMismatchError(CatreviewError, ValueError):
    """The processor and the model disagree on the number of image tokens (or has no template)."""


# --------------------------------------------------------------------------------------------
# Reviewed rows
# --------------------------------------------------------------------------------------------


def collect_reviewed_rows(
    session: Session, vocabulary: BreedVocabulary | None = None
) -> tuple[list[ReviewedRow], Counter[str]]:
    """Photos whose latest review names a breed, sorted by sha256, and what was skipped.

    Returns:
        ``(rows, skipped)``; ``skipped`` counts ``"Not a cat"``, ``"Unsure"``, ``"failed
        image"`` (a review on an image that failed to decode) and, when ``vocabulary`` is
        given, ``"unknown label"`` (a label the vocabulary no longer knows).
    """
    # Plain columns, not ORM objects: ~10x faster at 127K rows. Same "latest review = highest
    # id" rule as catreview.data.reviews.current_reviews.
    newest = select(Review.image_id, func.max(Review.id).label("rid")).group_by(Review.image_id).subquery()
    stmt = (
        select(
            Review.image_id, Review.label, Review.annotator, Review.source, Review.note, Review.model_snapshot_json,
            ImageRecord.sha256, ImageRecord.path, ImageRecord.error,
        )  # fmt: skip
        .join(newest, Review.id == newest.c.rid).outerjoin(ImageRecord, ImageRecord.id == Review.image_id)
    )
    rows: list[ReviewedRow] = []
    skipped: Counter[str] = Counter()
    for image_id, label, annotator, source, note, snapshot_json, sha, path, error in session.execute(stmt):
        if label in SPECIAL_LABELS:
            skipped[label] += 1
        elif sha is None or error is not None:
            skipped["failed image"] += 1
        elif vocabulary is not None and label not in vocabulary:
            skipped["unknown label"] += 1
        else:
            try:
                snapshot, unreadable = parse_snapshot(snapshot_json), False
            except ValueError:  # exported without predictions; counted in the summary
                snapshot, unreadable = None, True
            rows.append(
                ReviewedRow(
                    image_id=image_id,
                    sha256=sha,
                    path=path,
                    label=vocabulary.canonical(label) if vocabulary is not None else label,
                    annotator=annotator,
                    source=source,
                    note=note,
                    snapshot=snapshot,
                    snapshot_unreadable=unreadable,
                )
            )
    rows.sort(key=lambda r: r.sha256)
    return rows, skipped


@dataclass
class JsonlResult:
    """What :func:`write_llava_jsonl` wrote: ``image_root`` is the folder image paths are
    relative to (LLaVA's ``--image_folder``), absolute but with symlinks kept as imported."""

    path: Path
    n_records: int
    image_root: Path
    skipped: dict[str, int] = field(default_factory=dict)


def write_llava_jsonl(
    rows: Iterable[ReviewedRow],
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    traits: TraitTable | None = None,
    vocabulary: BreedVocabulary | None = None,
    imported_confidence: float = IMPORTED_CONFIDENCE,
) -> JsonlResult:
    """Fast path: one LLaVA JSONL record per row, pointing at the original photos (no copying).

    Args:
        rows: reviewed rows (e.g. ``collect_reviewed_rows(session)[0]``); rows whose label is
            not a breed are skipped and counted.
        path: output file (written atomically).
        image_root: folder the ``image`` paths are made relative to; default the deepest folder
            holding every photo. Photos outside it raise.
        traits: trait table (default ``assets/breed_traits.json``).

    Paths are taken as the photos were imported (``os.path.abspath``, symlinks **not**
    resolved), so the default ``image_root`` is the folder the user imported from, e.g.
    ``/tmp/shared/data/cats`` even when ``/tmp/shared`` links to ``/work/shared``: it is the
    path people know and pass to LLaVA's ``--image_folder``, and a photo folder that holds
    symlinked files keeps them inside it. An ``image_root`` given through another path to the same
    folder (the link's target, or a link to it) also works: a photo not under it by name is
    compared by resolved path.

    Raises:
        ValueError: a photo lies outside ``image_root``.
    """
    rows = [r for r in rows]
    good = [r for r in rows if is_breed(r.label)]
    skipped = dict(Counter(r.label for r in rows if not is_breed(r.label)))
    table = traits or load_breed_traits()
    if image_root is None:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(r.path)) for r in good]) if good else "."
    else:
        root = os.path.abspath(image_root)
    prefix = root.rstrip(os.sep) + os.sep
    real_prefix = os.path.realpath(root).rstrip(os.sep) + os.sep

    def relative(p: str) -> str | None:
        if p.startswith(prefix):
            return p[len(prefix) :]
        real = os.path.realpath(p)  # only for photos not under image_root by name (rare, slower)
        return real[len(real_prefix) :] if real.startswith(real_prefix) else None

    def records() -> Iterator[dict[str, Any]]:
        for r in good:
            p = os.path.abspath(r.path)
            rel = relative(p)
            if rel is None:
                raise ValueError(f"photo {p} is outside image_root {root}")
            rel = rel.replace(os.sep, "/")
            yield build_record(r, rel, traits=table, vocabulary=vocabulary, imported_confidence=imported_confidence)

    n = write_jsonl(records(), path)
    return JsonlResult(Path(path), n, Path(root), skipped)


# --------------------------------------------------------------------------------------------
# Splits, cap, oversampling
# --------------------------------------------------------------------------------------------


def _rank(seed: int, sha256: str, purpose: str) -> bytes:
    """Seeded pseudo-random sort key of a photo (same seed, same order on every machine)."""
    return hashlib.sha256(f"{purpose}:{seed}:{sha256}".encode()).digest()


def largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into integer counts proportional to ``fractions`` (summing to ``n``).

    Floors first, then the leftover items go to the largest remainders, earlier splits first
    on ties: 10 -> [8, 1, 1], 4 -> [3, 1, 0], 1 -> [1, 0, 0].
    """
    raw = [n * f for f in fractions]
    counts = [math.floor(x + 1e-9) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_splits(
    labels: Mapping[str, str],
    existing: Mapping[str, str] | None = None,
    *,
    seed: int = 0,
    fractions: Sequence[float] = FRACTIONS,
) -> dict[str, str]:
    """Stratified split assignment by breed.

    Args:
        labels: ``{sha256: breed}`` of the photos to export.
        existing: ``{sha256: split}`` sticky assignments (folder names); these are kept.
        seed: orders new photos (different seeds, different assignments).
        fractions: train/validation/test shares.

    Returns:
        ``{sha256: split}`` for every photo in ``labels``. Per breed, the targets are
        :func:`largest_remainder` of the breed's photo count; each new photo (in seeded hash
        order) goes to the split furthest below its target, ties to train, validation, test.
        Without existing assignments the targets are met exactly.
    """
    existing = existing or {}
    by_breed: dict[str, list[str]] = defaultdict(list)
    for sha, breed in labels.items():
        by_breed[breed].append(sha)
    out: dict[str, str] = {}
    for breed in sorted(by_breed):
        members = by_breed[breed]
        targets = largest_remainder(len(members), fractions)
        current = Counter()
        for sha in members:
            if sha in existing:
                out[sha] = existing[sha]
                current[existing[sha]] += 1
        new = sorted((s for s in members if s not in existing), key=lambda s: _rank(seed, s, "split"))
        for sha in new:
            i = max(range(len(SPLITS)), key=lambda k: (targets[k] - current[SPLITS[k]], -k))
            out[sha] = SPLITS[i]
            current[SPLITS[i]] += 1
    return out


def cap_rows(rows: Sequence[ReviewedRow], cap: int | None, *, seed: int = 0) -> tuple[list[ReviewedRow], int]:
    """Keep at most ``cap`` photos per breed (seeded hash order); returns ``(kept, n_dropped)``."""
    if cap is None:
        return list(rows), 0
    by_breed: dict[str, list[ReviewedRow]] = defaultdict(list)
    for r in rows:
        by_breed[r.label].append(r)
    kept: list[ReviewedRow] = []
    for members in by_breed.values():
        kept += sorted(members, key=lambda r: _rank(seed, r.sha256, "cap"))[:cap]
    kept.sort(key=lambda r: r.sha256)
    return kept, len(rows) - len(kept)


def oversample_copies(
    train: Mapping[str, Sequence[str]], *, seed: int = 0, max_factor: int = OVERSAMPLE_MAX_FACTOR
) -> dict[str, int]:
    """Extra copies per photo that bring each breed's train count up to the largest one.

    Args:
        train: ``{breed: [sha256, ...]}`` of the train split.
        max_factor: a breed grows to at most ``max_factor`` times its own count.

    Returns:
        ``{sha256: extra copies}`` (only photos with at least one copy); copies are spread
        evenly, the remainder going to photos in seeded hash order.
    """
    if not train:
        return {}
    target = max(len(v) for v in train.values())
    copies: dict[str, int] = {}
    for shas in train.values():
        n = len(shas)
        if n == 0:
            continue
        extra = min(target, n * max_factor) - n
        if extra <= 0:
            continue
        ordered = sorted(shas, key=lambda s: _rank(seed, s, "oversample"))
        for i, sha in enumerate(ordered):
            k = extra // n + (1 if i < extra % n else 0)
            if k:
                copies[sha] = k
    return copies


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def export_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """``(width, height)`` after scaling the shortest side down to ``image_size`` (aspect
    kept, rounded; images already small enough keep their size)."""
    short = min(width, height)
    if short <= image_size:
        return width, height
    scale = image_size / short
    w = image_size if width == short else max(1, round(width * scale))
    h = image_size if height == short else max(1, round(height * scale))
    return w, h


def resize_for_export(img: Image.Image, image_size: int) -> Image.Image:
    """Downscale ``img`` (RGB) so its shortest side is ``image_size`` px (Lanczos)."""
    size = export_size(img.width, img.height, image_size)
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


class ExportImageError(CatreviewError, ValueError):
    """A photo that cannot go into an export; the message is the reason."""


def export_image(
    src: str | Path, sha256: str, dst: Path, *, image_size: int, quality: int = JPEG_QUALITY
) -> Image.Image:
    """Check, decode, resize and save one photo as JPEG; returns the resized image.

    The source bytes must still hash to ``sha256`` (a file replaced since import would carry a
    label that belongs to other content).

    Raises:
        ExportImageError: missing, unreadable, changed since import, or undecodable.
    """
    try:
        actual = sha256_file(src)
    except OSError as exc:
        raise ExportImageError(f"cannot read {src}: {exc.strerror or exc}") from None
    if actual != sha256:
        raise ExportImageError(f"{src} changed since import (sha256 {actual[:12]} != {sha256[:12]})")
    try:
        img = load_rgb(src)
    except ImageDecodeError as exc:
        raise ExportImageError(f"{src}: {exc}") from None
    out = resize_for_export(img, image_size)
    icc = img.info.get("icc_profile")
    out.save(dst, "JPEG", quality=quality, **({"icc_profile": icc} if icc else {}))
    return out


# --------------------------------------------------------------------------------------------
# Checking records against a model's processor and chat template
# --------------------------------------------------------------------------------------------


@dataclass
class TemplateCheck:
    """Result of :func:`validate_record_for_processor`. Counts are ``None`` when the check
    stopped before computing them."""

    ok: bool
    reason: str | None = None
    image_tokens: int | None = None
    expected_image_tokens: int | None = None
    n_tokens: int | None = None


def model_image_tokens(model_config: Any) -> int | None:
    """Image features a llava-1.5-style model produces per image, from its config.

    ``(image_size // patch_size)**2`` patches, + 1 for CLIP's CLS token, - 1 when
    ``vision_feature_select_strategy == "default"`` (which drops the first feature); e.g.
    llava-1.5-7b: 336/14 -> 576. Returns ``None`` for other families (llava-next, Qwen2-VL),
    whose count depends on the image and is computed by the processor.
    """
    if getattr(model_config, "model_type", None) != "llava":
        return None
    vc = getattr(model_config, "vision_config", None)
    image_size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    if not image_size or not patch:
        return None
    n = (image_size // patch) ** 2
    n += 1 if getattr(vc, "model_type", "") == "clip_vision_model" else 0
    if getattr(model_config, "vision_feature_select_strategy", "default") == "default":
        n -= 1
    return n


def processor_image_tokens(processor: Any, height: int, width: int) -> int:
    """Image tokens ``processor`` expands one ``height`` x ``width`` image into.

    Uses the processor's own ``_get_num_multimodal_tokens`` (present on LLaVA, LLaVA-NeXT,
    Qwen2-VL and most multimodal processors in transformers 5.x).

    Raises:
        ProcessorMismatchError: the processor cannot tell.
    """
    fn = getattr(processor, "_get_num_multimodal_tokens", None)
    if fn is None:
        raise ProcessorMismatchError(f"{type(processor).__name__} cannot report its number of image tokens")
    data = fn(image_sizes=[[height, width]])
    counts = getattr(data, "num_image_tokens", None)
    if not counts:
        raise ProcessorMismatchError(f"{type(processor).__name__} reported no image token count")
    return int(counts[0])


def expected_image_tokens(processor: Any, height: int, width: int, model_config: Any = None) -> int:
    """What the *model* needs for an image of this size: from ``model_config`` when it can be
    computed there (:func:`model_image_tokens`), else from the processor."""
    n = model_image_tokens(model_config) if model_config is not None else None
    return n if n is not None else processor_image_tokens(processor, height, width)


def _crop_hw(processor: Any) -> tuple[int, int]:
    ip = getattr(processor, "image_processor", None)
    crop = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
    if isinstance(crop, dict) and "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    if isinstance(crop, dict) and "shortest_edge" in crop:
        return int(crop["shortest_edge"]), int(crop["shortest_edge"])
    return IMAGE_SIZE, IMAGE_SIZE


def check_processor(processor: Any, model_config: Any = None) -> None:
    """Fail fast on a processor that cannot produce valid training records for the model.

    Raises:
        ProcessorMismatchError: no chat template; no image token; the processor's image token id
            differs from the model's; or (llava-1.5) the processor expands ``<image>`` into a
            different number of tokens than the vision tower produces features (the
            ``num_additional_image_tokens`` / ``vision_feature_select_strategy`` trap).
    """
    name = type(processor).__name__
    if not getattr(processor, "chat_template", None):
        raise ProcessorMismatchError(f"{name} has no chat template; use a chat/instruct checkpoint's processor")
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        raise ProcessorMismatchError(f"{name} has no image token id")
    if model_config is None:
        return
    model_id = getattr(model_config, "image_token_id", None)
    if model_id is not None and model_id != token_id:
        raise ProcessorMismatchError(f"{name} uses image token id {token_id}, the model expects {model_id}")
    need = model_image_tokens(model_config)
    if need is not None:
        h, w = _crop_hw(processor)
        have = processor_image_tokens(processor, h, w)
        if have != need:
            raise ProcessorMismatchError(
                f"{name} expands each image into {have} tokens but the model's vision tower gives {need} "
                "features; check num_additional_image_tokens, vision_feature_select_strategy and patch_size"
            )


def _template_errors() -> tuple[type[BaseException], ...]:
    try:
        from jinja2 import TemplateError
    except ImportError:  # jinja2 ships with transformers; keep the module importable without it
        return (ValueError, TypeError, KeyError)
    return (ValueError, TypeError, KeyError, TemplateError)


class RecordValidator:
    """Checks seed-schema records against one target model's processor and chat template.

    For each record: :func:`~catreview.export.conversations.check_record`; render its messages through
    ``processor.apply_chat_template`` (the image placeholder must appear exactly once); process
    text + image with ``processor`` (no truncation); count ``processor.image_token_id`` in
    ``input_ids`` and compare with what the model needs (:func:`expected_image_tokens`: from
    ``model_config`` for llava-1.5, else the processor's own count for this image size); the
    image tokens must form one contiguous run; with ``max_length``, the whole sequence must fit,
    since truncation would cut the answer or the image tokens.

    With ``cache=True`` (bulk exports) the full processor call runs once per distinct image size;
    later records of that size only tokenise their rendered text, and their length is
    ``len(text ids) - 1 + image tokens``. The first record of each size verifies that identity
    against the full call, and any disagreement switches the cache off for good. This takes a
    check from ~15 ms to ~1 ms on two cores (the image normalisation dominates the full call).

    Args:
        processor: a transformers multimodal processor with a chat template.
        model_config: the target model's config (``AutoConfig``); strongly recommended, since
            without it a processor/model mismatch cannot be seen.
        max_length: the training sequence length limit, if any.
        cache: reuse the image expansion per image size (see above).
    """

    def __init__(
        self, processor: Any, *, model_config: Any = None, max_length: int | None = None, cache: bool = True
    ) -> None:
        self.processor = processor
        self.model_config = model_config
        self.max_length = max_length
        self.cache = cache
        self.token_id = processor.image_token_id
        self.placeholder = getattr(processor, "image_token", IMAGE_TOKEN)
        self._per_size: dict[tuple[int, int], int] = {}
        self._need: dict[tuple[int, int], int] = {}

    def __call__(
        self, record: Mapping[str, Any], *, image: Image.Image | None = None, images_root: str | Path | None = None
    ) -> TemplateCheck:
        """Check ``record`` with ``image`` (the resized image; loaded from ``images_root /
        record["image"]`` when omitted). Returns :class:`TemplateCheck`, never raises for a bad
        record; raises ``ValueError`` when neither ``image`` nor ``images_root`` is given."""
        errors = check_record(record)
        if errors:
            return TemplateCheck(False, "record: " + "; ".join(errors))
        if image is None:
            if images_root is None:
                raise ValueError("give image= or images_root=")
            try:
                image = load_rgb(Path(images_root) / record["image"])
            except ImageDecodeError as exc:
                return TemplateCheck(False, f"image: {exc}")
        try:
            text = self.processor.apply_chat_template(
                to_messages(record)["messages"], tokenize=False, add_generation_prompt=False
            )
        except _template_errors() as exc:
            return TemplateCheck(False, f"chat template failed: {exc}")
        if text.count(self.placeholder) != 1:
            return TemplateCheck(
                False, f"chat template renders {self.placeholder} {text.count(self.placeholder)} times, expected once"
            )
        size = image.size
        ids = self._text_ids(text) if self.cache and size in self._per_size else None
        if ids is not None:
            n, first, length = self._per_size[size], ids.index(self.token_id), len(ids) - 1 + self._per_size[size]
        else:
            try:
                enc = self.processor(images=[image], text=[text], return_tensors=None)
            except ValueError as exc:
                return TemplateCheck(False, f"processor: {exc}")
            full = list(enc["input_ids"][0])
            n, length = full.count(self.token_id), len(full)
            first = full.index(self.token_id) if n else 0
            if n and full[first : first + n].count(self.token_id) != n:
                return TemplateCheck(False, "image tokens are not one contiguous run", n, None, length)
            if self.cache and size not in self._per_size:
                plain = self._text_ids(text)
                if plain is not None and len(plain) - 1 + n == length and plain.index(self.token_id) == first:
                    self._per_size[size] = n
                else:
                    self.cache = False
        if size not in self._need:
            self._need[size] = expected_image_tokens(self.processor, image.height, image.width, self.model_config)
        need = self._need[size]
        if n != need:
            return TemplateCheck(
                False,
                f"{n} image tokens after expansion but the model needs {need} for a {size[0]}x{size[1]} image",
                n,
                need,
                length,
            )
        if self.max_length is not None and length > self.max_length:
            cut = "image tokens" if self.max_length < first + n else "the answer"
            return TemplateCheck(
                False,
                f"{length} tokens exceed max_length {self.max_length}; truncation would cut {cut}",
                n,
                need,
                length,
            )
        return TemplateCheck(True, None, n, need, length)

    def _text_ids(self, text: str) -> list[int] | None:
        """Token ids of the unexpanded text as the processor's tokenizer makes them, or ``None``
        unless the placeholder is exactly one token."""
        ids = list(self.processor.tokenizer(text)["input_ids"])
        return ids if ids.count(self.token_id) == 1 else None


def validate_record_for_processor(
    record: Mapping[str, Any],
    processor: Any,
    *,
    image: Image.Image | None = None,
    images_root: str | Path | None = None,
    model_config: Any = None,
    max_length: int | None = None,
) -> TemplateCheck:
    """Check one seed-schema record against a target model's processor and chat template.

    The full check of :class:`RecordValidator` (no caching): the processor really processes
    ``image`` with the rendered chat, and the image tokens in ``input_ids`` must equal what the
    model needs.

    Args:
        record: the record (image path relative to ``images_root``).
        processor: a transformers multimodal processor with a chat template.
        image: the (resized) image; loaded from ``images_root / record["image"]`` when omitted.
        model_config: the target model's config; without it a processor/model mismatch (e.g.
            llava's ``num_additional_image_tokens``) cannot be seen.
        max_length: the training sequence length limit, if any.

    Returns:
        :class:`TemplateCheck`; ``ok=False`` with a ``reason`` a person can act on.
    """
    validator = RecordValidator(processor, model_config=model_config, max_length=max_length, cache=False)
    return validator(record, image=image, images_root=images_root)


def load_processor(path: str | Path) -> tuple[Any, Any]:
    """``(AutoProcessor, AutoConfig)`` from a local model folder (or hub id, offline cache)."""
    from transformers import AutoConfig, AutoProcessor

    return AutoProcessor.from_pretrained(str(path)), AutoConfig.from_pretrained(str(path))


# --------------------------------------------------------------------------------------------
# Curated export
# --------------------------------------------------------------------------------------------


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
            out.append(f"{self.unreadable_snapshots} reviews have an unreadable stored model snapshot: exported "
                       "without the predictions at review time (status 'labelled')")
        return out


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose a new folder or pass overwrite=True")
        if not (out / "export.json").is_file():
            raise FileExistsError(f"{out} is not a catreview export (no export.json); refusing to replace it")


def _tree_hash(root: Path) -> str:
    """sha256 over ``relative/path\\0sha256(bytes)\\n`` of every file except README/export.json."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in UNHASHED_FILES:
            h.update(f"{rel}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def _process_images(
    jobs: list[tuple[ReviewedRow, str]],
    root: Path,
    *,
    image_size: int,
    quality: int,
    workers: int,
    progress: Progress | None,
) -> Iterator[tuple[ReviewedRow, str, Image.Image | None, str | None]]:
    """Export images in a thread pool (Pillow releases the GIL while decoding/encoding), in
    chunks so memory stays bounded; yields ``(row, relative path, image or None, error)``."""

    def one(job: tuple[ReviewedRow, str]) -> tuple[ReviewedRow, str, Image.Image | None, str | None]:
        row, rel = job
        try:
            return (
                row,
                rel,
                export_image(row.path, row.sha256, root / rel, image_size=image_size, quality=quality),
                None,
            )
        except ExportImageError as exc:
            return row, rel, None, str(exc)

    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(jobs), 128):
            for result in pool.map(one, jobs[start : start + 128]):
                done += 1
                if progress:
                    progress(done, len(jobs))
                yield result


def _manifest_csv(
    records: Sequence[dict[str, Any]],
    splits: Mapping[str, str],
    sizes: Mapping[str, tuple[int, int]],
    copies: Mapping[str, int],
) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "id",
            "split",
            "file",
            "breed",
            "kind",
            "review",
            "confidence_target",
            "annotator",
            "sha256",
            "width",
            "height",
            "copies",
        ]
    )
    for r in records:
        m = r["metadata"]
        width, height = sizes[r["id"]]
        w.writerow(
            [
                r["id"],
                splits[r["id"]],
                r["image"],
                m["breed"],
                m["kind"] or "",
                m["review"],
                m["confidence_target"],
                m["annotator"],
                m["sha256"],
                width,
                height,
                1 + copies.get(m["sha256"], 0),
            ]
        )
    return buf.getvalue()


def _dataset_card(info: dict[str, Any]) -> str:
    counts: dict[str, dict[str, int]] = info["counts"]
    breeds = sorted({b for c in counts.values() for b in c})
    table = ["| Breed | train | validation | test | total |", "|---|---:|---:|---:|---:|"]
    for b in breeds:
        n = [counts[s].get(b, 0) for s in SPLITS]
        table.append(f"| {b} | {n[0]} | {n[1]} | {n[2]} | {sum(n)} |")
    tot = [sum(counts[s].values()) for s in SPLITS]
    table.append(f"| **all** | {tot[0]} | {tot[1]} | {tot[2]} | {sum(tot)} |")
    rows = info["rows_per_split"]
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(info["skipped"].items())) or "none"
    yaml = "\n".join(
        [
            "---",
            "pretty_name: catreview cat breeds",
            "task_categories:",
            "- image-classification",
            "- visual-question-answering",
            "configs:",
            "- config_name: default",
            "  data_files:",
        ]
        + [f"  - split: {s}\n    path: {s}/*" for s in SPLITS if info["rows_per_split"][s]]
        + ["---"]
    )
    o = info["options"]
    return f"""{yaml}
# catreview dataset, export version {info['version']}

Reviewed cat photos exported by catreview on {info['created_at']}.

- Source database: `{info['source_db']}`
- Content hash (sha256 over every file except README.md and export.json): `{info['content_hash']}`
- Seed {o['seed']}; image size {o['image_size']} (shortest side, never enlarged);
  cap per breed: {o['cap_per_breed']}; oversampled train: {o['oversample_train']}; resplit: {o['resplit']}
- Photos: {info['n_photos']}; records per split (with oversampled copies):
  train {rows['train']}, validation {rows['validation']}, test {rows['test']}
- Reviewed photos left out: {skipped}; failed: {len(info['failed'])}

## Photos per breed and split

{chr(10).join(table)}

## Files

- `{{train,validation,test}}/<id>.jpg` + `metadata.jsonl`:
  `datasets.load_dataset("imagefolder", data_dir=...)` (columns `image`, `id`, `breed`, `kind`,
  `confidence_target`, `review`, `annotator`, `sha256`, `predicted_at_review`; a missing text value is
  an empty string, never null: `predicted_at_review` is "" for imported labels, which had no model prediction).
- `llava/<split>.jsonl`: LLaVA `conversations` records (`<image>` once, at the start of the first
  human turn); this folder is the image folder.
- `messages/<split>.jsonl`: TRL `messages` (typed content) + `images`;
  `llamafactory/<split>.jsonl` + `dataset_info.json`: LLaMA-Factory sharegpt.
- `manifest.csv`: one row per photo; `export.json`: machine-readable summary of this version.

Ids are the first 16 hex digits of the photo's sha256 (oversampled copies add `-o<k>`), stable across exports.
Each photo content is in exactly one split, and keeps it across exports unless an export is made with resplit.

`confidence_target` is 1.0 for labels a person decided in catreview (`review` = confirmed / corrected / labelled)
and {o['imported_confidence']} for labels imported from a labelled collection and never reviewed (`review` = imported).

Some classes are coat colours or patterns (Calico, Tabby, Tortoiseshell, Tuxedo...) or random-bred types
(Domestic Short/Medium/Long Hair), not breeds; their answers say so.
"""


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
            each record is checked with :func:`validate_record_for_processor` and failures are
            reported, not written.
        model_config: the target model's config (loaded from ``processor`` when it is a path).
        max_length: training sequence limit for the processor check.
        vocabulary: when given, labels are canonicalised through it and unknown ones skipped;
            also used to compare predictions with labels.
        traits: trait table for answers (default ``assets/breed_traits.json``).
        fractions: train/validation/test shares (three numbers summing to 1).
        overwrite: replace an existing export in ``out_dir`` (only a catreview export).
        workers: image threads (default ``min(4, cpu count)``).
        progress: ``progress(done, total)`` while images are written.

    Returns:
        :class:`ExportSummary`; ``version`` is the new :class:`~catreview.data.db.ExportRecord` id.

    Raises:
        FileExistsError: ``out_dir`` holds something and ``overwrite`` is false (or it is not an
            export).
        ValueError: invalid options.
        ProcessorMismatchError: the processor cannot serve the model (checked before any work).
        ExportError: nothing to export, or every photo failed.
    """
    _check_options(fractions, image_size, cap_per_breed)
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

    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        built = _build_photos(
            plan, tmp, make, validator, image_size=image_size, quality=jpeg_quality,
            workers=workers or min(4, os.cpu_count() or 1), progress=progress,
        )  # fmt: skip
        copies = _copies(built, seed=seed, max_factor=oversample_max_factor) if oversample_train else {}
        by_split = _with_copies(built, copies, make)
        _write_files(tmp, by_split, built, copies)
        info = _export_info(engine, tmp, options, built, by_split, plan.skipped)
        backup = _commit_export(engine, tmp, out, info, built.assignments_to_store(plan.sticky), seed)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    new, changed = built.assignment_changes(plan.sticky)
    rows_per_split = info["rows_per_split"]
    return ExportSummary(
        version=int(info["version"]),
        out_dir=out,
        content_hash=info["content_hash"],
        n_photos=len(built.records),
        rows_per_split=rows_per_split,
        counts=info["counts"],
        skipped=dict(plan.skipped),
        failed=built.failed,
        new_assignments=len(new),
        changed_assignments=len(changed),
        kept_assignments=len(built.records) - len(new) - len(changed),
        oversampled_rows=sum(rows_per_split.values()) - len(built.records),
        created_at=info["created_at"],
        unreadable_snapshots=sum(r.snapshot_unreadable for r in plan.rows),
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
    """Which photos go where: ``rows`` (after the cap), ``splits`` ``{sha256: split}``,
    ``sticky`` (valid stored assignments) and ``skipped`` counts."""

    rows: list[ReviewedRow]
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
        rows, skipped = collect_reviewed_rows(session, vocabulary)
        stored = {a.sha256: FROM_DB_SPLIT.get(a.split, a.split) for a in session.exec(select(SplitAssignment))}
    sticky = {sha: split for sha, split in stored.items() if split in SPLITS}  # unknown values: reassigned
    rows, n_capped = cap_rows(rows, cap, seed=seed)
    if n_capped:
        skipped["capped"] += n_capped
    if not rows:
        raise ExportError("nothing to export: no photo's latest review names a breed")
    ids = [record_id(r.sha256) for r in rows]
    if len(set(ids)) != len(ids):
        raise ExportError("two photos share an id prefix; this needs a longer id (please report)")
    splits = assign_splits({r.sha256: r.label for r in rows}, {} if resplit else sticky, seed=seed, fractions=fractions)
    return _Plan(rows, splits, sticky, skipped)


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
    plan = _plan_export(engine, vocabulary=vocabulary, seed=seed, cap=cap_per_breed, resplit=resplit, fractions=fractions)
    counts: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    for row in plan.rows:
        counts[plan.splits[row.sha256]][row.label] += 1
    return {s: dict(sorted(c.items())) for s, c in counts.items()}


@dataclass
class _Built:
    """Photos written to the temporary folder: their ``records`` (seed schema), and by record id
    the ``row``, ``split`` and ``size`` (W, H px); ``failed`` lists ``(sha256 prefix, reason)``."""

    records: list[dict[str, Any]] = field(default_factory=list)
    row: dict[str, ReviewedRow] = field(default_factory=dict)
    split: dict[str, str] = field(default_factory=dict)
    size: dict[str, tuple[int, int]] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def assignment_changes(self, sticky: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """``(new, changed)`` split assignments ``{sha256: split}`` of the exported photos."""
        exported = {self.row[rid].sha256: s for rid, s in self.split.items()}
        new = {sha: s for sha, s in exported.items() if sha not in sticky}
        changed = {sha: s for sha, s in exported.items() if sha in sticky and sticky[sha] != s}
        return new, changed

    def assignments_to_store(self, sticky: Mapping[str, str]) -> dict[str, str]:
        new, changed = self.assignment_changes(sticky)
        return {**new, **changed}


def _build_photos(
    plan: _Plan,
    tmp: Path,
    make: Callable[..., dict[str, Any]],
    validator: RecordValidator | None,
    *,
    image_size: int,
    quality: int,
    workers: int,
    progress: Progress | None,
) -> _Built:
    """Write every planned photo into ``tmp/<split>/<id>.jpg`` and build its record; photos that
    fail (image or template check) are reported and leave no file."""
    for s in SPLITS:
        (tmp / s).mkdir(parents=True)
    jobs = [(r, f"{plan.splits[r.sha256]}/{record_id(r.sha256)}.jpg") for r in plan.rows]
    built = _Built()
    for row, rel, img, error in _process_images(
        jobs, tmp, image_size=image_size, quality=quality, workers=workers, progress=progress
    ):
        if img is None:
            built.failed.append((row.sha256[:12], error or "image failed"))
            continue
        rec = make(row, rel)
        if validator is not None:
            check = validator(rec, image=img)
            if not check.ok:
                (tmp / rel).unlink()
                built.failed.append((row.sha256[:12], f"template check: {check.reason}"))
                continue
        built.records.append(rec)
        built.row[rec["id"]] = row
        built.split[rec["id"]] = plan.splits[row.sha256]
        built.size[rec["id"]] = img.size
    if not built.records:
        raise ExportError(f"every photo failed; first: {built.failed[0][0]}: {built.failed[0][1]}")
    built.records.sort(key=lambda r: r["id"])
    return built


def _copies(built: _Built, *, seed: int, max_factor: int) -> dict[str, int]:
    train: dict[str, list[str]] = defaultdict(list)
    for r in built.records:
        if built.split[r["id"]] == "train":
            train[r["metadata"]["breed"]].append(r["metadata"]["sha256"])
    return oversample_copies(train, seed=seed, max_factor=max_factor)


def _with_copies(
    built: _Built, copies: Mapping[str, int], make: Callable[..., dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Records per split, each followed by its oversampled copies (own ids and templates)."""
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for r in built.records:
        out = by_split[built.split[r["id"]]]
        out.append(r)
        row = built.row[r["id"]]
        out += [make(row, r["image"], copy=k) for k in range(1, copies.get(row.sha256, 0) + 1)]
    return by_split


def _write_files(
    tmp: Path, by_split: Mapping[str, list[dict[str, Any]]], built: _Built, copies: Mapping[str, int]
) -> None:
    """metadata.jsonl per split, the llava/messages/llamafactory JSONL files, dataset_info.json
    (LLaMA-Factory) and manifest.csv."""
    for s in SPLITS:
        recs = by_split[s]
        if recs:
            write_jsonl((metadata_row(r, Path(r["image"]).name) for r in recs), tmp / s / "metadata.jsonl")
        else:  # an empty split folder makes datasets' imagefolder fail ("corresponds to no data")
            (tmp / s).rmdir()
        write_jsonl(recs, tmp / "llava" / f"{s}.jsonl")
        write_jsonl((to_messages(r, "trl") for r in recs), tmp / "messages" / f"{s}.jsonl")
        write_jsonl((to_messages(r, "llamafactory") for r in recs), tmp / "llamafactory" / f"{s}.jsonl")
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    lf_info = {
        f"catreview_{s}": {
            "file_name": f"llamafactory/{s}.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": tags,
        }
        for s in SPLITS
    }
    (tmp / "dataset_info.json").write_text(json.dumps(lf_info, indent=2) + "\n", encoding="utf-8")
    ordered = sorted(built.records, key=lambda r: (SPLITS.index(built.split[r["id"]]), r["id"]))
    (tmp / "manifest.csv").write_text(_manifest_csv(ordered, built.split, built.size, copies), encoding="utf-8")


def _export_info(
    engine: Engine,
    tmp: Path,
    options: dict[str, Any],
    built: _Built,
    by_split: Mapping[str, list[dict[str, Any]]],
    skipped: Counter[str],
) -> dict[str, Any]:
    """The ``export.json`` content (without ``version``); computes the content hash of ``tmp``."""
    counts = {
        s: dict(sorted(Counter(r["metadata"]["breed"] for r in built.records if built.split[r["id"]] == s).items()))
        for s in SPLITS
    }
    return {
        "format": "catreview-export",
        "format_version": FORMAT_VERSION,
        "created_at": utcnow().isoformat(timespec="seconds"),
        "source_db": redact_url(engine.url),
        "content_hash": _tree_hash(tmp),
        "options": options,
        "n_photos": len(built.records),
        "rows_per_split": {s: len(by_split[s]) for s in SPLITS},
        "counts": counts,
        "skipped": dict(skipped),
        "failed": [list(f) for f in built.failed],
    }


def _commit_export(
    engine: Engine, tmp: Path, out: Path, info: dict[str, Any], assignments: Mapping[str, str], seed: int
) -> Path | None:
    """Record the version and the split assignments, move ``tmp`` to ``out``, then commit.

    The ExportRecord is flushed first (its id is the version written into export.json and the
    card); a failed commit moves the previous export back. Returns the moved-aside previous
    export (to delete) or ``None``.
    """
    now = utcnow()
    with Session(engine) as session:
        for sha, split in assignments.items():
            a = session.get(SplitAssignment, sha)
            if a is None:
                a = SplitAssignment(sha256=sha, split=DB_SPLIT[split], assigned_at=now)
            else:
                a.split, a.assigned_at = DB_SPLIT[split], now
            session.add(a)
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
        (tmp / "README.md").write_text(_dataset_card(info), encoding="utf-8")
        backup = _swap_in(tmp, out)
        try:
            session.commit()
        except Exception:  # any database failure: put the previous export back, then re-raise
            _swap_back(out, backup)
            raise
    return backup


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


def zip_export(out_dir: str | Path, zip_path: str | Path | None = None) -> Path:
    """Zip an export folder for download; returns the zip's path.

    Entries are ``<folder name>/<relative path>``; JPEGs are stored (already compressed), text is
    deflated. Default ``zip_path``: ``<out_dir>.zip`` next to the folder. Written to a temporary
    file and renamed, so a partial zip never appears.

    Raises:
        FileNotFoundError: ``out_dir`` is not a catreview export (no ``export.json``).
    """
    root = Path(out_dir).resolve()
    if not (root / "export.json").is_file():
        raise FileNotFoundError(f"{root} is not a catreview export (no export.json)")
    target = Path(zip_path) if zip_path else root.parent / f"{root.name}.zip"
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    kind = zipfile.ZIP_STORED if p.suffix.lower() in (".jpg", ".jpeg") else zipfile.ZIP_DEFLATED
                    zf.write(p, f"{root.name}/{p.relative_to(root).as_posix()}", compress_type=kind)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------------------------
# Import back
# --------------------------------------------------------------------------------------------


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
    """Seed labels from a LLaVA JSONL export (this module's seed schema).

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
    from catreview.data.importer import get_or_create_image  # the importer's single way to make image rows

    vocab = vocabulary or BreedVocabulary.default()
    root = Path(images_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"images root not found: {root}")
    src = Path(jsonl_path)
    summary = LlavaImportSummary()
    with open(src, encoding="utf-8") as f, Session(engine) as session:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            summary.read += 1
            try:
                rec = json.loads(line)
                problems = check_record(rec) if isinstance(rec, dict) else ["not a JSON object"]
                if problems:
                    raise ValueError("; ".join(problems))
                meta = rec["metadata"]
                if meta["breed"] not in vocab:
                    raise ValueError(f"unknown breed {meta['breed']!r}")
                label = vocab.canonical(meta["breed"])
                path = _resolve_image(root, rec["image"])
                row = image_by_sha(session, meta["sha256"]) if isinstance(meta.get("sha256"), str) else None
                if row is None:
                    sha = sha256_file(path)
                    row, created = get_or_create_image(session, path, sha)
                    summary.images_added += int(created)
                if row.error is not None:
                    raise ValueError(f"image {rec['image']} could not be decoded: {row.error}")
                prev = latest_review(session, row.id)
                if prev is not None and prev.label == label:
                    summary.unchanged += 1
                    continue
                if prev is not None and prev.source != IMPORT_SOURCE:
                    summary.kept_human_label += 1
                    continue
                note = (
                    f"imported from {src.name} record {rec['id']}; "
                    f"original annotator {meta.get('annotator')!r}, review {meta.get('review')!r}"
                )
                if meta.get("note"):
                    note += f"; note: {meta['note']}"
                record_review(
                    session,
                    row.id,
                    label,
                    annotator,
                    vocabulary=vocab,
                    source=IMPORT_SOURCE,
                    note=note,
                    model_snapshot=snapshot_from_predictions(meta.get("predictions_at_review")),
                )
                summary.labels_recorded += 1
            except (ValueError, KeyError, TypeError, OSError, ReviewError) as exc:
                session.rollback()
                summary.errors.append((line_no, str(exc)))
    return summary


def export_info(out_dir: str | Path) -> dict[str, Any]:
    """The ``export.json`` of an export folder. Raises ``FileNotFoundError`` if absent."""
    return json.loads((Path(out_dir) / "export.json").read_text(encoding="utf-8"))


__all__ = [
    "SPLITS",
    "ExportError",
    "ExportSummary",
    "JsonlResult",
    "LlavaImportSummary",
    "ProcessorMismatchError",
    "RecordValidator",
    "TemplateCheck",
    "assign_splits",
    "cap_rows",
    "check_processor",
    "collect_reviewed_rows",
    "export_dataset",
    "export_image",
    "export_info",
    "export_size",
    "import_llava_jsonl",
    "jsonl_line",
    "largest_remainder",
    "model_image_tokens",
    "oversample_copies",
    "preview_splits",
    "read_jsonl",
    "redact_url",
    "validate_record_for_processor",
    "write_jsonl",
    "write_llava_jsonl",
    "zip_export",
]
