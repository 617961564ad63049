"""Training on one rollout, on one rank: slime's order for RL, plain steps for SFT.

A rollout arrives as this DP rank's samples split into optimizer steps. For RL losses
(``policy_loss``, or a custom loss given RL samples) every value the loss reads is computed
over ALL the rank's samples of the rollout before the first update, as slime does, so later
steps of the same rollout still see the policy that generated the data:

1. old-policy log-probs: the actor's forward on the current weights (or, with
   ``--use-rollout-logprobs``, the engine's ``rollout_log_probs``);
2. reference log-probs, when a KL term needs them (``--use-kl-loss`` / ``--kl-coef``), from
   the reference weights swapped in (`ref_model`);
3. advantages (`MegatronActor.compute_advantages`, statistics over the DP group);
4. one ``train_step`` per step.

SFT runs one ``train_step`` per step and nothing else. Every DP rank must call this together.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from slime.backends.megatron_utils.actor import MegatronActor

logger = logging.getLogger(__name__)

__all__ = ["prepare_rollout", "train_rollout", "uses_rl_fields"]


def uses_rl_fields(actor: "MegatronActor", samples: list[dict]) -> bool:
    """policy_loss always; a custom loss when the actor has the RL flags and the samples carry
    rewards (a custom SFT loss gets SFT samples, which have none)."""
    args = actor.train_args
    if args.custom_loss_function_path:
        has_rewards = bool(samples) and all(s.get("reward") is not None for s in samples)
        return actor.loss_ctx.algorithm is not None and has_rewards
    return args.loss_type == "policy_loss"


def _check_rollout_log_probs(samples: list[dict], needed_by: str | None) -> None:
    missing = [i for i, s in enumerate(samples) if s.get("rollout_log_probs") is None]
    if needed_by and missing:
        raise ValueError(
            f"{needed_by} needs the engine's log-probs, but sample {missing[0]} of this rank's rollout has no "
            "'rollout_log_probs' (the rollout must request return_logprob)"
        )


def prepare_rollout(actor: "MegatronActor", samples: list[dict]) -> dict[str, float]:
    """Steps 1-3 of the module docstring, written into ``samples`` (float32 CPU tensors of
    ``response_length`` values under ``log_probs``, ``ref_log_probs``, ``advantages``, ``returns``).

    Returns rollout-level metrics (means over the supervised tokens of every DP rank):
    advantages_mean / advantages_std / returns_mean; ref_kl (nats, the --kl-loss-type
    estimate of KL(old policy || reference), when a reference is used); and the wall time
    of each phase in seconds (log_probs_time_s, ref_log_probs_time_s, advantages_time_s).
    """
    from megatron.core import parallel_state as ps

    from slime.algorithms.advantages import masked_moments
    from slime.algorithms.kl import approx_kl

    cfg = actor.loss_ctx.algorithm
    if cfg is None:
        raise ValueError("RL training needs the RL algorithm flags (MegatronActor(..., algorithm=...))")
    _check_rollout_log_probs(
        samples, "--use-rollout-logprobs" if cfg.use_rollout_logprobs else "--use-tis" if cfg.use_tis else None
    )
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    if cfg.needs_old_log_probs:
        for s, lp in zip(samples, actor.compute_log_probs(samples)["log_probs"]):
            s["log_probs"] = lp
    metrics["log_probs_time_s"] = time.perf_counter() - start
    policy_key = "rollout_log_probs" if cfg.use_rollout_logprobs else "log_probs"
    if cfg.needs_ref_log_probs:
        start = time.perf_counter()
        for s, lp in zip(samples, actor.compute_ref_log_probs(samples)):
            s["ref_log_probs"] = lp
        metrics["ref_log_probs_time_s"] = time.perf_counter() - start
        kls = [
            approx_kl(torch.as_tensor(s[policy_key], dtype=torch.float32), s["ref_log_probs"], cfg.kl_loss_type)
            for s in samples
        ]
        masks = [torch.as_tensor(s["loss_mask"], dtype=torch.float32) for s in samples]
        metrics["ref_kl"], _, _ = masked_moments(kls, masks, ps.get_data_parallel_group(), actor.info.device)
    start = time.perf_counter()
    metrics.update(actor.compute_advantages(samples))
    metrics["advantages_time_s"] = time.perf_counter() - start
    return metrics


def train_rollout(actor: "MegatronActor", steps: list[list[dict]]) -> list[dict]:
    """One rollout: per-step metrics (`MegatronActor.train_step`'s, plus for RL the rollout-level
    ones of `prepare_rollout`, repeated in every step's dict). The caller's dicts are not modified."""
    flat = [s for step in steps for s in step]
    if not uses_rl_fields(actor, flat):
        return [actor.train_step(step) for step in steps]
    steps = [[dict(s) for s in step] for step in steps]  # fields are added: leave the caller's data alone
    rollout_metrics = prepare_rollout(actor, [s for step in steps for s in step])
    return [{**actor.train_step(step), **rollout_metrics} for step in steps]
