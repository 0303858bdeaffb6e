"""Scoring building blocks: answer token ids, packing of candidates, the 4-D mask, score reduction.

For a photo with candidates ``c_1..c_k`` (stage-1 top-k plus ``"other"``), the verdict prompt
(ending with the prefilled ``"This is"``) is rendered once and each candidate's answer tokens
``a_1..a_n`` (``" a Maine Coon cat."`` + end of turn) are scored by teacher forcing::

    score(c) = sum_j log p(a_j | image, prompt, a_<j)          (score_normalisation="sum")
    score(c) = score_sum(c) / n                                (score_normalisation="mean")
    p(c)     = softmax_c(score(c))

``"mean"`` (default) is length-normalised: a two-token name (" Maine"+" Coon"+EOS = 3 tokens)
is not penalised against a one-token name (" Bengal"+EOS = 2 tokens). ``"sum"`` is the exact
sequence log-likelihood and favours short names. Both are softmaxed over the candidates, so the
probabilities are relative to the candidate set, not absolute.

The pieces here are pure functions on token ids and tensors (no model): :func:`answer_token_ids`
and :func:`candidate_answer` (also used by training, so it teaches exactly the tokens scoring
measures), :func:`pack_candidates` + :func:`packed_attention_mask` (all candidates of a photo in
one row after a shared prefill), :func:`reduce_scores`. The forward passes that use them are in
:meth:`catreview.models.vlm.postclassifier.VLMPostClassifier.score_candidates`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from catreview.models.vlm import prompts
from catreview.models.vlm.types import TokenBoundaryError

if TYPE_CHECKING:  # heavy imports stay lazy: importing this module must not import torch
    import torch


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
    return [*ids, eos_id] if eos_id is not None else ids


def answer_prefix(prompt: str) -> str:
    """``" "`` when ``prompt`` does not end in whitespace (``"... ASSISTANT:"``), else ``""``
    (ChatML's ``"<|im_start|>assistant\\n"``): the separator goes on the answer."""
    return "" if prompt[-1:].isspace() else " "


def candidate_answer(prompt: str, label: str) -> str:
    """The scored answer text for ``label`` after ``prompt``: ``" a Maine Coon cat."`` after the
    verdict prompt's prefill ``"... This is"`` (:func:`catreview.models.vlm.prompts.answer_text`)."""
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

    rows_ids: list[list[int]] = []
    rows_tgt: list[list[int]] = []
    rows_seg: list[list[int]] = []
    rows_off: list[list[int]] = []
    gathers: list[list[int]] = []
    photo_of: list[int] = []
    for b, per_photo in enumerate(answers):
        ids: list[int] = []
        tgt: list[int] = []
        seg: list[int] = []
        off: list[int] = []
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
