"""Loss functions selected by ``--loss-type`` (or ``--custom-loss-function-path``).

Signature of every loss (and of a custom one)::

    loss_fn(logits, batch: MicroBatch, ctx: LossContext) -> tuple[Tensor, dict[str, Tensor]]

``logits`` are this TP rank's vocabulary slice, shaped like ``batch.tokens`` plus a vocab
dimension. The returned scalar is this micro-batch's contribution to the global loss; the
contributions of all micro-batches and DP ranks are summed (see `batching`), so a loss that
wants a mean must bake the global denominator into ``batch.weights`` as ``sft_loss`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from slime.backends.megatron_utils.batching import MicroBatch

__all__ = ["LOSSES", "LossContext", "resolve_loss", "sft_loss"]


@dataclass(frozen=True)
class LossContext:
    """What a loss may need besides logits and the batch.

    vocab_size: the tokenizer's vocabulary; logits beyond it (TP padding) are never predictions.
    vocab_start: first vocabulary index of this TP rank's logits slice.
    """

    vocab_size: int
    vocab_start: int


def _mask_padded_vocab(logits: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    local = logits.shape[-1]
    n_real = ctx.vocab_size - ctx.vocab_start
    if n_real >= local:
        return logits
    pad = torch.zeros(local, dtype=torch.bool, device=logits.device)
    pad[max(n_real, 0) :] = True
    return logits.masked_fill(pad, float("-inf"))


def sft_loss(logits: torch.Tensor, batch: MicroBatch, ctx: LossContext):
    """Weighted next-token cross-entropy: sum(ce * weights) (weights from `batching`)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = _mask_padded_vocab(logits.float(), ctx)
    ce = vocab_parallel_cross_entropy(logits, batch.labels)
    weights = batch.weights.to(ce.dtype)
    loss = (ce * weights).sum()
    return loss, {"loss": loss.detach()}


def _policy_loss_unavailable(*_):
    raise NotImplementedError("--loss-type policy_loss belongs to the RL path, which is not built yet")


LOSSES: dict[str, Callable] = {"sft_loss": sft_loss, "policy_loss": _policy_loss_unavailable}


def resolve_loss(loss_type: str, custom_path: str | None = None) -> Callable:
    """The loss function for the flags, resolved at start-up (a bad name fails before training)."""
    if custom_path:
        from slime.utils.plugins import load_function

        return load_function(custom_path, "--custom-loss-function-path", ("logits", "batch", "ctx"))
    if loss_type == "policy_loss":
        raise ValueError("--loss-type policy_loss is not available yet (RL path); use sft_loss")
    if loss_type not in LOSSES:
        raise ValueError(f"unknown --loss-type {loss_type!r}; choose from {sorted(LOSSES)} or --custom-loss-function-path")
    return LOSSES[loss_type]
