"""The training loss: mean token cross-entropy of each row's answer (+ end of turn), averaged over
rows with the row weights (1, or the class weights of ``balance="loss"``).

Each photo counts once whatever the length of its breed's name, like the scorer's ``"mean"``
normalisation. Only the logits of the answer positions are computed (``logits_to_keep``), so the
vocabulary projection over the ~600 image + prompt positions is skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from training.data import model_inputs

if TYPE_CHECKING:
    import torch


def answer_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *, focal_gamma: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean over rows of the mean answer-token cross-entropy (or focal loss).

    Args:
        logits: ``(B, K, V)`` logits of the **last** ``K`` positions of the sequence (any float).
        labels: ``(B, L)`` int64 targets, ``-100`` where nothing is learned; ``L >= K``.
        weights: ``(B,)`` float row weights.
        focal_gamma: ``None``: cross-entropy ``-log p_t`` per token; a number ``gamma >= 0``:
            the focal loss ``-(1 - p_t)^gamma log p_t`` per token (Lin et al. 2017,
            arXiv:1708.02002, eq. 4), which down-weights tokens the model already predicts
            well; ``gamma = 0`` is cross-entropy.

    Returns:
        ``(loss, per_row)``: scalar float32 loss and ``(B,)`` per-row mean of the per-token loss
        (nats/token). Rows without answer tokens get 0 and do not count.
    """
    import torch
    import torch.nn.functional as F

    k = logits.shape[1]
    targets = labels[:, labels.shape[1] - k + 1 :]  # (B, K-1): tokens predicted by logits[:, :-1]
    ce = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    if focal_gamma:  # None or 0: cross-entropy, exactly
        p_t = torch.exp(-ce)  # probability of the target token (ce = -log p_t; 1 where ignored)
        # clamped away from 0: the gradient of x^gamma at x = 0 is inf for gamma < 1 (NaN after * 0)
        ce = (1.0 - p_t).clamp(min=torch.finfo(torch.float32).tiny).pow(focal_gamma) * ce
    counted = (targets != -100).float()
    n_tokens = counted.sum(dim=1)
    per_row = (ce * counted).sum(dim=1) / n_tokens.clamp(min=1)
    w = weights.float() * (n_tokens > 0).float()
    loss = (per_row * w).sum() / w.sum().clamp(min=torch.finfo(torch.float32).tiny)
    return loss, per_row


def batch_loss(
    model: Any, batch: dict[str, Any], *, focal_gamma: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``batch`` (from :class:`training.data.Collator`) and return :func:`answer_loss`
    (``focal_gamma`` as there; ``None`` = cross-entropy).

    Only the logits from the position before the earliest answer token onwards are computed.
    """
    keep = batch["input_ids"].shape[1] - int(batch["answer_start"].min()) + 1
    out = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep)
    return answer_loss(out.logits, batch["labels"], batch["weights"], focal_gamma=focal_gamma)


__all__ = ["answer_loss", "batch_loss"]
