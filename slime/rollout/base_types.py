"""What a rollout function returns (slime's ``slime.rollout.base_types``).

``generate_rollout(args, rollout_id, data_source, evaluation=False)`` returns

* for training: `RolloutFnTrainOutput` -- ``samples`` is a list of groups (one group per
  prompt, ``--n-samples-per-prompt`` samples each) plus a dict of metrics to log;
* for evaluation: `RolloutFnEvalOutput` -- ``data`` maps each eval dataset name to
  ``{"rewards": [...], "truncated": [...], "samples": [...]}`` plus metrics.

Older plugins return the bare list (train) or dict (eval); `call_rollout_fn` wraps those, so
callers always see the dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from slime.utils.types import Sample

__all__ = ["RolloutFnEvalOutput", "RolloutFnTrainOutput", "call_rollout_fn"]


@dataclass
class RolloutFnTrainOutput:
    """Training rollout: groups of samples (``list[list[Sample]]``; a flat ``list[Sample]`` is accepted)."""

    samples: list
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutFnEvalOutput:
    """Eval rollout: ``{dataset_name: {"rewards", "truncated", "samples"}}``."""

    data: dict[str, dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _check_train(fn: Callable, output: RolloutFnTrainOutput) -> None:
    if not isinstance(output.samples, list):
        raise TypeError(
            f"rollout function {_name(fn)} returned samples of type {type(output.samples).__name__}, expected a list"
        )
    for i, item in enumerate(output.samples):
        group = item if isinstance(item, list) else [item]
        for sample in group:
            if not isinstance(sample, Sample):
                raise TypeError(
                    f"rollout function {_name(fn)}: samples[{i}] holds a {type(sample).__name__}, "
                    "expected Sample (or a list of Sample per group)"
                )


def _check_eval(fn: Callable, output: RolloutFnEvalOutput) -> None:
    if not isinstance(output.data, dict):
        raise TypeError(
            f"rollout function {_name(fn)} (evaluation) returned {type(output.data).__name__}, expected a dict of datasets"
        )
    for name, entry in output.data.items():
        if not isinstance(entry, dict) or "rewards" not in entry:
            raise TypeError(
                f"rollout function {_name(fn)} (evaluation): data[{name!r}] must be a dict with a 'rewards' list"
            )


def call_rollout_fn(fn: Callable, *args, evaluation: bool, **kwargs) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """Call a rollout function and normalize what it returns (legacy lists/dicts are wrapped).

    A result of the wrong kind (an eval output from a train call, non-Sample items, ...)
    raises TypeError naming the function.
    """
    output = fn(*args, **kwargs, evaluation=evaluation)
    wanted, other = (
        (RolloutFnEvalOutput, RolloutFnTrainOutput) if evaluation else (RolloutFnTrainOutput, RolloutFnEvalOutput)
    )
    if isinstance(output, other):
        kind = "an evaluation" if evaluation else "a training"
        raise TypeError(f"rollout function {_name(fn)} returned a {other.__name__} for {kind} call")
    if not isinstance(output, wanted):
        output = RolloutFnEvalOutput(data=output) if evaluation else RolloutFnTrainOutput(samples=output)
    if output.metrics is None:
        output.metrics = {}
    (_check_eval if evaluation else _check_train)(fn, output)
    return output
