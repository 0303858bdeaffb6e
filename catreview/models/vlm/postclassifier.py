"""Stage 2: a VLM post-classifier that re-ranks stage-1's top-k breeds.

Any ``transformers`` image-text-to-text checkpoint with a chat template works (LLaVA-1.5,
LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Idefics3, Pixtral ...): it is loaded with
``AutoProcessor`` + ``AutoModelForImageTextToText`` (:mod:`catreview.models.vlm.loading`) and
prompted through the processor's own chat template (:mod:`catreview.models.vlm.prompts`). The tiny
offline models of :mod:`catreview.models.tiny_llava` (and ``tests/tiny_vlms.py``) load through the
same path.

Verdicts are **scored, not generated**: each candidate's answer tokens are scored by teacher
forcing and the (mean or sum) log-likelihoods softmaxed over the candidates (formulas in
:mod:`catreview.models.vlm.scoring`).

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

Reasoning is generated (:mod:`catreview.models.vlm.generation`). Errors a user can act on are
raised as :class:`~catreview.models.vlm.types.VLMError` with a plain message.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from catreview.config import VLMProfile
from catreview.models.vlm import prompts
from catreview.models.vlm.generation import (
    DEFAULT_VERDICT_TOKENS,
    generation_kwargs,
    match_candidate,
    stream_generate,
)
from catreview.models.vlm.loading import is_oom, load_processor_and_model, model_version_string
from catreview.models.vlm.scoring import (
    answer_token_ids,
    candidate_answer,
    find_rope_deltas_module,
    pack_candidates,
    packed_attention_mask,
    reduce_scores,
)
from catreview.models.vlm.types import VLMError, VLMVerdict

if TYPE_CHECKING:  # heavy imports stay lazy: importing this module must not import torch
    import torch
    from PIL import Image

_T = TypeVar("_T")


@dataclass
class _Batch:
    """Processor output for several photos and the per-photo bookkeeping of one scoring pass."""

    inputs: Any  # BatchFeature: input_ids (B, L), attention_mask (B, L), pixel_values ...
    labels: list[list[str]]
    answers: list[list[list[int]]]  # [photo][candidate] -> answer token ids incl. EOS


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
            VLMError: see :func:`~catreview.models.vlm.loading.load_processor_and_model`.
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
        """Stable short id, e.g. ``"llava-1.5-7b-hf@3f2a9c1b7d-p1"``
        (:func:`~catreview.models.vlm.loading.model_version_string`).

        Raises:
            VLMError: the model's config cannot be found (offline, wrong path).
        """
        if self._version is None:
            self._version = model_version_string(self.profile)
        return self._version

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
                scores.append(reduce_scores(token_lp[None], torch.tensor([n]), self.profile.score_normalisation).item())
        return VLMVerdict.from_scores(labels, scores, self.model_version)

    def _guard_oom(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)``, an out-of-memory error turned into a :class:`VLMError` naming the profile."""
        import torch

        try:
            return fn(*args)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if is_oom(exc):
                raise VLMError(
                    f"out of memory in VLM profile {self.name!r} (batch_size={self.profile.batch_size}); "
                    "lower batch_size or use load_in_4bit"
                ) from exc
            raise

    def _generation_kwargs(self, max_new_tokens: int | None = None) -> dict[str, Any]:
        return generation_kwargs(self.profile, self._pad_id(), max_new_tokens)

    def _generate_text(self, image: Image.Image, prompt: str, max_new_tokens: int | None = None) -> str:
        import torch

        inputs = self._encode([image], [prompt], "left")
        with torch.inference_mode():
            out = self._guard_oom(partial(self.model.generate, **inputs, **self._generation_kwargs(max_new_tokens)))
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
                gen = self._guard_oom(partial(self.model.generate, **inputs, **self._generation_kwargs()))
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

        ``generate`` runs in a background thread feeding a ``TextIteratorStreamer``
        (:func:`~catreview.models.vlm.generation.stream_generate`). Setting ``stop_event`` (or
        closing the iterator) stops generation at the next token; the thread is joined before this
        generator returns. An exception in ``generate`` is re-raised here as :class:`VLMError`.
        """
        (labels,) = _check_inputs([image], [candidates])
        self.load()
        inputs = self._encode([image], [prompts.reasoning_prompt(self.processor, labels)], "left")
        generate = partial(self.model.generate, **inputs, **self._generation_kwargs())
        yield from stream_generate(generate, self.processor.tokenizer, name=self.name, stop_event=stop_event)

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
