"""Conversation records for VLM fine-tuning, built from reviewed photos.

One record per photo whose latest review names a breed (``Not a cat``/``Unsure`` are skipped by
the callers and counted). The seed schema is LLaVA's ``conversations`` form
(https://github.com/haotian-liu/LLaVA, ``llava_v1_5_mix665k.json``), typed by
:class:`catreview.export.records.ConversationRecord`::

    {"id": "3f2a9c0d1b7e4a55",
     "image": "train/3f2a9c0d1b7e4a55.jpg",            # relative to the export root
     "conversations": [
        {"from": "human", "value": "<image>\\nWhat cat breed is this?"},
        {"from": "gpt", "value": "This is an Abyssinian cat. Characteristics: ..."}],
     "metadata": {"breed": "Abyssinian", "confidence_target": 1.0, "review": "confirmed",
                  "annotator": "alice", "predictions_at_review": {...}, ...}}

and :func:`to_messages` turns the same record into the ``messages`` + ``images`` form of TRL
(typed content, ``{"type": "image"}``) or LLaMA-Factory (``"<image>"`` inside the text).

Rules kept here, tested in ``tests/test_exports.py``:

* ``<image>`` appears exactly once, at the start of the first human turn (checked by
  :func:`catreview.export.records.check_record`).
* Ids derive from the photo's sha256 (:func:`record_id`), so they are stable across exports.
* Question and answer templates are chosen per photo from a hash of its sha256 (and the copy
  number for oversampled copies): deterministic, yet varied across photos.
* Articles follow the sound of the name: an Abyssinian, an American Shorthair, a Bengal.

``confidence_target`` (a soft-label target for the answer, in [0, 1]):

* ``1.0`` when a person decided the label in catreview: ``review`` is ``"confirmed"`` (the
  label equals the fused model prediction shown at review time), ``"corrected"`` (it differs), or
  ``"labelled"`` (a person labelled it with no model prediction recorded).
* :data:`IMPORTED_CONFIDENCE` (0.8) for ``"imported"`` labels: taken from a labelled collection
  (review source ``"import"``) and never looked at in catreview. The users' Petfinder-derived
  labels are owner-entered and noisy; 0.8 keeps them useful without claiming certainty. An
  imported label that carries a model snapshot (a re-imported catreview export) keeps its
  original ``confirmed``/``corrected`` status and 1.0.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, Literal

from catreview.data.labels import BreedVocabulary, UnknownLabelError, is_breed, normalise
from catreview.export.records import IMAGE_TOKEN, REVIEW_KINDS, ConversationRecord, ReviewKind, predictions_json
from catreview.export.rows import ReviewedRow
from catreview.export.traits import BreedTraits, TraitTable
from catreview.models.vlm.prompts import indefinite_article

HUMAN_CONFIDENCE = 1.0
IMPORTED_CONFIDENCE = 0.8
IMPORT_SOURCE = "import"

QUESTION_TEMPLATES: tuple[str, ...] = (
    "What cat breed is this?",
    "Which breed is the cat in this photo?",
    "What breed of cat is shown here?",
    "Can you identify this cat's breed?",
    "Identify the breed of the cat in the image.",
)
"""User questions; one is picked per photo by :func:`template_indices`."""

ANSWER_TEMPLATES: tuple[str, ...] = (
    "This is {a_name_cat}.",
    "The cat in this photo is {a_name}.",
    "This cat is {a_name}.",
    "It is {a_name_cat}.",
)
"""Answer openings; ``" Characteristics: <traits>"`` follows when traits are known."""

_HEX = re.compile(r"[0-9a-f]{16,64}")
ID_HEX_CHARS = 16
"""Record ids are the first 16 hex digits (64 bits) of the photo's sha256; collisions among
127K photos have probability ~1e-9, and exports check for them anyway."""


def display_label(label: str, traits: BreedTraits | None) -> str:
    """The name used in answers: the traits file's ``display``, else the label with spaces."""
    return traits.display if traits else " ".join(label.replace("_", " ").split())


def record_id(sha256: str, copy: int = 0) -> str:
    """Stable record id: the first :data:`ID_HEX_CHARS` hex digits of the photo's sha256;
    oversampled copies (``copy >= 1``) get ``-o<copy>``.

    Raises:
        ValueError: ``sha256`` is not a hex digest of at least 16 characters.
    """
    sha = sha256.lower()
    if not _HEX.fullmatch(sha):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    base = sha[:ID_HEX_CHARS]
    return base if copy == 0 else f"{base}-o{copy}"


def template_indices(sha256: str, copy: int = 0) -> tuple[int, int]:
    """``(question index, answer index)`` for a photo, from a hash of its sha256 and ``copy``."""
    h = int.from_bytes(hashlib.sha256(f"{sha256}:{copy}".encode()).digest()[:8], "big")
    return h % len(QUESTION_TEMPLATES), (h // len(QUESTION_TEMPLATES)) % len(ANSWER_TEMPLATES)


def answer_text(label: str, traits: BreedTraits | None, template: int = 0) -> str:
    """The assistant's answer for ``label``.

    ``"This is an Abyssinian cat. Characteristics: <traits>"``; a name already ending in
    "Cat" gets no second "cat" (a Norwegian Forest Cat). Without traits, only the first sentence.
    """
    name = display_label(label, traits)
    name_cat = name if name.lower().endswith(" cat") else f"{name} cat"
    text = ANSWER_TEMPLATES[template % len(ANSWER_TEMPLATES)].format(
        a_name=f"{indefinite_article(name)} {name}", a_name_cat=f"{indefinite_article(name_cat)} {name_cat}"
    )
    return f"{text} Characteristics: {traits.traits}" if traits else text


def _same_label(a: str, b: str, vocabulary: BreedVocabulary | None) -> bool:
    if vocabulary is not None:
        try:
            return vocabulary.canonical(a) == vocabulary.canonical(b)
        except UnknownLabelError:
            pass
    return normalise(a) == normalise(b)


def review_kind(row: ReviewedRow, vocabulary: BreedVocabulary | None = None) -> ReviewKind:
    """One of :data:`~catreview.export.records.REVIEW_KINDS` (see the module docstring)."""
    fused = (row.snapshot or {}).get("fused")
    if isinstance(fused, dict) and isinstance(fused.get("label"), str):
        return "confirmed" if _same_label(fused["label"], row.label, vocabulary) else "corrected"
    return "imported" if row.source == IMPORT_SOURCE else "labelled"


def confidence_target(kind: str, imported_confidence: float = IMPORTED_CONFIDENCE) -> float:
    """Answer confidence for a review kind: 1.0 for human decisions, ``imported_confidence``
    for ``"imported"``. Raises ``ValueError`` for an unknown kind."""
    if kind not in REVIEW_KINDS:
        raise ValueError(f"unknown review kind {kind!r}; expected one of {REVIEW_KINDS}")
    return imported_confidence if kind == "imported" else HUMAN_CONFIDENCE


def build_record(
    row: ReviewedRow,
    image: str,
    *,
    traits: TraitTable,
    copy: int = 0,
    vocabulary: BreedVocabulary | None = None,
    imported_confidence: float = IMPORTED_CONFIDENCE,
) -> dict[str, Any]:
    """The seed-schema record (module docstring) for one reviewed photo, in its JSON form
    (:meth:`catreview.export.records.ConversationRecord.to_json`, the form written to JSONL).

    Args:
        row: the photo and its latest review; ``row.label`` must name a breed.
        image: image path as it should appear in the record (relative to the export root).
        traits: trait table for the answer text; labels it lacks get an answer without
            "Characteristics".
        copy: 0 for the photo itself, k >= 1 for the k-th oversampled copy (own id suffix
            and own template choice).
        vocabulary: used to compare the fused prediction with the label (aliases).
        imported_confidence: ``confidence_target`` for imported labels.

    Raises:
        ValueError: ``row.label`` is not a breed (``Not a cat``/``Unsure``) or the sha256 is
            malformed.
    """
    if not is_breed(row.label):
        raise ValueError(f"photo {row.sha256[:12]} is labelled {row.label!r}, not a breed")
    q, a = template_indices(row.sha256, copy)
    t = traits.get(row.label)
    kind = review_kind(row, vocabulary)
    record = {
        "id": record_id(row.sha256, copy),
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION_TEMPLATES[q]}"},
            {"from": "gpt", "value": answer_text(row.label, t, a)},
        ],
        "metadata": {
            "breed": row.label,
            "kind": t.kind if t else None,
            "confidence_target": confidence_target(kind, imported_confidence),
            "review": kind,
            "annotator": row.annotator,
            "source": row.source,
            "sha256": row.sha256,
            "note": row.note,
            "predictions_at_review": predictions_json(row.snapshot),
        },
    }
    # Checked against the contract (RecordFormatError on a violation). Strict types coerce
    # nothing but an int to a float, so the checked values are the JSON form; writing them (not a
    # dump of the model) also keeps an integer ``imported_confidence`` as it was written before.
    ConversationRecord.parse(record)
    return record


def _split_image_text(value: str) -> tuple[bool, str]:
    """``(starts with <image>, remaining text)``; one newline after the placeholder is dropped."""
    if value.startswith(IMAGE_TOKEN):
        rest = value[len(IMAGE_TOKEN) :]
        return True, rest[1:] if rest.startswith("\n") else rest
    return False, value


def to_messages(record: Mapping[str, Any], style: Literal["trl", "llamafactory"] = "trl") -> dict[str, Any]:
    """The record as ``{"id", "messages", "images", "metadata"}``.

    * ``"trl"``: typed content, the form ``processor.apply_chat_template`` and TRL's
      ``SFTTrainer`` take: user ``[{"type": "image"}, {"type": "text", "text": q}]``,
      assistant ``[{"type": "text", "text": a}]``.
    * ``"llamafactory"``: LLaMA-Factory's sharegpt "messages" form, string content with
      ``<image>`` where the image goes.

    ``images`` holds the record's image path (relative to the export root). A ``<image>``
    appearing anywhere but the start of the first human turn is left inside the text, so a
    malformed record stays visibly malformed (and fails
    :func:`catreview.export.records.check_record`).
    """
    if style not in ("trl", "llamafactory"):
        raise ValueError(f"unknown messages style {style!r}; use 'trl' or 'llamafactory'")
    role = {"human": "user", "gpt": "assistant"}
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(record["conversations"]):
        r = role.get(turn["from"], turn["from"])
        value = turn["value"]
        if style == "llamafactory":
            messages.append({"role": r, "content": value})
            continue
        has_image, text = _split_image_text(value) if i == 0 else (False, value)
        content: list[dict[str, Any]] = [{"type": "image"}] if has_image else []
        content.append({"type": "text", "text": text})
        messages.append({"role": r, "content": content})
    return {"id": record["id"], "messages": messages, "images": [record["image"]], "metadata": record.get("metadata")}


#: Columns of an imagefolder ``metadata.jsonl`` row (after ``file_name``) and their one JSON type.
METADATA_COLUMNS: dict[str, type] = {
    "id": str,
    "breed": str,
    "kind": str,
    "confidence_target": float,
    "review": str,
    "annotator": str,
    "sha256": str,
    "predicted_at_review": str,
}


def metadata_row(record: Mapping[str, Any], file_name: str) -> dict[str, Any]:
    """Flat row for an imagefolder ``metadata.jsonl``: ``file_name`` plus scalar metadata
    (nested predictions are left to the conversation files).

    Every column has one type whatever the row (:data:`METADATA_COLUMNS`) and is never null: a
    missing string is ``""`` (``predicted_at_review`` of an imported label, which has no model
    prediction; ``kind`` of a label without traits), ``confidence_target`` is always a float.
    ``datasets`` infers each split's schema from its own rows, so a split whose rows were all
    null would get a null-typed column and the export would not load ("Metadata files ... have
    different features").
    """
    meta = record.get("metadata") or {}
    fused = (meta.get("predictions_at_review") or {}).get("fused") or {}

    def text(value: Any) -> str:
        return "" if value is None else str(value)

    return {
        "file_name": file_name,
        "id": text(record["id"]),
        "breed": text(meta.get("breed")),
        "kind": text(meta.get("kind")),
        "confidence_target": float(meta.get("confidence_target", 0.0)),
        "review": text(meta.get("review")),
        "annotator": text(meta.get("annotator")),
        "sha256": text(meta.get("sha256")),
        "predicted_at_review": text(fused.get("label")),
    }
