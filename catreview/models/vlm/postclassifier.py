"""Stage 2: a VLM post-classifier that re-ranks stage-1's top-k breeds.

Any ``transformers`` image-text-to-text checkpoint with a chat template works (LLaVA-1.5,
LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Idefics3, Pixtral ...): it is loaded with
``AutoProcessor`` + ``AutoModelForImageTextToText`` and prompted through the processor's own chat
template (:mod:`catreview.models.vlm.prompts`). The tiny offline models of :mod:`catreview.models.tiny_vlms` load
through the same path.

Verdicts are **scored, not generated**. For a photo with candidates ``c_1..c_k`` (stage-1 top-k
plus ``"other"``), the verdict prompt is rendered once and each candidate's answer tokens
``a_1..a_n`` (``" Maine Coon"`` + EOS) are scored by teacher forcing::

    score(c) = sum_j log p(a_j | image, prompt, a_<j)          (score_normalisation="sum")
    score(c) = score_sum(c) / n                                (score_normalisation="mean")
    p(c)     = softmax_c(score(c))

``"mean"`` (default) is length-normalised: a two-token name (" Maine"+" Coon"+EOS = 3 tokens)
is not penalised against a one-token name (" Bengal"+EOS = 2 tokens). ``"sum"`` is the exact
sequence log-likelihood and favours short names. Both are softmaxed over the candidates, so the
probabilities are relative to the candidate set, not absolute.

Implementation (:meth:`VLMPostClassifier.score_candidates`): one shared prefill of image +
prompt for several photos (right padding, ``use_cache=True``, logits only at each row's last
prompt token), then ONE forward over all candidates of each photo packed into one row: a 4D
attention mask lets each candidate token see its photo's prompt and its own earlier tokens only,
and explicit position ids restart after the prompt for every candidate (plus the M-RoPE offset
for Qwen2-VL-style models). The vision tower and the prompt run once per photo, not once per
candidate, and the KV cache is neither copied nor expanded per candidate (an earlier version
expanded it with ``Cache.batch_select_indices``: k copies of a 576-image-token cache cost more
than the candidate tokens themselves).
:meth:`VLMPostClassifier.score_candidates_reference` computes the same numbers the slow way (one
full forward per candidate) and is the oracle in the tests.

Errors a user can act on are raised as :class:`VLMError` with a plain message.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catreview.config import VLMProfile
from catreview.errors import CatreviewError
from catreview.models.vlm import prompts
from catreview.models.vlm.prompts import PROMPT_VERSION

if TYPE_CHECKING:  # heavy imports stay lazy: importing this module must not import torch
    import torch
    from PIL import Image

DEFAULT_VERDICT_TOKENS = 20
"""``max_new_tokens`` of :meth:`VLMPostClassifier.generate_verdict` (benchmark comparison)."""


class VLMError(CatreviewError, RuntimeError):
    """A stage-2 problem the user can act on (configuration, missing model, memory).

    The message says what happened and what to change; the original exception, if any, is
    chained as ``__cause__``.
    """


class TokenBoundaryError(VLMError):
    """The prompt's tokens are not a prefix of prompt + answer tokens (see :func:`answer_token_ids`)."""


@dataclass(frozen=True)
class VLMVerdict:
    """Stage-2 verdict for one photo.

    Attributes:
        candidates: labels scored, stage-1 order, :data:`catreview.models.vlm.prompts.OTHER_LABEL` last.
        probabilities: softmax of ``scores``; floats in [0, 1], same length, sum to 1.
        scores: the normalised log-probabilities used (``<= 0``; mean or sum per profile).
        label: the candidate with the highest probability.
        confidence: its probability.
        model_version: :attr:`VLMPostClassifier.model_version` that produced it.
        extra: optional diagnostics, not compared (``generate_verdict`` puts the raw answer
            text under ``"answer"``).
    """

    candidates: list[str]
    probabilities: list[float]
    scores: list[float]
    label: str
    confidence: float
    model_version: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_scores(cls, candidates: Sequence[str], scores: Sequence[float], model_version: str) -> VLMVerdict:
        """Softmax ``scores`` (finite or ``-inf``; at least one finite) into a verdict."""
        import math

        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        total = sum(exps)
        probs = [e / total for e in exps]
        best = max(range(len(probs)), key=probs.__getitem__)
        return cls(
            candidates=list(candidates),
            probabilities=probs,
            scores=[float(s) for s in scores],
            label=candidates[best],
            confidence=probs[best],
            model_version=model_version,
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when available else ``cpu``; anything else is passed to torch.

    Raises:
        VLMError: a CUDA device was asked for and CUDA is not available.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VLMError(f"device {device!r} was asked for but CUDA is not available here; use device = \"cpu\"")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA, float32 on CPU; else the named torch dtype."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def quantization_config(profile: VLMProfile, device: torch.device, dtype: torch.dtype):
    """``BitsAndBytesConfig`` (4-bit NF4) when ``profile.load_in_4bit``, else ``None``.

    Raises:
        VLMError: 4-bit asked on a non-CUDA device, or bitsandbytes is not installed.
    """
    if not profile.load_in_4bit:
        return None
    if device.type != "cuda":
        raise VLMError(
            f"load_in_4bit needs a CUDA GPU (bitsandbytes), but this profile runs on {device.type!r}. "
            "Set load_in_4bit = false to run in full precision on CPU, or run on a machine with a GPU."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise VLMError("load_in_4bit needs the bitsandbytes package: pip install bitsandbytes") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def _not_found_message(model: str) -> str:
    if _looks_like_path(model):
        return f"VLM model folder {model!r} not found or incomplete (needs config.json, weights and processor files)"
    hint = (
        "HF_HUB_OFFLINE=1 is set, so only the local Hugging Face cache is searched"
        if _offline()
        else "the Hugging Face hub could not be reached or has no such repository"
    )
    return (
        f"VLM model {model!r} is not a local folder and is not in the local Hugging Face cache ({hint}). "
        f"Download it where there is internet (`hf download {model}`) and copy the cache, "
        "or set the profile's model to a local folder."
    )


def load_processor_and_model(profile: VLMProfile) -> tuple[Any, Any, torch.device, torch.dtype]:
    """Load ``profile.model`` (+ optional peft adapter) for inference.

    Returns:
        ``(processor, model, device, dtype)``; the model is in eval mode on ``device``.

    Raises:
        VLMError: model or adapter not found (offline), not an image-text-to-text checkpoint,
            4-bit without CUDA/bitsandbytes, out of memory.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(profile.device)
    dtype = resolve_dtype(profile.dtype, device)
    quant = quantization_config(profile, device, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}  # load straight onto the GPU
    try:
        processor = AutoProcessor.from_pretrained(profile.model)
        model = AutoModelForImageTextToText.from_pretrained(profile.model, **kwargs)
    except OSError as exc:
        raise VLMError(_not_found_message(profile.model)) from exc
    except ValueError as exc:  # e.g. "Unrecognized configuration class ... for AutoModelForImageTextToText"
        raise VLMError(
            f"{profile.model!r} cannot be loaded as an image-text-to-text model with this transformers "
            f"version: {exc}"
        ) from exc
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if _is_oom(exc):
            raise VLMError(
                f"out of memory loading {profile.model!r} on {device}: use load_in_4bit = true (CUDA), "
                "a smaller model, or unload the other profile first"
            ) from exc
        raise
    if device.type != "cuda":
        model = model.to(device)
    if profile.adapter is not None:
        model = _load_adapter(model, Path(profile.adapter))
    model.eval()
    return processor, model, device, dtype


def _load_adapter(model: Any, adapter: Path) -> Any:
    """Wrap ``model`` with the peft adapter in ``adapter`` (inference only).

    Raises:
        VLMError: the folder has no ``adapter_config.json``.
    """
    if not (adapter / "adapter_config.json").is_file():
        raise VLMError(f"adapter folder {str(adapter)!r} not found or has no adapter_config.json")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_identity(adapter: Path) -> str:
    """sha256 over an adapter folder's config and weight files (adapters are a few MB).

    Raises:
        VLMError: the folder has no ``adapter_config.json``.
    """
    if not (adapter / "adapter_config.json").is_file():
        raise VLMError(f"adapter folder {str(adapter)!r} not found or has no adapter_config.json")
    files = sorted(p for p in adapter.iterdir() if p.name.startswith("adapter_") and p.is_file())
    return hashlib.sha256("".join(f"{p.name}:{_file_digest(p)};" for p in files).encode()).hexdigest()


def model_identity(model: str) -> str:
    """Identity of a checkpoint without loading it: sha256 of its ``config.json`` plus, for a hub
    checkpoint in the local cache, the snapshot commit.

    Raises:
        VLMError: no ``config.json`` locally or in the cache.
    """
    from transformers.utils import cached_file

    try:
        config_path = cached_file(model, "config.json")
    except OSError as exc:
        raise VLMError(_not_found_message(model)) from exc
    if config_path is None:
        raise VLMError(_not_found_message(model))
    path = Path(config_path)
    commit = path.parent.name if path.parent.parent.name == "snapshots" else ""
    return hashlib.sha256(path.read_bytes() + commit.encode()).hexdigest()


def model_version_string(profile: VLMProfile) -> str:
    """``"<name>[+<adapter>]@<10 hex>-<PROMPT_VERSION>"``, stable across runs and machines.

    The hash covers the checkpoint identity (:func:`model_identity`), the adapter's files,
    ``load_in_4bit`` and ``score_normalisation`` (both change the probabilities) and
    :data:`~catreview.models.vlm.prompts.PROMPT_VERSION`. dtype and device are left out on purpose.
    """
    parts = {
        "model": model_identity(profile.model),
        "adapter": adapter_identity(Path(profile.adapter)) if profile.adapter else None,
        "load_in_4bit": profile.load_in_4bit,
        "score_normalisation": profile.score_normalisation,
        "prompt": PROMPT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    stem = Path(profile.model.rstrip("/")).name
    if profile.adapter:
        stem += "+" + Path(profile.adapter).name
    return f"{stem}@{digest}-{PROMPT_VERSION}"


# --------------------------------------------------------------------------------------------
# Scoring building blocks
# --------------------------------------------------------------------------------------------


def answer_token_ids(tokenizer: Any, prompt: str, answer: str, *, eos_id: int | None) -> list[int]:
    """Token ids that ``answer`` (+ EOS) adds after ``prompt``.

    Computed as ``ids(prompt + answer)[len(ids(prompt)):]`` on the text before image expansion
    (image placeholders are special tokens, so they are token boundaries either way).

    Raises:
        TokenBoundaryError: ``ids(prompt)`` is not a prefix of ``ids(prompt + answer)`` (the
            last prompt token would merge with the answer, so scoring would measure a token
            sequence the model never produces), or the answer adds no token.
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    pa = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    if pa[: len(p)] != p or len(pa) == len(p):
        tail = tokenizer.convert_ids_to_tokens(p[-3:])
        raise TokenBoundaryError(
            f"answer {answer!r} does not start on a token boundary after the prompt (prompt ends with "
            f"tokens {tail}): tokenising prompt+answer changes the prompt's tokens. Put the separating "
            "space on the answer, not at the end of the prompt/chat template."
        )
    ids = pa[len(p) :]
    return ids + [eos_id] if eos_id is not None else ids


def answer_prefix(prompt: str) -> str:
    """``" "`` when ``prompt`` does not end in whitespace (``"... ASSISTANT:"``), else ``""``
    (ChatML's ``"<|im_start|>assistant\\n"``): the separator goes on the answer."""
    return "" if prompt[-1:].isspace() else " "


def candidate_answer(prompt: str, label: str) -> str:
    """The answer text for ``label`` after ``prompt`` (``" Maine Coon"`` after ``"ASSISTANT:"``)."""
    return answer_prefix(prompt) + prompts.answer_text(label).lstrip(" ")


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` of token ids.

    Returns:
        ``(ids, mask)``, both ``(len(rows), max_len)`` int64; ``mask`` is 1 on real tokens.
        ``max_len`` may be 0.
    """
    import torch

    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def reduce_scores(token_logprobs: torch.Tensor, lengths: torch.Tensor, normalisation: str) -> torch.Tensor:
    """Per-candidate score from per-token log-probs.

    Args:
        token_logprobs: ``(N, T)`` float, 0 on padding.
        lengths: ``(N,)`` number of real tokens (>= 1).
        normalisation: ``"sum"`` or ``"mean"``.

    Returns:
        ``(N,)`` float scores (<= 0).
    """
    total = token_logprobs.sum(dim=1)
    if normalisation == "sum":
        return total
    if normalisation == "mean":
        return total / lengths.to(total.dtype)
    raise ValueError(f"score_normalisation must be 'mean' or 'sum', not {normalisation!r}")


def find_rope_deltas_module(model: Any) -> Any | None:
    """The submodule holding M-RoPE ``rope_deltas`` (Qwen2-VL family), or ``None``.

    Such models position text after an image at ``index + rope_delta`` instead of ``index``.
    """
    for module in model.modules():
        if "rope_deltas" in vars(module):
            return module
    return None


@dataclass
class PackedCandidates:
    """All candidates of each photo packed into one row, for scoring after a shared prefill.

    Candidate ``j`` of photo ``b`` with answer ids ``a_1..a_n`` feeds ``a_1..a_{n-1}`` (teacher
    forcing; ``log p(a_1)`` comes from the prefill's last logits) into segment ``j`` of row ``b``.

    Shapes: B photos, S = longest packed row, N = total candidates, T = longest answer - 1.

    Attributes:
        input_ids: ``(B, S)`` int64, pad id after the last segment.
        targets: ``(B, S)`` int64, the token each position predicts (``a_2..a_n``; 0 on padding).
        segments: ``(B, S)`` int64, candidate index within the photo, ``-1`` on padding.
        offsets: ``(B, S)`` int64, position of the token inside its candidate (0-based).
        gather: ``(N, T)`` int64, column in the photo's row of each candidate's ``t``-th fed token.
        gather_mask: ``(N, T)`` int64, 1 where ``gather`` points at a real token.
        rows: ``(N,)`` int64, photo index of each candidate.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    offsets: torch.Tensor
    gather: torch.Tensor
    gather_mask: torch.Tensor
    rows: torch.Tensor


def pack_candidates(answers: Sequence[Sequence[Sequence[int]]], pad_id: int) -> PackedCandidates:
    """Pack ``answers[b][j]`` (answer ids incl. EOS, each >= 1 token) one row per photo.

    Raises:
        ValueError: an answer is empty.
    """
    import torch

    rows_ids, rows_tgt, rows_seg, rows_off, gathers, photo_of = [], [], [], [], [], []
    for b, per_photo in enumerate(answers):
        ids, tgt, seg, off = [], [], [], []
        for j, answer in enumerate(per_photo):
            if not answer:
                raise ValueError(f"empty answer for candidate {j} of photo {b}")
            gathers.append(list(range(len(ids), len(ids) + len(answer) - 1)))
            photo_of.append(b)
            ids += answer[:-1]
            tgt += answer[1:]
            seg += [j] * (len(answer) - 1)
            off += range(len(answer) - 1)
        rows_ids.append(ids)
        rows_tgt.append(tgt)
        rows_seg.append(seg)
        rows_off.append(off)
    input_ids, _ = pad_right(rows_ids, pad_id)
    targets, _ = pad_right(rows_tgt, 0)
    segments, real = pad_right(rows_seg, 0)
    offsets, _ = pad_right(rows_off, 0)
    gather, gather_mask = pad_right(gathers, 0)
    return PackedCandidates(
        input_ids=input_ids,
        targets=targets,
        segments=torch.where(real.bool(), segments, -1),
        offsets=offsets,
        gather=gather,
        gather_mask=gather_mask,
        rows=torch.tensor(photo_of, dtype=torch.long),
    )


def packed_attention_mask(prompt_mask: torch.Tensor, segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask for packed candidates attending to a cached, right-padded prompt.

    A packed token sees every real prompt token of its photo and the earlier tokens of its own
    candidate, never another candidate; padding tokens see the prompt only (no all-masked row,
    so no NaN). transformers passes a 4D mask to the attention layers unchanged
    (``masking_utils._preprocess_mask_arguments``); eager and SDPA attention both add it to
    the attention logits.

    Args:
        prompt_mask: ``(B, L)`` 0/1, the prefill's attention mask.
        segments: ``(B, S)`` candidate index per packed token, ``-1`` on padding.
        dtype: the model's float dtype.

    Returns:
        ``(B, 1, S, L + S)`` of ``dtype``: 0 where attention is allowed, ``finfo(dtype).min``
        elsewhere.
    """
    import torch

    B, S = segments.shape
    see_prompt = prompt_mask.bool()[:, None, :].expand(B, S, prompt_mask.shape[1])
    causal = torch.ones(S, S, dtype=torch.bool, device=segments.device).tril()
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
    allowed = torch.cat([see_prompt, same & causal], dim=-1)[:, None]
    zero = torch.zeros((), dtype=dtype, device=segments.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


@dataclass
class _Batch:
    """Processor output for several photos and the per-photo bookkeeping of one scoring pass."""

    inputs: Any  # BatchFeature: input_ids (B, L), attention_mask (B, L), pixel_values ...
    labels: list[list[str]]
    answers: list[list[list[int]]]  # [photo][candidate] -> answer token ids incl. EOS


# --------------------------------------------------------------------------------------------
# The post-classifier
# --------------------------------------------------------------------------------------------


class VLMPostClassifier:
    """Stage-2 VLM for one :class:`~catreview.config.VLMProfile`.

    Lazy: nothing is loaded until :meth:`load` (or the first call that needs the model).
    Not thread-safe for concurrent calls; streaming runs ``generate`` in its own thread.

    Args:
        profile: model, dtype/device, 4-bit, adapter, generation and scoring settings.
        name: profile name, used in messages.
    """

    def __init__(self, profile: VLMProfile, name: str = "default") -> None:
        self.profile = profile
        self.name = name
        self.processor: Any = None
        self.model: Any = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self._rope_module: Any = None
        self._version: str | None = None
        self._end_of_turn: str | None = None  # "" once known to be absent

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def from_loaded(
        cls,
        profile: VLMProfile,
        processor: Any,
        model: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        model_version: str,
        name: str = "default",
    ) -> VLMPostClassifier:
        """Wrap an already loaded ``processor`` and ``model`` (e.g. a peft model in training).

        :meth:`load` is skipped; scoring and generation run unchanged. ``model_version`` is
        used as given (no checkpoint hashing), so give it a name that says what the model is.
        """
        scorer = cls(profile, name=name)
        scorer.processor, scorer.model, scorer.device, scorer.dtype = processor, model, device, dtype
        scorer._rope_module = find_rope_deltas_module(model)
        scorer._version = model_version
        return scorer

    @property
    def end_of_turn_id(self) -> int | None:
        """Token id that ends a scored answer (the chat template's end of turn), or ``None``."""
        return self._eos_id()

    @property
    def loaded(self) -> bool:
        """True between :meth:`load` and :meth:`unload`."""
        return self.model is not None

    def load(self) -> VLMPostClassifier:
        """Load processor and model (no-op when loaded). Returns ``self``.

        Raises:
            VLMError: see :func:`load_processor_and_model`.
        """
        if self.model is None:
            self.processor, self.model, self.device, self.dtype = load_processor_and_model(self.profile)
            self._rope_module = find_rope_deltas_module(self.model)
            self._end_of_turn = None
        return self

    def unload(self) -> None:
        """Drop the model and processor and free their memory (``gc`` + CUDA cache)."""
        was_cuda = self.device is not None and self.device.type == "cuda"
        self.model = self.processor = self._rope_module = None
        gc.collect()
        if was_cuda:
            import torch

            torch.cuda.empty_cache()

    @property
    def model_id(self) -> str:
        """The profile's model as configured: a hub id (``llava-hf/llava-1.5-7b-hf``) or a folder."""
        return self.profile.model

    @property
    def model_version(self) -> str:
        """Stable short id, e.g. ``"llava-1.5-7b-hf@3f2a9c1b7d-p1"`` (:func:`model_version_string`).

        Raises:
            VLMError: the model's config cannot be found (offline, wrong path).
        """
        if self._version is None:
            self._version = model_version_string(self.profile)
        return self._version

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer. Loads the model first if needed (it comes with the processor).

        Raises:
            VLMError: as :meth:`load`.
        """
        return self.load().processor.tokenizer

    # ---- inputs ----------------------------------------------------------------------------

    def _encode(self, images: Sequence[Image.Image], texts: Sequence[str], padding_side: str) -> Any:
        """Processor output on the model's device; float tensors in the model's dtype."""
        inputs = self.processor(
            images=[_rgb(im) for im in images],
            text=list(texts),
            return_tensors="pt",
            padding=True,
            padding_side=padding_side,
        )
        return inputs.to(self.device, dtype=self.dtype)

    def _eos_token(self) -> str | None:
        """The token appended to every scored answer: the chat template's end of turn
        (:func:`catreview.models.vlm.prompts.end_of_turn_token`), else the tokenizer's ``eos_token``."""
        if self._end_of_turn is None:
            self._end_of_turn = prompts.end_of_turn_token(self.processor) or self.processor.tokenizer.eos_token or ""
        return self._end_of_turn or None

    def _eos_id(self) -> int | None:
        token = self._eos_token()
        return None if token is None else self.processor.tokenizer.convert_tokens_to_ids(token)

    def _pad_id(self) -> int:
        tok = self.processor.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _prepare(self, images: Sequence[Image.Image], labels: list[list[str]]) -> _Batch:
        """Render prompts, tokenise candidate answers (boundary-checked), run the processor."""
        texts = [prompts.verdict_prompt(self.processor, ls) for ls in labels]
        eos = self._eos_id()
        answers = [
            [answer_token_ids(self.processor.tokenizer, t, candidate_answer(t, c), eos_id=eos) for c in ls]
            for t, ls in zip(texts, labels)
        ]
        return _Batch(self._encode(images, texts, "right"), labels, answers)

    # ---- scoring ---------------------------------------------------------------------------

    def score_candidates(
        self,
        images: Sequence[Image.Image],
        candidates: Sequence[Sequence[str]],
        *,
        batch_size: int | None = None,
    ) -> list[VLMVerdict]:
        """Probability of each candidate per photo, by shared-prefill answer scoring.

        Args:
            images: PIL images (any mode; converted to RGB), one per photo.
            candidates: per photo, stage-1 labels (e.g. top-3, ``"Maine_Coon"`` or ``"Maine
                Coon"``); ``"other"`` is appended here.
            batch_size: photos per prefill (default ``profile.batch_size``), >= 1.

        Returns:
            One :class:`VLMVerdict` per photo, in order. Results equal one-at-a-time within
            float tolerance.

        Raises:
            ValueError: lengths differ, or a candidate list is empty / has duplicates.
            TokenBoundaryError: an answer does not start on a token boundary.
            VLMError: model cannot be loaded; out of memory (lower ``batch_size``); the model's
                ``attn_implementation`` takes no 4D attention mask (only ``"sdpa"``, transformers'
                default, and ``"eager"`` do); or the processor ignores right padding.
        """
        labels = _check_inputs(images, candidates)
        self.load()
        out: list[VLMVerdict] = []
        step = self.profile.batch_size if batch_size is None else batch_size
        if step < 1:
            raise ValueError(f"batch_size must be >= 1, got {step}")
        for i in range(0, len(labels), step):
            scores = self._guard_oom(self._score_batch, self._prepare(images[i : i + step], labels[i : i + step]))
            out += [VLMVerdict.from_scores(ls, s, self.model_version) for ls, s in zip(labels[i : i + step], scores)]
        return out

    def _score_batch(self, batch: _Batch) -> list[list[float]]:
        """Shared prefill + one packed forward over all candidates of the photos of ``batch``.

        Shapes: B photos, L padded prompt length, S longest packed candidate row, N candidates,
        T = longest answer - 1, V vocabulary. The KV cache keeps B rows: candidates share their
        photo's row through :func:`packed_attention_mask` instead of copies of the cache.
        """
        import torch

        inputs, answers = batch.inputs, batch.answers
        prompt_mask = inputs["attention_mask"]  # (B, L), right padded
        if (prompt_mask[:, 1:] > prompt_mask[:, :-1]).any():
            raise VLMError(
                f"{type(self.processor).__name__} ignored padding_side='right'; shared-prefill scoring "
                "needs right-padded prompts"
            )
        attn = getattr(self.model.config.get_text_config(), "_attn_implementation", None) or "sdpa"
        if attn not in ("sdpa", "eager"):
            raise VLMError(
                f"shared-prefill scoring passes a 4D attention mask, which attn_implementation {attn!r} "
                "does not take; load the model with 'sdpa' (transformers' default) or 'eager'"
            )
        n_prompt = prompt_mask.sum(dim=1)  # (B,) real prompt tokens; the last is at n_prompt - 1
        packed = pack_candidates(answers, self._pad_id())
        rows = packed.rows.to(self.device)  # (N,)
        flat = [ids for per_photo in answers for ids in per_photo]
        lengths = torch.tensor([len(ids) for ids in flat], device=self.device)  # (N,)
        first_ids = torch.tensor([ids[0] for ids in flat], device=self.device)
        with torch.inference_mode():
            pre = self.model(**inputs, use_cache=True, logits_to_keep=(n_prompt - 1)[:, None])
            first_logprobs = torch.log_softmax(pre.logits[:, -1].float(), dim=-1)  # (B, V)
            token_lp = [first_logprobs[rows, first_ids][:, None]]  # log p(a_1 | prompt), (N, 1)
            if packed.input_ids.shape[1] > 0:
                # Teacher forcing: feed a_1..a_{n-1} of every candidate, read log p(a_2..a_n).
                positions = n_prompt[:, None] + packed.offsets.to(self.device)  # (B, S)
                deltas = self._rope_deltas()
                if deltas is not None:
                    positions = positions + deltas.to(self.device).long()
                mask = packed_attention_mask(prompt_mask, packed.segments.to(self.device), self.dtype)
                out = self.model(
                    input_ids=packed.input_ids.to(self.device),
                    attention_mask=mask,
                    position_ids=positions,
                    cache=pre.cache,
                    use_cache=True,
                )
                logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # (B, S, V)
                picked = logprobs.gather(-1, packed.targets.to(self.device)[..., None])[..., 0]  # (B, S)
                gather_mask = packed.gather_mask.to(self.device)
                token_lp.append(picked[rows[:, None], packed.gather.to(self.device)] * gather_mask)  # (N, T)
            scores = reduce_scores(torch.cat(token_lp, dim=1), lengths, self.profile.score_normalisation)
        scores = scores.cpu().tolist()
        per_photo, start = [], 0
        for a in answers:
            per_photo.append(scores[start : start + len(a)])
            start += len(a)
        return per_photo

    def _rope_deltas(self) -> torch.Tensor | None:
        """M-RoPE offsets ``(B, 1)`` left by the last prefill, or ``None`` (plain RoPE models)."""
        return getattr(self._rope_module, "rope_deltas", None) if self._rope_module is not None else None

    def score_candidates_reference(self, image: Image.Image, candidates: Sequence[str]) -> VLMVerdict:
        """Slow oracle for :meth:`score_candidates`: one full forward per candidate, no cache.

        The prompt + answer + EOS is rendered as one string and run through the processor, so
        this also checks the token arithmetic of the fast path. Same arguments/result as
        :meth:`score_candidates` for a single photo.
        """
        import torch

        (labels,) = _check_inputs([image], [candidates])
        self.load()
        prompt = prompts.verdict_prompt(self.processor, labels)
        eos = self._eos_token() or ""
        n_prompt = self._encode([image], [prompt], "right")["input_ids"].shape[1]
        scores = []
        with torch.inference_mode():
            for c in labels:
                inputs = self._encode([image], [prompt + candidate_answer(prompt, c) + eos], "right")
                ids = inputs["input_ids"][0]
                logprobs = torch.log_softmax(self.model(**inputs).logits[0].float(), dim=-1)  # (L, V)
                n = ids.shape[0] - n_prompt
                token_lp = logprobs[n_prompt - 1 : -1].gather(-1, ids[n_prompt:, None])[:, 0]  # (n,)
                scores.append(
                    reduce_scores(token_lp[None], torch.tensor([n]), self.profile.score_normalisation).item()
                )
        return VLMVerdict.from_scores(labels, scores, self.model_version)

    def _guard_oom(self, fn, *args):
        import torch

        try:
            return fn(*args)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if _is_oom(exc):
                raise VLMError(
                    f"out of memory in VLM profile {self.name!r} (batch_size={self.profile.batch_size}); "
                    "lower batch_size or use load_in_4bit"
                ) from exc
            raise

    # ---- generation ------------------------------------------------------------------------

    def _generation_kwargs(self, max_new_tokens: int | None = None) -> dict[str, Any]:
        p = self.profile
        kw: dict[str, Any] = {
            "max_new_tokens": max_new_tokens or p.max_new_tokens,
            "do_sample": p.do_sample,
            "pad_token_id": self._pad_id(),
        }
        if p.do_sample:
            kw.update(temperature=p.temperature, top_p=p.top_p)
        else:  # silence "temperature is set but do_sample=False" from checkpoint generation configs
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw

    def _generate_text(self, image: Image.Image, prompt: str, max_new_tokens: int | None = None) -> str:
        import torch

        inputs = self._encode([image], [prompt], "left")
        with torch.inference_mode():
            out = self._guard_oom(
                lambda: self.model.generate(**inputs, **self._generation_kwargs(max_new_tokens))
            )
        return self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def reasoning(self, image: Image.Image, candidates: Sequence[str]) -> str:
        """Free-text explanation of the traits deciding between ``candidates`` (whole text).

        Generation settings from the profile (greedy unless ``do_sample``).
        """
        (labels,) = _check_inputs([image], [candidates])
        self.load()
        return self._generate_text(image, prompts.reasoning_prompt(self.processor, labels)).strip()

    def reasoning_batch(self, images: Sequence[Image.Image], candidates: Sequence[Sequence[str]]) -> list[str]:
        """:meth:`reasoning` for many photos, ``profile.batch_size`` per ``generate`` call.

        Prompts are left-padded (generation continues from the last real token of every row) with
        the attention mask marking the padding; greedy results equal one-at-a-time within float
        tolerance (tests/test_vlm.py).
        """
        import torch

        labels = _check_inputs(images, candidates)
        self.load()
        out: list[str] = []
        step = self.profile.batch_size
        for i in range(0, len(images), step):
            prompts_i = [prompts.reasoning_prompt(self.processor, lab) for lab in labels[i : i + step]]
            inputs = self._encode(images[i : i + step], prompts_i, "left")
            with torch.inference_mode():
                gen = self._guard_oom(lambda: self.model.generate(**inputs, **self._generation_kwargs()))
            new = gen[:, inputs["input_ids"].shape[1] :]
            out += [t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out

    def stream_reasoning(
        self,
        image: Image.Image,
        candidates: Sequence[str],
        stop_event: threading.Event | None = None,
    ) -> Iterator[str]:
        """Like :meth:`reasoning`, yielding the cumulative text as it is generated.

        ``generate`` runs in a background thread feeding a ``TextIteratorStreamer``. Setting
        ``stop_event`` (or closing the iterator) stops generation at the next token; the thread
        is joined before this generator returns. An exception in ``generate`` is re-raised here.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        (labels,) = _check_inputs([image], [candidates])
        self.load()
        inputs = self._encode([image], [prompts.reasoning_prompt(self.processor, labels)], "left")
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        closed = threading.Event()
        events = [closed] if stop_event is None else [closed, stop_event]
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(
                    **inputs,
                    **self._generation_kwargs(),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([event_stopping_criteria(events)]),
                )
            except Exception as exc:  # handed to the consumer, re-raised below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name=f"vlm-stream-{self.name}", daemon=True)
        thread.start()
        text = ""
        try:
            for chunk in streamer:
                if chunk:
                    text += chunk
                    yield text
        finally:
            closed.set()
            thread.join()
        if errors:
            raise VLMError(f"generation failed in VLM profile {self.name!r}: {errors[0]}") from errors[0]

    def generate_verdict(
        self, image: Image.Image, candidates: Sequence[str], max_new_tokens: int = DEFAULT_VERDICT_TOKENS
    ) -> VLMVerdict:
        """Verdict by *generating* an answer to the verdict prompt and matching candidate names.

        For the benchmark only: no probabilities (one-hot on the matched candidate; ``other``
        when no name matches; ``scores`` are 0 / ``-inf``). The answer text is in
        ``extra["answer"]``.
        """
        (labels,) = _check_inputs([image], [candidates])
        self.load()
        answer = self._generate_text(image, prompts.verdict_prompt(self.processor, labels), max_new_tokens)
        label = match_candidate(answer, labels)
        scores = [0.0 if c == label else float("-inf") for c in labels]
        verdict = VLMVerdict.from_scores(labels, scores, self.model_version)
        verdict.extra["answer"] = answer
        return verdict


def event_stopping_criteria(events: Sequence[threading.Event]) -> Any:
    """A ``transformers.StoppingCriteria`` that stops every sequence once any of ``events`` is set.

    Built lazily so that importing this module does not import torch/transformers.
    """
    import torch
    from transformers import StoppingCriteria

    class EventStoppingCriteria(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            stop = any(e.is_set() for e in events)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return EventStoppingCriteria()


def match_candidate(answer: str, labels: Sequence[str]) -> str:
    """The candidate named in ``answer`` as whole words (case-insensitive, earliest mention,
    longest name on a tie), or :data:`~catreview.models.vlm.prompts.OTHER_LABEL`.

    Whole words: "Another look: a Bengal" names Bengal, not "other"."""
    import re

    text = " ".join(answer.lower().replace("_", " ").split())
    best: tuple[int, int, str] | None = None
    for label in labels:
        name = prompts.answer_text(label).strip().lower()
        found = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) if name else None
        if found and (best is None or (found.start(), -len(name)) < (best[0], best[1])):
            best = (found.start(), -len(name), label)
    return best[2] if best is not None else prompts.OTHER_LABEL


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_inputs(images: Sequence[Any], candidates: Sequence[Sequence[str]]) -> list[list[str]]:
    """Validate and return the candidate lists with ``"other"`` appended.

    Raises:
        ValueError: different lengths, a non-PIL image, or a bad candidate list.
    """
    from PIL import Image

    if len(images) != len(candidates):
        raise ValueError(f"{len(images)} images but {len(candidates)} candidate lists")
    for im in images:
        if not isinstance(im, Image.Image):
            raise ValueError(f"images must be PIL.Image.Image, got {type(im).__name__}")
    if isinstance(candidates, str) or any(isinstance(c, str) for c in candidates):
        raise ValueError("candidates must be one list of labels per image, e.g. [['Bengal', 'Siamese', 'Persian']]")
    return [prompts.with_other(c) for c in candidates]
