"""Evaluation rollouts: every prompt of each ``--eval-prompt-data NAME PATH`` set.

Each prompt is sampled ``--n-samples-per-eval-prompt`` times with the eval sampling flags
(``--eval-temperature`` etc., falling back to the rollout ones), through the same generate
and reward path as training (custom generate functions get ``evaluation=True``). Results:
``data[name] = {"rewards", "truncated", "samples"}`` and ``eval/<name>/...`` metrics; the
reward mean and truncation rate of each set are logged. Prompt sets are loaded once per
process.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any

from slime.rollout.base_types import RolloutFnEvalOutput
from slime.rollout.config import RolloutConfig
from slime.rollout.http_utils import session_scope
from slime.rollout.metrics import flatten_groups, rollout_metrics, scalar_reward
from slime.rollout.sglang_rollout import _RUN, _gather_or_cancel, _require_url, _Run, generate_and_rm_group
from slime.utils.types import Sample

__all__ = ["eval_rollout"]

logger = logging.getLogger(__name__)

_EVAL_DATASETS: dict[tuple, Any] = {}


def _eval_dataset(args, path: str):
    from slime.rollout.prompt_dataset import PromptDataConfig, PromptDataset

    cfg = PromptDataConfig.from_args(args, path=path, evaluation=True)
    key = tuple(sorted((k, str(v)) for k, v in cfg.__dict__.items()))
    if key not in _EVAL_DATASETS:
        _EVAL_DATASETS[key] = PromptDataset(cfg)
    return _EVAL_DATASETS[key]


async def eval_rollout(args, rollout_id: int) -> RolloutFnEvalOutput:
    """Every prompt of each ``--eval-prompt-data NAME PATH`` set, ``--n-samples-per-eval-prompt`` times."""
    cfg = RolloutConfig.from_args(args)
    pairs = list(getattr(args, "eval_prompt_data", None) or [])
    if not pairs or len(pairs) % 2:
        raise ValueError("--eval-prompt-data takes NAME PATH pairs")
    reward_key = getattr(args, "eval_reward_key", None) or getattr(args, "reward_key", None)
    run = _Run(
        cfg=cfg, url=_require_url(cfg.router_url), semaphore=asyncio.Semaphore(cfg.concurrency), rollout_id=rollout_id
    )
    token = _RUN.set(run)
    sampling_params = cfg.sampling_params(evaluation=True)
    data, metrics = {}, {}
    try:
        async with session_scope():
            for name, path in zip(pairs[::2], pairs[1::2]):
                start, tokens_before = time.perf_counter(), run.generated_tokens
                groups, index = [], 0
                for g, prompt in enumerate(_eval_dataset(args, path).samples):
                    group = []
                    for _ in range(cfg.n_samples_per_eval_prompt):
                        s = copy.deepcopy(prompt)
                        s.group_index, s.index = g, index
                        index += 1
                        group.append(s)
                    groups.append(group)
                results = await _gather_or_cancel(
                    generate_and_rm_group(args, g, sampling_params, evaluation=True) for g in groups
                )
                samples = flatten_groups(list(results))
                elapsed = time.perf_counter() - start
                data[name] = {
                    "rewards": [scalar_reward(s, reward_key) for s in samples],
                    "truncated": [s.status == Sample.Status.TRUNCATED for s in samples],
                    "samples": samples,
                }
                metrics.update(rollout_metrics(samples, reward_key, f"eval/{name}"))
                metrics[f"eval/{name}/time_s"] = elapsed
                metrics[f"eval/{name}/gen_tokens_per_s"] = (
                    (run.generated_tokens - tokens_before) / elapsed if elapsed > 0 else 0.0
                )
                logger.info(
                    "eval %s (rollout %d): reward mean %.4f, truncated %.3f over %d samples",
                    name,
                    rollout_id,
                    metrics.get(f"eval/{name}/reward_mean", float("nan")),
                    metrics[f"eval/{name}/truncated_ratio"],
                    len(samples),
                )
    finally:
        _RUN.reset(token)
    return RolloutFnEvalOutput(data=data, metrics=metrics)
