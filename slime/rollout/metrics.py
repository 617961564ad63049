"""Rollout metrics: what a rollout produced and how fast (units in the names)."""

from __future__ import annotations

import statistics

from slime.utils.types import Sample

__all__ = ["flatten_groups", "rollout_metrics", "scalar_reward"]


def flatten_groups(groups: list) -> list[Sample]:
    """Samples of ``groups`` in order; a group item may itself be a list (fan-out generate plugins)."""
    out: list[Sample] = []
    for group in groups:
        for item in group if isinstance(group, list) else [group]:
            out.extend(item if isinstance(item, list) else [item])
    return out


def scalar_reward(sample: Sample, reward_key: str | None):
    """The sample's scalar reward under ``reward_key`` (`Sample.reward_for_key`); None if unscored."""
    return None if sample.reward is None else sample.reward_for_key(reward_key)


def rollout_metrics(samples: list[Sample], reward_key: str | None, prefix: str) -> dict[str, float]:
    """Reward mean/std, response length mean/max, truncated and aborted ratios of ``samples``."""
    if not samples:
        return {f"{prefix}/num_samples": 0}
    rewards = [float(r) for r in (scalar_reward(s, reward_key) for s in samples) if r is not None]
    lengths = [s.response_length for s in samples]
    metrics = {
        f"{prefix}/num_samples": len(samples),
        f"{prefix}/response_len_tokens_mean": statistics.fmean(lengths),
        f"{prefix}/response_len_tokens_max": max(lengths),
        f"{prefix}/truncated_ratio": sum(s.status == Sample.Status.TRUNCATED for s in samples) / len(samples),
        f"{prefix}/aborted_ratio": sum(s.status == Sample.Status.ABORTED for s in samples) / len(samples),
    }
    if rewards:
        metrics[f"{prefix}/reward_mean"] = statistics.fmean(rewards)
        metrics[f"{prefix}/reward_std"] = statistics.pstdev(rewards) if len(rewards) > 1 else 0.0
    return metrics
