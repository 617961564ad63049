"""Load each kind of rollout plugin and hold it to its contract.

Signatures are checked when a plugin is loaded (before any request is sent); results are
checked on every call. Either way the error is a `PluginError` that names the flag, the
plugin's import path and what was wrong, because a plugin bug otherwise surfaces as a
confusing failure far away (a None reward inside the advantage math, a short group in the
trainer's batch split).
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache
from numbers import Real
from typing import Any, Callable

from slime.utils.plugins import PluginError, load_function
from slime.utils.types import Sample

__all__ = [
    "PluginError",
    "check_generated",
    "check_group_rewards",
    "check_reward",
    "load_buffer_filter",
    "load_dynamic_filter",
    "load_generate_function",
    "load_reward_function",
    "takes_evaluation",
]

GENERATE_FLAG = "--custom-generate-function-path"
REWARD_FLAG = "--custom-rm-path"


@lru_cache(maxsize=None)
def load_generate_function(path: str) -> Callable:
    """``async def generate(args, sample, sampling_params[, evaluation=False]) -> Sample | list[Sample]``."""
    return load_function(path, GENERATE_FLAG, ("args", "sample", "sampling_params"), require_async=True)


@lru_cache(maxsize=None)
def load_reward_function(path: str, group: bool) -> Callable:
    """``async def reward(args, sample, **kwargs) -> float | dict`` (or ``samples -> list`` with --group-rm)."""
    flag = f"{REWARD_FLAG} (with --group-rm)" if group else REWARD_FLAG
    return load_function(path, flag, ("args", "samples" if group else "sample"), require_async=True)


@lru_cache(maxsize=None)
def load_dynamic_filter(path: str) -> Callable:
    """``fn(args, samples, **kwargs) -> DynamicFilterOutput | bool``."""
    fn = load_function(path, "--dynamic-sampling-filter-path", ("args", "samples"))
    if inspect.iscoroutinefunction(fn):
        raise PluginError(f"--dynamic-sampling-filter-path {path!r}: must be a plain function, not async")
    return fn


@lru_cache(maxsize=None)
def load_buffer_filter(path: str) -> Callable:
    """``fn(args, rollout_id, buffer, num_samples) -> list[list[Sample]]`` (removes what it returns)."""
    return load_function(path, "--buffer-filter-path", ("args", "rollout_id", "buffer", "num_samples"))


def takes_evaluation(fn: Callable) -> bool:
    """Whether a generate plugin accepts the optional ``evaluation=`` keyword."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "evaluation" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def check_generated(path: str, result: Any) -> Sample | list[Sample]:
    """A generate plugin must return the Sample (or a non-empty list of Samples, fan-out)."""
    items = result if isinstance(result, list) else [result]
    if not items or not all(isinstance(s, Sample) for s in items):
        got = (
            type(result).__name__
            if not isinstance(result, list)
            else f"list of {sorted({type(s).__name__ for s in items})}"
        )
        raise PluginError(f"{GENERATE_FLAG} {path!r} returned {got}; expected a Sample or a non-empty list of Sample")
    for s in items:
        if s.loss_mask is not None and len(s.loss_mask) != s.response_length:
            raise PluginError(
                f"{GENERATE_FLAG} {path!r}: sample {s.index} has {len(s.loss_mask)} loss_mask entries "
                f"for response_length {s.response_length}"
            )
        if s.response_length > len(s.tokens):
            raise PluginError(
                f"{GENERATE_FLAG} {path!r}: sample {s.index} response_length {s.response_length} > {len(s.tokens)} tokens"
            )
    return result


def check_reward(source: str, value: Any, sample: Sample, reward_key: str | None = None) -> Any:
    """A reward is a finite number, or a dict holding ``--reward-key``; never None."""
    where = f"{source} on sample {sample.index}"
    if value is None:
        raise PluginError(
            f"{where}: reward is None; a reward function must return a number (or a dict with --reward-key)"
        )
    if isinstance(value, dict):
        if reward_key and reward_key not in value:
            raise PluginError(f"{where}: reward dict {sorted(value)} has no --reward-key {reward_key!r}")
        if not reward_key:
            raise PluginError(f"{where}: returned a dict {sorted(value)}; pick the scalar with --reward-key")
        scalar = value[reward_key]
    else:
        scalar = value
    if not isinstance(scalar, Real):  # bools and numpy scalars are Real too
        raise PluginError(f"{where}: reward {scalar!r} is a {type(scalar).__name__}, expected a number")
    if not math.isfinite(float(scalar)):
        raise PluginError(f"{where}: reward {scalar!r} is not finite")
    return value


def check_group_rewards(source: str, values: Any, samples: list[Sample], reward_key: str | None = None) -> list:
    """A group reward function returns one reward per sample, in order."""
    if not isinstance(values, (list, tuple)):
        raise PluginError(
            f"{source} (group): returned {type(values).__name__}; expected a list of {len(samples)} rewards"
        )
    if len(values) != len(samples):
        raise PluginError(f"{source} (group): returned {len(values)} rewards for a group of {len(samples)} samples")
    return [check_reward(source, v, s, reward_key) for v, s in zip(values, samples)]
