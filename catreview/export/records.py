"""The conversation record: the one contract between the exporter, the trainer and the importer.

Every ``llava/<split>.jsonl`` line (and every line of :func:`catreview.export.llava_jsonl.write_llava_jsonl`)
is one :class:`ConversationRecord`, the seed schema of :mod:`catreview.export.conversations`::

    {"id": "3f2a9c0d1b7e4a55", "image": "train/3f2a9c0d1b7e4a55.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat cat breed is this?"},
                       {"from": "gpt", "value": "This is an Abyssinian cat. ..."}],
     "metadata": {"breed": "Abyssinian", "kind": "breed", "confidence_target": 1.0, "review": "confirmed",
                  "annotator": "alice", "source": "ui", "sha256": "3f2a...", "note": null,
                  "predictions_at_review": {"stage1": [{"label", "probability"}, ...], "vlm": [...],
                                            "fused": {"label", "probability"}, "model_versions": {...}}}}

Writers build the models and write :meth:`ConversationRecord.to_json` (the fields they set, in
this order, ``null`` included where they set ``None``), so a record written by the exporter keeps
its exact bytes and a minimal record (``metadata = {"breed": ...}``, see
the tests' ``write_export``) stays minimal. Readers (``training.data.read_export``,
:func:`catreview.export.llava_import.import_llava_jsonl`) parse lines with
:meth:`ConversationRecord.parse`: types are checked strictly (no ``"1"`` for a number), unknown
keys are kept. :func:`check_record` adds the rules a type cannot say (turn order, one ``<image>``,
relative image path, a breed label, a confidence in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from catreview.data.labels import is_breed
from catreview.errors import CatreviewError

IMAGE_TOKEN = "<image>"
ReviewKind = Literal["confirmed", "corrected", "labelled", "imported"]
#: ``metadata.review`` values; see :mod:`catreview.export.conversations`.
REVIEW_KINDS: tuple[str, ...] = get_args(ReviewKind)


class RecordFormatError(CatreviewError, ValueError):
    """A JSON value that is not a conversation record; the message lists each problem as
    ``<field path>: <reason>`` (e.g. ``conversations.0.from: Input should be 'human' or 'gpt'``),
    joined by ``"; "``; :attr:`problems` holds them one by one."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class _Model(BaseModel):
    """Strict types, unknown keys kept, dumped by alias (``from``)."""

    model_config = ConfigDict(
        strict=True, extra="allow", frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )


class Turn(_Model):
    """One conversation turn: ``{"from": "human" | "gpt", "value": text}``."""

    from_: Literal["human", "gpt"] = Field(alias="from")
    value: str


class Prediction(_Model):
    """One label and its probability in [0, 1]."""

    label: str
    probability: float


class PredictionsAtReview(_Model):
    """What the models said when the photo was reviewed (``metadata.predictions_at_review``), in
    an Arrow-friendly form: lists of :class:`Prediction`, never ``{label: prob}`` maps (per-row
    dict keys break ``datasets``' JSON loading)."""

    stage1: list[Prediction] | None = None
    vlm: list[Prediction] | None = None
    fused: Prediction | None = None
    model_versions: dict[str, Any] | None = None


class RecordMetadata(_Model):
    """``metadata`` of a record. Only ``breed`` is required (a hand-made export may carry no more);
    the exporter sets every field (see :mod:`catreview.export.conversations`)."""

    breed: str
    kind: str | None = None
    confidence_target: float | None = None
    review: ReviewKind | None = None
    annotator: str | None = None
    source: str | None = None
    sha256: str | None = None
    note: str | None = None
    predictions_at_review: PredictionsAtReview | None = None


class ConversationRecord(_Model):
    """One LLaVA ``conversations`` record (module docstring); ``image`` is relative to the export root."""

    id: str
    image: str
    conversations: list[Turn]
    metadata: RecordMetadata

    def to_json(self) -> dict[str, Any]:
        """The record as written to JSONL: the fields that were set, in declaration order."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def parse(cls, value: Any) -> ConversationRecord:
        """Validate a decoded JSON value (or an existing record, returned as is).

        Raises:
            RecordFormatError: not a JSON object, or a field missing or of the wrong type.
        """
        if isinstance(value, ConversationRecord):
            return value
        if not isinstance(value, Mapping):
            raise RecordFormatError(["not a JSON object"])
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            raise RecordFormatError(_problems(exc)) from None


def _problems(exc: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors()]


def _prob_list(pairs: Any) -> list[dict[str, Any]] | None:
    if isinstance(pairs, dict):
        pairs = list(pairs.items())
    if not isinstance(pairs, list):
        return None
    out = []
    for p in pairs:
        if isinstance(p, (list, tuple)) and len(p) == 2:
            out.append({"label": str(p[0]), "probability": float(p[1])})
    return out


def predictions_from_snapshot(snapshot: Mapping[str, Any] | None) -> PredictionsAtReview | None:
    """The review snapshot in an Arrow-friendly form for ``metadata.predictions_at_review``.

    ``[[label, prob], ...]`` and ``{label: prob}`` become lists of ``{"label", "probability"}``
    (mixed-type lists and per-row dict keys break ``datasets``' JSON loading)::

        {"stage1": [{"label", "probability"}, ...] | None, "vlm": [...] | None,
         "fused": {"label", "probability"} | None, "model_versions": {...} | None}
    """
    values = predictions_json(snapshot)
    return None if values is None else PredictionsAtReview.model_validate(values)


def predictions_json(snapshot: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """:func:`predictions_from_snapshot` as plain JSON values (what records hold; validating them
    once with the whole record is ~3x faster than building the nested models one by one)."""
    if not snapshot:
        return None
    fused = snapshot.get("fused")
    versions = snapshot.get("model_versions")
    return {
        "stage1": _prob_list(snapshot.get("stage1")),
        "vlm": _prob_list(snapshot.get("vlm")),
        "fused": (
            {"label": str(fused.get("label")), "probability": float(fused.get("probability", 0.0))}
            if isinstance(fused, dict) and fused.get("label") is not None
            else None
        ),
        "model_versions": versions if isinstance(versions, dict) else None,
    }


def snapshot_from_predictions(predictions: PredictionsAtReview | None) -> dict[str, Any] | None:
    """Inverse of :func:`predictions_from_snapshot` (for importing an export back): the review
    ``model_snapshot`` form ``{"stage1": [[label, prob], ...], "vlm": {label: prob} | None,
    "fused": {"label", "probability"} | None, "model_versions": {...}}``."""
    if predictions is None or not (predictions.model_fields_set or predictions.model_extra):
        return None

    def pairs(v: Sequence[Prediction] | None) -> list[list[Any]] | None:
        return [[d.label, d.probability] for d in v] if v is not None else None

    vlm = pairs(predictions.vlm)
    return {
        "stage1": pairs(predictions.stage1) or [],
        "vlm": dict((k, p) for k, p in vlm) if vlm is not None else None,
        "fused": predictions.fused.model_dump(mode="json") if predictions.fused is not None else None,
        "model_versions": predictions.model_versions or {},
    }


def check_record(record: ConversationRecord | Mapping[str, Any]) -> list[str]:
    """Problems of a seed-schema record (empty list: none).

    A mapping is first parsed (:meth:`ConversationRecord.parse`; its type problems are returned
    as they are). Then: non-empty ``id``; ``image`` a relative POSIX path without ``..``; at least
    two turns, alternating human/gpt starting with human, non-empty strings; ``<image>`` exactly
    once in the whole conversation, at the start of the first human turn; ``metadata.breed`` a
    breed; ``confidence_target`` in [0, 1].
    """
    try:
        rec = ConversationRecord.parse(record)
    except RecordFormatError as exc:
        return exc.problems
    errors: list[str] = []
    if not rec.id:
        errors.append("missing id")
    image = rec.image
    if not image:
        errors.append("missing image path")
    elif PurePosixPath(image).is_absolute() or ".." in PurePosixPath(image).parts or "\\" in image:
        errors.append(f"image path {image!r} must be relative to the export root, without '..'")
    turns = rec.conversations
    if len(turns) < 2:
        return [*errors, "conversations must hold at least a human and a gpt turn"]
    for i, turn in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if turn.from_ != want:
            errors.append(f"turn {i} should be from {want!r}")
        elif not turn.value.strip():
            errors.append(f"turn {i} has no text")
    n_image = sum(t.value.count(IMAGE_TOKEN) for t in turns)
    if n_image != 1:
        errors.append(f"{IMAGE_TOKEN} appears {n_image} times; expected exactly once")
    if not turns[0].value.startswith(IMAGE_TOKEN):
        errors.append(f"the first human turn must start with {IMAGE_TOKEN}")
    meta = rec.metadata
    if not is_breed(meta.breed):
        errors.append(f"metadata.breed {meta.breed!r} is not a breed")
    c = meta.confidence_target
    if c is None or not 0.0 <= c <= 1.0:
        errors.append(f"metadata.confidence_target {c!r} is not in [0, 1]")
    return errors


__all__ = [
    "IMAGE_TOKEN",
    "REVIEW_KINDS",
    "ConversationRecord",
    "Prediction",
    "PredictionsAtReview",
    "RecordFormatError",
    "RecordMetadata",
    "ReviewKind",
    "Turn",
    "check_record",
    "predictions_from_snapshot",
    "predictions_json",
    "snapshot_from_predictions",
]
