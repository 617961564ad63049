"""The default RL rollout: ``--rollout-function-path slime.rollout.sglang_rollout.generate_rollout``.

``generate_rollout(args, rollout_id, data_source, evaluation=False)`` generates
``--rollout-batch-size`` groups of ``--n-samples-per-prompt`` samples through an inference
engine at a URL (SGLang's router, or any server speaking SGLang's ``/generate``), scores
them, and returns `RolloutFnTrainOutput` (or `RolloutFnEvalOutput`, see `slime.rollout.eval_rollout`).

How a training rollout runs (asyncio, at most ``--sglang-server-concurrency`` x engines
requests in flight):

1. fetch ``--over-sampling-batch-size`` prompt groups from the data source whenever the
   groups still in play (submitted minus dropped) fall below the batch size -- this is the
   refill when the dynamic-sampling filter drops groups;
2. each group: generate every sample (``--custom-generate-function-path`` or `generate`),
   then reward it (per sample, or per group with ``--group-rm``);
3. each finished group goes through ``--dynamic-sampling-filter-path``; kept groups count
   towards the batch, dropped ones are counted per reason;
4. once the batch is full, requests still running are aborted (``POST /abort_request``) and
   awaited; with ``--partial-rollout`` those groups (and finished surplus groups) go back to
   the data source's buffer and continue next rollout, otherwise they are counted as
   discarded. ``sample.metadata["start_rollout_id"]`` records the rollout that first
   generated for a sample.

Nothing here depends on which engine serves the URL.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable

from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.rollout.config import RolloutConfig, engine_url
from slime.rollout.filter_hub.base_types import call_dynamic_filter
from slime.rollout.http_utils import HTTPRequestError, get_json, post_json, session_scope
from slime.rollout.metrics import flatten_groups, rollout_metrics
from slime.rollout.plugin_contracts import (
    GENERATE_FLAG,
    PluginError,
    check_generated,
    load_dynamic_filter,
    load_generate_function,
    takes_evaluation,
)
from slime.rollout.rm_hub import batched_async_rm
from slime.utils.types import Sample

__all__ = [
    "RolloutAborted",
    "engine_generate",
    "generate",
    "generate_and_rm",
    "generate_and_rm_group",
    "generate_rollout",
    "generate_rollout_async",
]

logger = logging.getLogger(__name__)

# Re-send the abort while aborted requests are still running: a request that raced past the
# first abort (sent just before it) must not run on to its full length.
ABORT_RESEND_S = 2.0
# Warn each time this many batches' worth of groups has been dropped by the dynamic filter.
DROP_WARN_EVERY = 4


class RolloutAborted(Exception):
    """Raised by `engine_generate` once the rollout has enough groups: start no new request."""


@dataclass
class _Run:
    """State of one rollout call, visible to every task it spawns (through `_RUN`)."""

    cfg: RolloutConfig
    url: str
    semaphore: asyncio.Semaphore
    rollout_id: int
    aborted: bool = False
    generated_tokens: int = 0
    requests: int = 0
    first_logged: bool = field(default=False)


_RUN: ContextVar[_Run | None] = ContextVar("slime_rollout_run", default=None)


def _require_url(url: str | None) -> str:
    if not url:
        raise ValueError(
            "no inference engine URL: start the rollout engines, or point at a running router with "
            "--sglang-router-ip/--sglang-router-port"
        )
    return url.rstrip("/")


def _check_reply(url: str, out: Any) -> dict:
    if (
        not isinstance(out, dict)
        or not isinstance(out.get("meta_info"), dict)
        or "finish_reason" not in out["meta_info"]
    ):
        raise RuntimeError(
            f"{url}/generate: reply is not SGLang-shaped (need meta_info.finish_reason): {str(out)[:300]}"
        )
    return out


async def engine_generate(args, payload: dict) -> dict:
    """POST ``payload`` to the engine's ``/generate``; the one place rollout code calls the engine.

    Plugins (custom generate functions) use it too, so they share the rollout's connection
    pool, count towards its tokens/s, and stop cleanly when the rollout aborts.
    """
    run = _RUN.get()
    if run is not None and run.aborted:
        raise RolloutAborted()
    url = run.url if run is not None else _require_url(engine_url(args))
    out = _check_reply(url, await post_json(f"{url}/generate", payload))
    if run is not None:
        run.requests += 1
        run.generated_tokens += int(out["meta_info"].get("completion_tokens") or len(out.get("output_ids") or []))
    return out


def _reply_tokens(out: dict) -> tuple[list[int], list[float]]:
    entries = out["meta_info"].get("output_token_logprobs")
    if entries is None:
        raise RuntimeError("engine reply has no meta_info.output_token_logprobs (the request set return_logprob=True)")
    return [int(e[1]) for e in entries], [float(e[0]) for e in entries]


def _tokenizer(args):
    from slime.rollout.prompt_dataset import load_tokenizer

    return load_tokenizer(args.hf_checkpoint)


async def generate(args, sample: Sample, sampling_params: dict) -> Sample:
    """One engine call continuing ``sample`` (prompt, plus any partial response) by up to max_new_tokens."""
    if sample.status not in (Sample.Status.PENDING, Sample.Status.ABORTED):
        raise ValueError(f"sample {sample.index}: generate() got a sample with status {sample.status.value}")
    if not sample.tokens:
        if not isinstance(sample.prompt, str):
            raise ValueError(f"sample {sample.index}: no prompt tokens and a non-string prompt; render it first")
        sample.tokens = _tokenizer(args).encode(sample.prompt, add_special_tokens=False)
    params = dict(sampling_params)
    # A continued (partial-rollout) sample only gets what is left of its budget.
    params["max_new_tokens"] = int(params["max_new_tokens"]) - sample.response_length
    if params["max_new_tokens"] <= 0:
        sample.status = Sample.Status.TRUNCATED
        return sample
    out = await engine_generate(
        args, {"input_ids": list(sample.tokens), "sampling_params": params, "return_logprob": True}
    )
    tokens, log_probs = _reply_tokens(out)
    sample.append_response_tokens(
        args, tokens=tokens, log_probs=log_probs, meta_info=out["meta_info"], text=out.get("text", "")
    )
    return sample


async def _run_generate(args, sample: Sample, sampling_params: dict, evaluation: bool):
    path = sample.generate_function_path or getattr(args, "custom_generate_function_path", None)
    if not path:
        return await generate(args, sample, sampling_params)
    fn = load_generate_function(path)
    if takes_evaluation(fn):
        result = await fn(args, sample, sampling_params, evaluation=evaluation)
    else:
        result = await fn(args, sample, sampling_params)
    return check_generated(path, result)


async def _gather_or_cancel(coros) -> list:
    """``asyncio.gather`` that cancels the siblings when one fails, so no orphan keeps calling the engine."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _finished(sample: Sample) -> bool:
    return sample.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED, Sample.Status.FAILED)


async def generate_and_rm(
    args, sample: Sample, sampling_params: dict, evaluation: bool = False
) -> Sample | list[Sample]:
    """Generate ``sample`` (unless a buffered sample already finished) and reward it."""
    run = _RUN.get()
    continuing = sample.response_length and not _finished(sample)
    if (
        continuing
        and getattr(args, "partial_rollout", False)
        and getattr(args, "mask_offpolicy_in_partial_rollout", False)
    ):
        # Tokens from earlier weights are off-policy: keep them as context, train on none of them.
        sample.loss_mask = [0] * sample.response_length
    if not _finished(sample):
        semaphore = run.semaphore if run is not None else asyncio.Semaphore(1)
        async with semaphore:
            if run is not None and run.aborted:
                sample.status = Sample.Status.ABORTED
                return sample
            try:
                sample = await _run_generate(args, sample, sampling_params, evaluation)
            except RolloutAborted:
                sample.status = Sample.Status.ABORTED
                return sample
    if getattr(args, "group_rm", False):
        return sample
    items = sample if isinstance(sample, list) else [sample]
    if any(s.status == Sample.Status.ABORTED for s in items):
        return sample
    todo = [s for s in items if s.reward is None]
    for s, reward in zip(todo, await batched_async_rm(args, todo, evaluation=evaluation)):
        s.reward = reward
    return sample


async def generate_and_rm_group(args, group: list[Sample], sampling_params: dict, evaluation: bool = False) -> list:
    """All samples of one prompt, concurrently; with ``--group-rm`` one reward call for the group."""
    run = _RUN.get()
    tasks = []
    for sample in group:
        params = dict(sampling_params)
        if run is not None and run.cfg.deterministic_seeds and sample.index is not None:
            params["sampling_seed"] = run.cfg.seed + sample.index
        tasks.append(generate_and_rm(args, sample, params, evaluation=evaluation))
    group = await _gather_or_cancel(tasks)
    flat = flatten_groups([group])
    if getattr(args, "group_rm", False) and not any(s.status == Sample.Status.ABORTED for s in flat):
        for s, reward in zip(flat, await batched_async_rm(args, flat, evaluation=evaluation)):
            s.reward = reward
    return group


async def _abort_engine(url: str) -> None:
    """Abort every request on the engine(s) behind ``url`` (each worker of a router, or the server itself)."""
    try:
        workers = await get_json(f"{url}/workers")
        urls = [w["url"].rstrip("/") for w in workers.get("workers", [])] if isinstance(workers, dict) else []
    except (HTTPRequestError, KeyError, TypeError):
        urls = []
    for target in urls or [url]:
        try:
            await post_json(f"{target}/abort_request", {"abort_all": True}, retries=1)
        except HTTPRequestError as e:
            logger.warning("abort at %s failed: %s", target, e)


async def _drain(run: _Run, pending: set) -> list:
    """Abort what is still running and wait for it; returns the groups of those tasks."""
    if not pending:
        return []
    run.aborted = True
    groups = []
    while pending:
        await _abort_engine(run.url)
        done, pending = await asyncio.wait(pending, timeout=ABORT_RESEND_S)
        groups.extend(t.result() for t in done)
    return groups


def _group_size_error(args, got: int, want: int) -> PluginError:
    plugin = getattr(args, "custom_generate_function_path", None)
    who = f"{GENERATE_FLAG} {plugin!r}" if plugin else "the data source"
    return PluginError(f"{who}: a group came back with {got} samples, expected --n-samples-per-prompt {want}")


def _log_first(run: _Run, group: list) -> None:
    if run.first_logged:
        return
    run.first_logged = True
    s = flatten_groups([group])[0]
    logger.info(
        "first rollout sample: prompt+response=%r label=%r reward=%r status=%s",
        (str(s.prompt) + s.response)[-600:],
        str(s.label)[:100],
        s.reward,
        s.status.value,
    )


async def generate_rollout_async(args, rollout_id: int, data_source) -> tuple[RolloutFnTrainOutput, list[list[Sample]]]:
    """One training rollout; returns the output and the groups left over (for the partial-rollout buffer).

    ``data_source`` is a data source or its ``get_samples`` callable (slime's form).
    """
    cfg = RolloutConfig.from_args(args)
    get_samples: Callable = data_source.get_samples if hasattr(data_source, "get_samples") else data_source
    dynamic_filter = load_dynamic_filter(cfg.dynamic_sampling_filter_path) if cfg.dynamic_sampling_filter_path else None
    run = _Run(
        cfg=cfg, url=_require_url(cfg.router_url), semaphore=asyncio.Semaphore(cfg.concurrency), rollout_id=rollout_id
    )
    token = _RUN.set(run)
    target, n = cfg.rollout_batch_size, cfg.n_samples_per_prompt
    kept: list[list] = []
    leftover: list[list] = []
    dropped: collections.Counter = collections.Counter()
    judged: list[Sample] = []  # every sample of every group the filter saw, kept or dropped
    pending: set = set()
    done_unread: set = set()
    in_play = rounds = 0
    start = time.perf_counter()
    sampling_params = cfg.sampling_params()
    try:
        async with session_scope():
            while len(kept) < target:
                while in_play < target:
                    groups = get_samples(cfg.over_sampling_batch_size)
                    if not groups:
                        raise RuntimeError(f"the data source returned no prompt groups (rollout {rollout_id})")
                    rounds += 1
                    for group in groups:
                        for s in group:
                            s.metadata.setdefault("start_rollout_id", rollout_id)
                        pending.add(asyncio.ensure_future(generate_and_rm_group(args, group, sampling_params)))
                    in_play += len(groups)
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                done_unread = set(done)
                for task in sorted(done, key=lambda t: flatten_groups([t.result()])[0].index or 0):
                    done_unread.discard(task)
                    group = task.result()
                    if len(group) != n:
                        raise _group_size_error(args, len(group), n)
                    _log_first(run, group)
                    if len(kept) >= target:
                        leftover.append(group)  # finished after the batch filled: surplus
                        continue
                    flat = flatten_groups([group])
                    if any(s.status == Sample.Status.ABORTED for s in flat):
                        # Aborted by the engine itself (e.g. a weight update): not trainable as is.
                        dropped["aborted"] += 1
                        in_play -= 1
                        leftover.append(group)
                        continue
                    judged.extend(flat)
                    verdict = call_dynamic_filter(dynamic_filter, args, flat)
                    if not verdict.keep and not (verdict.keep_when_insufficient and in_play <= target):
                        dropped[verdict.reason or "filtered"] += 1
                        in_play -= 1
                        if sum(dropped.values()) % (DROP_WARN_EVERY * target) == 0:
                            # A filter that rejects (almost) everything would otherwise spin silently.
                            logger.warning(
                                "rollout %d: %d groups dropped so far %s, %d of %d kept; check the filter or the data",
                                rollout_id,
                                sum(dropped.values()),
                                dict(dropped),
                                len(kept),
                                target,
                            )
                        continue
                    kept.append(group)
            leftover.extend(await _drain(run, pending))
            pending = set()
    except BaseException:
        # Never leave requests running on the engine behind a failed rollout.
        run.aborted = True
        for task in pending:
            task.cancel()
        # Also collects the exceptions of finished tasks nobody looked at (no "never retrieved" noise).
        await asyncio.gather(*pending, *done_unread, return_exceptions=True)
        try:
            await _abort_engine(run.url)
        except Exception as e:  # the original error matters more
            logger.warning("abort after a failed rollout failed: %s", e)
        raise
    finally:
        _RUN.reset(token)
    elapsed = time.perf_counter() - start

    kept.sort(key=lambda g: flatten_groups([g])[0].index or 0)
    metrics = rollout_metrics(flatten_groups(kept), getattr(args, "reward_key", None), "rollout")
    # The kept groups' reward is what the filter let through (all-0 and all-1 groups are gone
    # under check_reward_nonzero_std); this is the policy's own success rate this rollout.
    unfiltered = rollout_metrics(judged, getattr(args, "reward_key", None), "rollout/unfiltered")
    if "rollout/unfiltered/reward_mean" in unfiltered:
        metrics["rollout/unfiltered/reward_mean"] = unfiltered["rollout/unfiltered/reward_mean"]
    metrics.update(
        {
            "rollout/time_s": elapsed,
            "rollout/gen_tokens": run.generated_tokens,
            "rollout/gen_tokens_per_s": run.generated_tokens / elapsed if elapsed > 0 else 0.0,
            "rollout/engine_requests": run.requests,
            "rollout/sampling_rounds": rounds,
            "rollout/kept_groups": len(kept),
            "rollout/dropped_groups": sum(dropped.values()),
            "rollout/leftover_groups": len(leftover),
        }
    )
    metrics.update({f"rollout/dynamic_filter/drop_{reason}": count for reason, count in dropped.items()})
    if not cfg.partial_rollout:
        metrics["rollout/discarded_groups"] = len(leftover)
        if leftover:
            logger.info(
                "rollout %d: discarded %d unfinished/surplus groups (use --partial-rollout to keep them)",
                rollout_id,
                len(leftover),
            )
        leftover = []
    else:
        metrics["rollout/partial_groups_buffered"] = len(leftover)
    return RolloutFnTrainOutput(samples=kept, metrics=metrics), leftover


class _LoopThread:
    """An asyncio event loop running forever on a daemon thread; `run` submits a coroutine and waits.

    generate_rollout is called synchronously (RolloutManager actor, tests, scripts), possibly
    from a thread whose own loop is already running, so the coroutine cannot simply be
    ``asyncio.run`` there.
    """

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def run(self, coro):
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="slime-rollout-loop", daemon=True).start()
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()


# One loop for the whole process, on purpose: plugins ported from slime (custom generate and
# reward functions) may create loop-bound objects on first use -- an aiohttp session, an
# asyncio.Lock or Semaphore kept in a module -- and reuse them in later rollouts, which only
# works if every rollout runs on the same loop (as in slime). slime's plugin signature,
# generate_rollout(args, rollout_id, data_source, evaluation), leaves no object of ours that
# lives across calls to hold it, so the process does.
_ROLLOUT_LOOP = _LoopThread()


def run_sync(coro):
    """Run ``coro`` on the rollout's event loop thread and return its result."""
    return _ROLLOUT_LOOP.run(coro)


def generate_rollout(
    args, rollout_id: int, data_source, evaluation: bool = False
) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """slime's rollout entry point (see the module doc)."""
    if evaluation:
        from slime.rollout.eval_rollout import eval_rollout

        return run_sync(eval_rollout(args, rollout_id))
    output, leftover = run_sync(generate_rollout_async(args, rollout_id, data_source))
    if leftover:
        data_source.add_samples(leftover)
    return output
