"""Training data for a LoRA round: the curated export folder -> token batches with masked labels.

Input: an export folder as written by :func:`catreview.export.dataset.export_dataset` (read from the
files, not through the exporter's code; each line is parsed as a
:class:`catreview.export.records.ConversationRecord`, the exporter's own record contract)::

    OUT/export.json                      {"content_hash": ..., ...}
    OUT/{train,validation,test}/<id>.jpg
    OUT/llava/{train,validation,test}.jsonl
        {"id", "image": <path relative to OUT>,
         "conversations": [{"from": "human", "value": "<image>\\nWhat cat breed is this?"},
                           {"from": "gpt", "value": "This is a(n) <Breed> cat. Characteristics: ..."}],
         "metadata": {"breed": <canonical breed>, ...}}

**What is learned (the training target).** The app never generates verdicts: it *scores* each
candidate answer after the verdict prompt of :mod:`catreview.models.vlm.prompts` (stage-1 top-k plus
``"other"``) and softmaxes the length-normalised log-likelihoods (:mod:`catreview.models.vlm.postclassifier`). A round
therefore trains on exactly that (``target="verdict"``, the default; "train on what you
evaluate"): the prompt is ``prompts.verdict_prompt(processor, candidates + ["other"])`` and the
answer is ``vlm.candidate_answer(prompt, breed)`` + the end-of-turn token -- the very token ids
the scorer measures (:func:`catreview.models.vlm.scoring.answer_token_ids`, which also checks the token
boundary; :func:`answer_end_token`). Candidates are the photo's stage-1 top-k at review time
when the export recorded it (``metadata.predictions_at_review.stage1``,
``candidate_source="stage1"``): the exact lists the app scores, answered ``"other"`` when stage 1 missed the breed. Otherwise lists imitate stage 1's
top-k: the true breed plus ``n_candidates - 1`` distractors drawn from the export's breeds,
shuffled; with probability ``other_rate`` the true breed is left out and the answer is
``"other"``, so the escape answer keeps its meaning. ``target="conversation"`` trains on
the export's LLaVA conversation instead (question -> the descriptive answer), and ``"both"``
uses each photo twice; they teach the model to talk about breeds but do not directly optimise the
scored verdict.

**Labels.** ``-100`` on every prompt position, including the expanded image tokens (the prompt
length is counted on the processor's output, after image expansion); the answer tokens and the
appended end-of-turn token are the targets. That token is the one the chat template writes right
after an assistant answer (:func:`catreview.models.vlm.prompts.end_of_turn_token`: ``</s>`` for llava-1.5,
``<|im_end|>`` for ChatML, ``<end_of_utterance>`` for Idefics3), else the tokenizer's
``eos_token`` -- the same rule as the scorer (``VLMPostClassifier._eos_token``), which counts it
as part of every answer. It can differ from ``eos_token`` (Idefics3-8B-Llama3 ends turns with
``<end_of_utterance>``, its ``eos_token`` is ``<|end_of_text|>``); without it the model never
learns to stop where the scorer measures.

**Splits.** ``train`` is learned, ``validation`` evaluates during the round (best checkpoint,
early stopping), ``test`` is scored once per model -- the base model and the active adapter
before training, the selected checkpoint after it -- only for the gate
(:func:`catreview.adapters.gate.gate`).

All randomness (distractors, "other" prompts) is a pure function of ``(seed, epoch, index)``, so
a resumed round sees exactly the prompts an uninterrupted one would.

Shapes: B photos per batch, L padded sequence length (prompt incl. image tokens + answer).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from catreview.adapters.train_config import TrainConfig
from catreview.data.images import load_rgb
from catreview.errors import CatreviewError
from catreview.export.records import IMAGE_TOKEN, ConversationRecord, RecordFormatError, RecordMetadata
from catreview.files import iter_jsonl_lines
from catreview.models.vlm import prompts

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "validation", "test")


class ExportFormatError(CatreviewError, ValueError):
    """The export folder does not have the documented layout; the message names file and line."""


@dataclass(frozen=True)
class Example:
    """One exported photo.

    Attributes:
        id: the export's record id.
        image: absolute path of the exported photo.
        breed: canonical breed name (``metadata.breed``).
        split: ``train``, ``validation`` or ``test``.
        question: the human turn without the ``<image>`` placeholder.
        answer: the assistant turn (``"This is a Bengal cat. ..."``).
        stage1: stage 1's top-k labels when the photo was reviewed
            (``metadata.predictions_at_review.stage1``), or ``None`` when not recorded.
    """

    id: str
    image: Path
    breed: str
    split: str
    question: str
    answer: str
    stage1: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ExportData:
    """A parsed export folder.

    Attributes:
        root: the folder.
        content_hash: the export's content hash (``export.json``), stored with adapter versions.
        splits: ``{split: [Example, ...]}`` in file order; a missing split file is an empty list.
    """

    root: Path
    content_hash: str
    splits: dict[str, list[Example]]

    @property
    def train(self) -> list[Example]:
        return self.splits["train"]

    @property
    def validation(self) -> list[Example]:
        return self.splits["validation"]

    @property
    def test(self) -> list[Example]:
        """Held out from training *and* model selection: only the gate scores it (once per model)."""
        return self.splits["test"]

    @property
    def breeds(self) -> list[str]:
        """Sorted breeds of the train and validation splits (the distractor pool)."""
        return sorted({e.breed for e in self.train} | {e.breed for e in self.validation})


def _parse_record(value: Any, root: Path, split: str, where: str) -> Example:
    """One decoded JSONL line -> :class:`Example` (through :meth:`ConversationRecord.parse`).

    Raises:
        ExportFormatError: not a record (the field problems are named), no human or no gpt turn,
            or the image file is missing.
    """
    lacks = f"{where}: record lacks id/image/conversations (human+gpt)/metadata.breed"
    try:
        rec = ConversationRecord.parse(value)
    except RecordFormatError as exc:
        raise ExportFormatError(f"{lacks} ({exc})") from exc
    human = next((t.value for t in rec.conversations if t.from_ == "human"), None)
    gpt = next((t.value for t in rec.conversations if t.from_ == "gpt"), None)
    if human is None or gpt is None:
        raise ExportFormatError(f"{lacks} (no {'human' if human is None else 'gpt'} turn)")
    image = root / rec.image
    if not image.is_file():
        raise ExportFormatError(f"{where}: image {image} does not exist")
    question = human.replace(IMAGE_TOKEN, "").strip()
    return Example(
        id=rec.id,
        image=image.resolve(),
        breed=rec.metadata.breed,
        split=split,
        question=question,
        answer=gpt.strip(),
        stage1=_stage1_labels(rec.metadata),
    )


def _stage1_labels(metadata: RecordMetadata) -> tuple[str, ...] | None:
    """Stage-1 top-k labels from ``metadata.predictions_at_review.stage1`` (list of
    ``{"label", "probability"}``), ``None`` when absent or empty."""
    preds = metadata.predictions_at_review.stage1 if metadata.predictions_at_review is not None else None
    if preds is None:
        return None
    return tuple(dict.fromkeys(p.label for p in preds if p.label)) or None


def same_label(a: str, b: str) -> bool:
    """Labels equal up to spelling (``Maine_Coon`` == ``maine coon``), as the prompts show them."""
    return prompts.display_name(a).casefold() == prompts.display_name(b).casefold()


def answer_for(breed: str, candidates: Sequence[str]) -> str:
    """What the app should answer for a photo of ``breed`` offered ``candidates``: the matching
    candidate, or :data:`catreview.models.vlm.prompts.OTHER_LABEL` when none matches."""
    return next((c for c in candidates if same_label(c, breed)), prompts.OTHER_LABEL)


def export_content_hash(root: Path) -> str:
    """The content hash from ``export.json`` (key ``content_hash``, else ``hash``/``export_hash``).

    Without ``export.json`` or such a key, the sha256 of the three JSONL files is used (so a
    hand-made export still gets a stable identity).
    """
    meta = root / "export.json"
    if meta.is_file():
        data = json.loads(meta.read_text(encoding="utf-8"))
        for key in ("content_hash", "hash", "export_hash"):
            if isinstance(data.get(key), str) and data[key]:
                return data[key]
    h = hashlib.sha256()
    for split in SPLITS:
        f = root / "llava" / f"{split}.jsonl"
        h.update(split.encode() + (f.read_bytes() if f.is_file() else b""))
    return "jsonl-" + h.hexdigest()


def read_export(root: str | Path) -> ExportData:
    """Parse an export folder (see the module docstring).

    Raises:
        ExportFormatError: no ``llava/train.jsonl``, a malformed line, or a missing image.
    """
    root = Path(root).resolve()
    if not (root / "llava" / "train.jsonl").is_file():
        raise ExportFormatError(f"{root} is not an export folder: llava/train.jsonl is missing")
    splits: dict[str, list[Example]] = {}
    for split in SPLITS:
        path = root / "llava" / f"{split}.jsonl"
        items: list[Example] = []
        if path.is_file():
            for n, line in iter_jsonl_lines(path):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ExportFormatError(f"{where}: not JSON ({exc})") from exc
                items.append(_parse_record(rec, root, split, where))
        splits[split] = items
    return ExportData(root=root, content_hash=export_content_hash(root), splits=splits)


def subsample(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """The first ``n`` examples after a seeded shuffle, in their original order (all if ``None``)."""
    if n is None or n >= len(examples):
        return list(examples)
    keep = set(random.Random(f"subsample/{seed}").sample(range(len(examples)), n))
    return [e for i, e in enumerate(examples) if i in keep]


# --------------------------------------------------------------------------------------------
# Samples: what one training / evaluation row asks and answers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One row before tokenisation.

    Attributes:
        image: photo path (decoded with :func:`catreview.data.images.load_rgb`).
        breed: the photo's breed (for weights and metrics).
        kind: ``"verdict"`` or ``"conversation"``.
        candidates: verdict labels in prompt order, ``"other"`` last (``()`` for conversations).
        target: verdict: the label answered (the breed or ``"other"``); conversation: the answer
            text.
        weight: loss weight (1.0 unless ``balance="loss"``).
        question: conversation: the human turn without ``<image>`` (unused for verdicts).
    """

    image: Path
    breed: str
    kind: Literal["verdict", "conversation"]
    candidates: tuple[str, ...]
    target: str
    weight: float = 1.0
    question: str = ""


def sample_candidates(
    breed: str, pool: Sequence[str], k: int, rng: random.Random, *, include_true: bool = True
) -> list[str]:
    """A stage-1-like candidate list: ``breed`` (unless ``include_true`` is false) plus
    distractors from ``pool``, ``k`` names in all (fewer when the pool is small), shuffled.

    Without ``include_true`` at least one name is returned; if the pool has no other breed the
    true breed is kept.
    """
    others = [b for b in pool if b != breed]
    if not include_true and others:
        chosen = rng.sample(others, min(k, len(others)))
    else:
        chosen = [breed, *rng.sample(others, min(k - 1, len(others)))]
    rng.shuffle(chosen)
    return chosen


def class_weights(breeds: Sequence[str]) -> dict[str, float]:
    """``N / (C * count(breed))`` per breed: mean weight over the examples is 1 (loss balancing)."""
    counts = Counter(breeds)
    n, c = len(breeds), len(counts)
    return {b: n / (c * k) for b, k in counts.items()}


class TrainDataset:
    """Map-style dataset of :class:`Sample` for the training split.

    Index ``i < N`` is photo ``i``'s verdict row (``target="verdict"`` or ``"both"``), index
    ``N + i`` its conversation row (``"both"``); ``"conversation"`` has only conversation rows.
    :meth:`select_epoch` changes the per-row random choices (distractors, "other"), which are a
    pure function of ``(seed, epoch, index)``. (Not named ``set_epoch``: accelerate's data loader
    calls ``dataset.set_epoch(<its own iteration count>)``, which restarts at 0 for the loader a
    resumed round skips batches with.)
    """

    def __init__(self, examples: Sequence[Example], pool: Sequence[str], cfg: TrainConfig) -> None:
        if not examples:
            raise ValueError("the export's train split is empty: review some photos first")
        self.examples = list(examples)
        self.pool = list(pool)
        self.cfg = cfg
        self.epoch = 0
        kinds = {"verdict": ["verdict"], "conversation": ["conversation"], "both": ["verdict", "conversation"]}
        self.kinds: list[str] = kinds[cfg.target]
        self.loss_weights = class_weights([e.breed for e in self.examples]) if cfg.balance == "loss" else None

    def select_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s random choices from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples) * len(self.kinds)

    def breed_of(self, index: int) -> str:
        return self.examples[index % len(self.examples)].breed

    def sampling_weights(self) -> list[float]:
        """Per-index ``1 / count(breed)`` (for ``WeightedRandomSampler``)."""
        counts = Counter(e.breed for e in self.examples)
        return [1.0 / counts[self.breed_of(i)] for i in range(len(self))]

    def __getitem__(self, index: int) -> Sample:
        ex = self.examples[index % len(self.examples)]
        kind = self.kinds[index // len(self.examples)]
        weight = self.loss_weights[ex.breed] if self.loss_weights else 1.0
        if kind == "conversation":
            return Sample(ex.image, ex.breed, "conversation", (), ex.answer, weight, question=ex.question)
        if self.cfg.candidate_source == "stage1" and ex.stage1:
            cands = list(ex.stage1)
            return Sample(
                ex.image, ex.breed, "verdict", tuple(prompts.with_other(cands)), answer_for(ex.breed, cands), weight
            )
        rng = random.Random(f"train/{self.cfg.seed}/{self.epoch}/{index}")
        use_other = rng.random() < self.cfg.other_rate and len(self.pool) > self.cfg.n_candidates
        cands = sample_candidates(ex.breed, self.pool, self.cfg.n_candidates, rng, include_true=not use_other)
        target = prompts.OTHER_LABEL if use_other else ex.breed
        return Sample(ex.image, ex.breed, "verdict", tuple(prompts.with_other(cands)), target, weight)


@dataclass(frozen=True)
class EvalItem:
    """One evaluation photo (validation or test) with its fixed candidate list (``"other"`` not
    included) and the correct answer among them (the breed's candidate, or ``"other"`` when it is
    not offered)."""

    image: Path
    breed: str
    candidates: tuple[str, ...]
    target: str

    def sample(self) -> Sample:
        """The verdict row answering :attr:`target` (for validation loss)."""
        return Sample(self.image, self.breed, "verdict", tuple(prompts.with_other(self.candidates)), self.target)


def eval_items(examples: Sequence[Example], pool: Sequence[str], cfg: TrainConfig) -> list[EvalItem]:
    """Validation (or test) photos with the candidate lists they are scored over -- fixed for the
    whole round (and the baseline), so every evaluation compares like with like.

    Per photo, in order of preference:

    * ``candidate_source="stage1"`` and the export recorded stage 1's top-k at review time: that
      list, in stage-1 order -- exactly what the app scored for this photo. When the true breed
      is not in it the correct answer is ``"other"``.
    * ``eval_candidates="sampled"``: the true breed + ``n_candidates - 1`` distractors seeded by
      ``(seed, photo id)``, the shape of stage 1's top-k (chance = ``1 / n_candidates``).
      Random distractors are easier than stage 1's confusable ones: absolute accuracies are
      optimistic, comparisons between adapters on the same items are fair.
    * ``eval_candidates="all"``: every breed of the export, sorted.
    """
    items = []
    for ex in examples:
        if cfg.candidate_source == "stage1" and ex.stage1:
            cands = list(ex.stage1)
        elif cfg.eval_candidates == "all":
            cands = sorted(set(pool) | {ex.breed})
        else:
            cands = sample_candidates(ex.breed, pool, cfg.n_candidates, random.Random(f"eval/{cfg.seed}/{ex.id}"))
        items.append(EvalItem(ex.image, ex.breed, tuple(cands), answer_for(ex.breed, cands)))
    return items


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


def render(processor: Any, sample: Sample) -> tuple[str, str]:
    """``(prompt, answer)`` strings of ``sample`` through the processor's chat template.

    The answer carries its separating space (never the prompt), exactly as the scorer builds it.
    """
    from catreview.models.vlm.scoring import answer_prefix, candidate_answer

    if sample.kind == "verdict":
        prompt = prompts.verdict_prompt(processor, list(sample.candidates))
        return prompt, candidate_answer(prompt, sample.target)
    prompt = prompts.build_chat(processor, sample.question)
    return prompt, answer_prefix(prompt) + sample.target


def answer_end_token(processor: Any) -> str | None:
    """The token appended to every answer: the chat template's end of turn
    (:func:`catreview.models.vlm.prompts.end_of_turn_token`), else the tokenizer's ``eos_token``; ``None``
    when there is neither. The scorer's rule (``catreview.models.vlm.postclassifier.VLMPostClassifier._eos_token``), so
    training teaches exactly the tokens scoring measures.

    Raises:
        ValueError: the processor has no chat template.
    """
    return prompts.end_of_turn_token(processor) or processor.tokenizer.eos_token or None


class Collator:
    """Batches :class:`Sample` rows into model inputs with masked labels.

    Output (``dict`` of tensors): ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) int64
    (right padded), ``labels`` (B, L) int64 (``-100`` except answer + end-of-turn token,
    :func:`answer_end_token`), ``weights`` (B,)
    float32, ``answer_start`` (B,) int64 (index of each row's first answer token), plus every
    other processor output (``pixel_values`` (B, 3, H, W) float32, ``image_sizes`` ...). Per-row
    (B, L_prompt) extras such as ``mm_token_type_ids`` are extended with zeros over the answer.

    Args:
        processor: the model's ``AutoProcessor``.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        tok = processor.tokenizer
        end = answer_end_token(processor)
        #: id of the token appended to every answer (the scorer's ``_eos_id()``), ``None``: nothing.
        self.eos_id: int | None = None if end is None else tok.convert_tokens_to_ids(end)
        self.pad_id: int = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        import torch

        from catreview.models.vlm.scoring import answer_token_ids, pad_right

        texts, answers = [], []
        for s in samples:
            prompt, answer = render(self.processor, s)
            texts.append(prompt)
            answers.append(answer_token_ids(self.processor.tokenizer, prompt, answer, eos_id=self.eos_id))
        enc = self.processor(
            images=[load_rgb(s.image) for s in samples],
            text=texts,
            return_tensors="pt",
            padding=True,
            padding_side="right",
        )
        prompt_len = enc["attention_mask"].sum(dim=1)  # (B,) after image-token expansion
        rows = [enc["input_ids"][i, : prompt_len[i]].tolist() + answers[i] for i in range(len(samples))]
        ids, mask = pad_right(rows, self.pad_id)
        labels = torch.full_like(ids, -100)
        for i, ans in enumerate(answers):
            start = int(prompt_len[i])
            labels[i, start : start + len(ans)] = torch.tensor(ans, dtype=torch.long)
        batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        width_in = enc["input_ids"].shape[1]
        for key, value in enc.items():
            if key in batch:
                continue
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (len(samples), width_in):
                extended = torch.zeros((len(samples), ids.shape[1]), dtype=value.dtype)
                for i in range(len(samples)):
                    extended[i, : prompt_len[i]] = value[i, : prompt_len[i]]
                value = extended
            batch[key] = value
        batch["weights"] = torch.tensor([s.weight for s in samples], dtype=torch.float32)
        batch["answer_start"] = prompt_len.to(torch.long)
        return batch


MODEL_INPUT_EXCLUDE = frozenset({"labels", "weights", "answer_start"})
"""Collator keys that are not model inputs."""


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without the collator's bookkeeping keys (:data:`MODEL_INPUT_EXCLUDE`)."""
    return {k: v for k, v in batch.items() if k not in MODEL_INPUT_EXCLUDE}
