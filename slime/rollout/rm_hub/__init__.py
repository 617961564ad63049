"""Rewards of the rollout (slime's ``slime.rollout.rm_hub``).

`async_rm` scores one sample, `batched_async_rm` a list (with ``--group-rm``, one call of
the custom function for the whole group). Which reward applies, first match wins:

1. the sample's own ``custom_rm_path`` (eval dataset configs set it);
2. ``--custom-rm-path`` (``async def reward(args, sample, **kwargs)``; with ``--group-rm``
   ``async def reward(args, samples, **kwargs) -> list``);
3. ``sample.metadata["rm_type"]``, else ``--rm-type``, one of `RM_TYPES`. A ``boxed_``
   prefix (``boxed_f1``) grades only the last ``\\boxed{}`` of the response.

Every result passes `plugin_contracts.check_reward` (no None, finite, ``--reward-key``
present in dict rewards).

The package is imported when the main parser is built (``rm_hub.config`` lives in it), so
only light modules load here; the HTTP client of ``remote_rm`` (aiohttp) loads on first use.
"""

from __future__ import annotations

from slime.rollout.plugin_contracts import REWARD_FLAG, check_group_rewards, check_reward, load_reward_function
from slime.rollout.rm_hub.dapo import compute_score as dapo_score
from slime.rollout.rm_hub.deepscaler import boxed_math_reward, get_deepscaler_rule_based_reward
from slime.rollout.rm_hub.f1 import f1_score
from slime.rollout.rm_hub.math_utils import last_boxed
from slime.utils.types import Sample

__all__ = ["RM_TYPES", "async_rm", "batched_async_rm", "rule_based_reward"]

RM_TYPES = ("deepscaler", "dapo", "math", "f1", "remote_rm")


def rule_based_reward(rm_type: str, response: str, label):
    """The built-in reward ``rm_type`` of ``response`` against ``label`` (remote_rm excluded)."""
    if rm_type.startswith("boxed_"):
        response = last_boxed(response) or ""
        rm_type = rm_type[len("boxed_") :]
    if rm_type == "deepscaler":
        return get_deepscaler_rule_based_reward(response, label)
    if rm_type == "dapo":
        return dapo_score(response, label)
    if rm_type == "math":
        return boxed_math_reward(response, label)
    if rm_type == "f1":
        return f1_score(response, "" if label is None else str(label))[0]
    raise ValueError(
        f"--rm-type {rm_type!r} is not a built-in reward; choose one of {', '.join(RM_TYPES)} or set --custom-rm-path"
    )


def _reward_key(args, evaluation: bool) -> str | None:
    if evaluation and getattr(args, "eval_reward_key", None):
        return args.eval_reward_key
    return getattr(args, "reward_key", None)


async def _one(args, sample: Sample, evaluation: bool, **kwargs):
    custom = sample.custom_rm_path or getattr(args, "custom_rm_path", None)
    if custom:
        fn = load_reward_function(custom, False)
        return f"{REWARD_FLAG} {custom!r}", await fn(args, sample, **kwargs)
    rm_type = str((sample.metadata or {}).get("rm_type") or getattr(args, "rm_type", None) or "").strip()
    if not rm_type:
        raise ValueError("no reward: set --rm-type (one of " + ", ".join(RM_TYPES) + ") or --custom-rm-path")
    if rm_type == "remote_rm":
        from slime.rollout.rm_hub.remote import remote_rm

        return f"--rm-type remote_rm ({args.rm_url})", await remote_rm(args, sample)
    return f"--rm-type {rm_type}", rule_based_reward(rm_type, sample.response, sample.label)


async def async_rm(args, sample: Sample, evaluation: bool = False, **kwargs):
    """The checked reward of one sample."""
    source, value = await _one(args, sample, evaluation, **kwargs)
    return check_reward(source, value, sample, _reward_key(args, evaluation))


async def batched_async_rm(args, samples: list[Sample], evaluation: bool = False, **kwargs) -> list:
    """Rewards of ``samples``: one group call with ``--custom-rm-path`` + ``--group-rm``, else per sample."""
    import asyncio

    custom = getattr(args, "custom_rm_path", None)
    if custom and getattr(args, "group_rm", False):
        fn = load_reward_function(custom, True)
        values = await fn(args, samples, **kwargs)
        return check_group_rewards(f"{REWARD_FLAG} {custom!r}", values, samples, _reward_key(args, evaluation))
    return list(await asyncio.gather(*(async_rm(args, s, evaluation=evaluation, **kwargs) for s in samples)))
