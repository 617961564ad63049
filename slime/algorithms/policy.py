"""The policy-gradient objective on per-token tensors (any shape, one entry per position).

Inputs are aligned position by position: ``log_probs`` of the current policy (with grad),
``old_log_probs`` of the policy that produced the data (the actor's recomputation, or the
engine's with --use-rollout-logprobs), ``advantages``, and ``weights``: the reduction weights
that already hold the global denominator (1 / supervised tokens of the global batch, or
1 / (sample tokens * samples) per sample; 0 where nothing is trained). Every term is
``sum(term_t * weights_t)``, so contributions of micro-batches and DP ranks simply add up and
every metric is a per-token (or per-sample) mean over the whole global batch.

Terms, with ratio_t = exp(log_probs_t - old_log_probs_t):

* PPO clipped surrogate: max(-A ratio, -A clip(ratio, 1 - eps_clip, 1 + eps_clip_high));
  dual clip (--eps-clip-c c): for A < 0 the loss is also capped at -c A.
  gspo: the ratio is per sequence, exp(mean over its supervised tokens of log_probs - old).
* TIS (--use-tis): the surrogate is multiplied by clamp(exp(old - rollout), low, high),
  the trainer/engine importance weight, truncated.
* KL loss (--use-kl-loss): + kl_loss_coef * kl(log_probs, ref_log_probs).
* entropy bonus: - entropy_coef * entropy.
"""

from __future__ import annotations

from typing import Callable

import torch

from slime.algorithms.config import AlgorithmConfig
from slime.algorithms.kl import approx_kl

__all__ = ["clipped_surrogate", "entropy_from_logits", "policy_objective", "sequence_mean", "tis_weights"]


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, clipped indicator, dual-clipped indicator) of the PPO surrogate.

    ``log_ratio`` = log pi - log pi_old. "clipped" marks tokens where the clipped branch
    is the larger loss (its gradient is then zero); "dual-clipped" where the -c A cap applies.
    """
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    loss = torch.maximum(unclipped, clipped)
    clip_frac = (clipped > unclipped).to(loss.dtype)
    dual_frac = torch.zeros_like(loss)
    if eps_clip_c is not None:
        cap = -eps_clip_c * advantages
        dual = (advantages < 0) & (cap < loss)
        loss = torch.where(dual, cap, loss)
        dual_frac = dual.to(loss.dtype)
    return loss, clip_frac, dual_frac


def sequence_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int | None = None,
    segment_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each position gets the masked mean of ``values`` over its segment (sample); -1 = no segment.

    Under context parallelism a sample's positions are spread over ranks: ``segment_reduce``
    sums the ``[2, num_segments]`` per-segment (sums, counts) over those ranks, differentiably,
    and ``num_segments`` (the samples of the micro-batch) keeps the shapes equal on every rank.
    """
    flat_v, flat_m, seg = values.reshape(-1), mask.reshape(-1).to(values.dtype), segment_ids.reshape(-1)
    valid = seg >= 0
    idx = torch.where(valid, seg, torch.zeros_like(seg))
    n = num_segments if num_segments is not None else (int(seg.max()) + 1 if seg.numel() else 0)
    sums = flat_v.new_zeros(n).index_add(0, idx, flat_v * flat_m * valid)
    counts = flat_v.new_zeros(n).index_add(0, idx, flat_m * valid)
    if segment_reduce is not None:
        sums, counts = segment_reduce(torch.stack([sums, counts])).unbind(0)
    means = sums / counts.clamp_min(1)
    return torch.where(valid, means[idx], torch.zeros_like(flat_v)).view_as(values)


def tis_weights(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, clip: float, clip_low: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance weights clamp(exp(old - rollout), clip_low, clip), no gradient.

    Per-token stats: ``tis`` (the untruncated ratio), ``tis_clipfrac`` (truncated or not),
    ``tis_abs`` (|ratio - 1|, the size of the mismatch).
    """
    ratio = (old_log_probs.detach() - rollout_log_probs.detach()).exp()
    w = ratio.clamp(clip_low, clip)
    return w, {"tis": ratio, "tis_clipfrac": (w != ratio).to(ratio.dtype), "tis_abs": (ratio - 1).abs()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, -sum p log p (full vocabulary)."""
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def policy_objective(
    cfg: AlgorithmConfig,
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    entropy: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    segment_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss contribution of these positions and its metrics (detached weighted sums).

    ``segment_ids`` (sample index per position, -1 for none) is needed by gspo; so are, under
    context parallelism, ``num_segments`` and ``segment_reduce`` (see `sequence_mean`).
    ``rollout_log_probs`` is needed by --use-tis and gives the mismatch metric when present.
    Metrics (means over the tokens, or samples, that the weights define): pg_loss,
    pg_clipfrac / pg_dualclipfrac (fractions of tokens on the clipped / dual-clipped branch),
    ppo_kl (old - new log-prob, nats; estimates KL(old || new)), ppo_ratio (pi / pi_old),
    entropy (nats), kl_loss (the --kl-loss-type estimate vs the reference), tis (the
    untruncated exp(old - rollout)), tis_clipfrac, tis_abs (|tis - 1|),
    train_rollout_logprob_abs_diff (|old - rollout| log-prob, nats), loss.
    """
    w = weights.to(log_probs.dtype)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return (x * w).sum()

    old = old_log_probs.to(log_probs.dtype)
    log_ratio = log_probs - old
    if cfg.advantage_estimator == "gspo":
        if segment_ids is None:
            raise ValueError("gspo needs segment_ids to form per-sequence ratios")
        log_ratio = sequence_mean(log_ratio, w > 0, segment_ids, num_segments, segment_reduce)
    adv = advantages.to(log_probs.dtype)
    pg, clip_frac, dual_frac = clipped_surrogate(log_ratio, adv, cfg.eps_clip, cfg.clip_high, cfg.eps_clip_c)
    metrics: dict[str, torch.Tensor] = {}
    if cfg.use_tis:
        if rollout_log_probs is None:
            raise ValueError("--use-tis needs the engine's log-probs ('rollout_log_probs') on every sample")
        tw, tis_stats = tis_weights(old, rollout_log_probs.to(old.dtype), cfg.tis_clip, cfg.tis_clip_low)
        pg = pg * tw
        metrics.update({k: reduce(v) for k, v in tis_stats.items()})
    if rollout_log_probs is not None:
        metrics["train_rollout_logprob_abs_diff"] = reduce((old - rollout_log_probs.to(old.dtype)).abs())
    pg_loss = reduce(pg)
    loss = pg_loss
    metrics.update(
        pg_loss=pg_loss,
        pg_clipfrac=reduce(clip_frac),
        pg_dualclipfrac=reduce(dual_frac),
        ppo_kl=reduce(-log_ratio),
        ppo_ratio=reduce(log_ratio.detach().exp()),
    )
    if entropy is not None:
        entropy_mean = reduce(entropy.to(log_probs.dtype))
        metrics["entropy"] = entropy_mean
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * entropy_mean
    elif cfg.entropy_coef:
        raise ValueError("--entropy-coef needs the per-token entropy")
    if cfg.use_kl_loss:
        if ref_log_probs is None:
            raise ValueError("--use-kl-loss needs the reference log-probs ('ref_log_probs') on every sample")
        kl_loss = reduce(approx_kl(log_probs, ref_log_probs, cfg.kl_loss_type).to(log_probs.dtype))
        metrics["kl_loss"] = kl_loss
        loss = loss + cfg.kl_loss_coef * kl_loss
    metrics["loss"] = loss
    return loss, {k: v.detach() for k, v in metrics.items()}
