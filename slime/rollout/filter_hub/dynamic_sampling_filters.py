"""Dynamic sampling filters (DAPO-style): drop groups that carry no learning signal."""

from __future__ import annotations

import statistics

from slime.rollout.filter_hub.base_types import DynamicFilterOutput
from slime.utils.types import Sample

__all__ = ["check_reward_nonzero_std", "check_reward_nonzero_std_with_fallback"]

# Rewards are usually 0/1 or +-1; anything closer than this is "all the same".
_MIN_STD = 1e-6


def check_reward_nonzero_std(args, samples: list[Sample], **kwargs) -> DynamicFilterOutput:
    """Keep a group only if its rewards differ (all-correct or all-wrong groups give zero advantage)."""
    rewards = [s.get_reward_value(args) for s in samples]
    std = statistics.pstdev(float(r) for r in rewards) if len(rewards) > 1 else 0.0
    keep = std > _MIN_STD
    # The reason names the shared value (zero_std_0 / zero_std_1): counted per reason in the metrics.
    return DynamicFilterOutput(keep=keep, reason=None if keep else f"zero_std_{round(rewards[0], 1)}")


def check_reward_nonzero_std_with_fallback(args, samples: list[Sample], **kwargs) -> DynamicFilterOutput:
    """As `check_reward_nonzero_std`, but keep a zero-std group rather than start another sampling round."""
    output = check_reward_nonzero_std(args, samples, **kwargs)
    output.keep_when_insufficient = True
    return output
