"""Next-token cross-entropy as a (sum, count) pair, computed in chunks straight from hidden states.

The sum/count form is what makes normalisation exact: the trainer divides the sum of every
micro-batch on every rank by the total supervised-token count of the whole optimizer step.

The chunked form never builds the `(tokens, vocab)` logits of the whole sequence nor a float32 copy:
only supervised positions are projected, `chunk_size` rows at a time, and each chunk's logits are
recomputed in backward (activation checkpointing) instead of being kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlm_finetune.data.sample import IGNORE_INDEX
from vlm_finetune.settings import LossSettings


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def supervised_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict a supervised token and those tokens: (n, hidden), (n,)."""
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    return hidden[:, :-1][mask], shifted_labels[mask]


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      bias: torch.Tensor | None = None, chunk_size: int | None = 1024) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over supervised positions, and their number.

    `hidden`: (batch, seq, hidden) final hidden states; `weight`: (vocab, hidden) output projection;
    `labels`: (batch, seq) with IGNORE_INDEX where no loss is taken. `chunk_size=None` computes the
    plain full-logits loss (the reference the chunked form must equal). With no supervised token the
    sum is a zero that still depends on the graph, so backward runs and gives zero gradients.
    """
    rows, targets = supervised_positions(hidden, labels)
    count = int(targets.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    if chunk_size is None:
        return _chunk_ce_sum(rows, weight, bias, targets), count
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        piece = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_ce_sum, rows[piece], weight, bias, targets[piece], use_reentrant=False)
    return total, count


def liger_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            bias: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Liger's fused linear cross-entropy (Triton, GPU) on the supervised positions, as (sum, count)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    rows, targets = supervised_positions(hidden, labels)
    count = int(targets.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return loss(weight, rows, targets, bias).float(), count


def token_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                   settings: LossSettings) -> tuple[torch.Tensor, int]:
    """Dispatch on `loss.impl`: chunked | plain (full logits) | liger (fused, GPU)."""
    impl = settings.impl
    if impl == "chunked":
        return cross_entropy_sum(hidden, weight, labels, bias, chunk_size=settings.chunk_size)
    if impl == "plain":
        return cross_entropy_sum(hidden, weight, labels, bias, chunk_size=None)
    if impl == "liger":
        return liger_cross_entropy_sum(hidden, weight, labels, bias)
    raise ValueError(f"loss.impl={impl!r}: use chunked, plain or liger")


def full_logits_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The plain reference: CE summed over supervised tokens from full (batch, seq, vocab) logits."""
    shifted = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return (F.cross_entropy(flat, shifted, ignore_index=IGNORE_INDEX, reduction="sum"),
            int((shifted != IGNORE_INDEX).sum()))
