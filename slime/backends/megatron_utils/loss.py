"""Loss functions selected by ``--loss-type`` (``custom_loss`` = ``--custom-loss-function-path``).

Signature of every loss (and of a custom one)::

    loss_fn(logits, batch: MicroBatch, ctx: LossContext) -> tuple[Tensor, dict[str, Tensor]]

``logits`` are this TP rank's vocabulary slice, shaped like ``batch.tokens`` plus a vocab
dimension. The returned scalar is this micro-batch's contribution to the global loss; the
contributions of all micro-batches and DP ranks are summed (see `batching`), so a loss that
wants a mean must bake the global denominator into ``batch.weights`` as ``sft_loss`` does.
Metrics follow the same rule (weighted sums that add up to global means); the actor sums
each key over micro-batches and DP ranks.

All losses share this one packed path, so the equalities of DESIGN.md invariant 1 (packing,
micro-batching, DP, TP) hold for each of them.

The built-in losses also accept an `output_head.OutputHead` in place of ``logits`` (the
memory-lean cross-entropy, ``--cross-entropy-chunk-tokens``): they read log-probs and entropy
through `log_probs.token_stats`, which gives the same values and gradients either way. Custom
losses always receive logits (the actor materialises them from the head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from slime.backends.megatron_utils.batching import MicroBatch
from slime.backends.megatron_utils.log_probs import token_stats

if TYPE_CHECKING:
    from slime.algorithms.config import AlgorithmConfig

__all__ = ["LOSSES", "LossContext", "policy_loss", "resolve_loss", "sft_loss"]


@dataclass(frozen=True)
class LossContext:
    """What a loss may need besides logits and the batch.

    vocab_size: the tokenizer's vocabulary; logits beyond it (TP padding) are never predictions.
    vocab_start: first vocabulary index of this TP rank's logits slice.
    algorithm: the RL algorithm flags (`policy_loss`); None for SFT.
    chunk_tokens: tokens per chunk when the model output is an `OutputHead` (`lean_ce`); 0 when
        the lean path is off (the model then returns logits).
    segment_reduce: under context parallelism, sums per-sample statistics over the CP ranks
        holding the other parts of the samples (`context_parallel.cp_sum`); None otherwise.
    """

    vocab_size: int
    vocab_start: int
    algorithm: "AlgorithmConfig | None" = None
    chunk_tokens: int = 0
    segment_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.chunk_tokens < 0:
            raise ValueError(f"LossContext.chunk_tokens must be >= 0, got {self.chunk_tokens}")


def sft_loss(logits: torch.Tensor, batch: MicroBatch, ctx: LossContext):
    """Weighted next-token cross-entropy: sum(ce * weights) (weights from `batching`)."""
    logp, _ = token_stats(logits, batch.labels, ctx.vocab_size, ctx.vocab_start, chunk_tokens=ctx.chunk_tokens)
    loss = -(logp * batch.weights.to(logp.dtype)).sum()
    return loss, {"loss": loss.detach()}


def policy_loss(logits: torch.Tensor, batch: MicroBatch, ctx: LossContext):
    """PPO/GRPO objective of `slime.algorithms.policy.policy_objective` on this micro-batch.

    Needs per-token ``advantages`` and old-policy log-probs in ``batch.fields`` (the engine's
    ``rollout_log_probs`` with --use-rollout-logprobs, else the actor's ``log_probs``), plus
    ``ref_log_probs`` for --use-kl-loss and ``rollout_log_probs`` for --use-tis.
    """
    from slime.algorithms.policy import policy_objective

    cfg = ctx.algorithm
    if cfg is None:
        raise ValueError("policy_loss needs the RL algorithm flags (LossContext.algorithm)")
    fields = batch.fields
    old_key = "rollout_log_probs" if cfg.use_rollout_logprobs else "log_probs"
    for key in ("advantages", old_key):
        if key not in fields:
            raise ValueError(f"policy_loss: the samples carry no {key!r} (compute it before the train step)")
    # The entropy keeps a graph only when its term trains; as a metric it costs no backward.
    logp, entropy = token_stats(
        logits,
        batch.labels,
        ctx.vocab_size,
        ctx.vocab_start,
        chunk_tokens=ctx.chunk_tokens,
        with_entropy=True,
        entropy_grad=bool(cfg.entropy_coef),
    )
    return policy_objective(
        cfg,
        log_probs=logp,
        old_log_probs=fields[old_key],
        advantages=fields["advantages"],
        weights=batch.weights,
        entropy=entropy,
        ref_log_probs=fields.get("ref_log_probs"),
        rollout_log_probs=fields.get("rollout_log_probs"),
        segment_ids=batch.segment_ids,
        num_segments=batch.num_samples,
        segment_reduce=ctx.segment_reduce,
    )


LOSSES: dict[str, Callable] = {"sft_loss": sft_loss, "policy_loss": policy_loss}


def resolve_loss(loss_type: str, custom_path: str | None = None) -> Callable:
    """The loss function for the flags, resolved at start-up (a bad name fails before training)."""
    if loss_type == "custom_loss" and not custom_path:
        raise ValueError("--loss-type custom_loss needs --custom-loss-function-path")
    if custom_path:
        from slime.utils.plugins import load_function

        return load_function(custom_path, "--custom-loss-function-path", ("logits", "batch", "ctx"))
    if loss_type not in LOSSES:
        raise ValueError(
            f"unknown --loss-type {loss_type!r}; choose from {sorted(LOSSES)} "
            "or custom_loss with --custom-loss-function-path"
        )
    return LOSSES[loss_type]
