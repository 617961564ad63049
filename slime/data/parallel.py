"""Encode rows in worker processes, chunks returned in row order.

Workers are started with the ``spawn`` method: forking a process that runs Ray's threads
(the RolloutManager actor) or has used the tokenizer's thread pool can deadlock or
silently disable tokenizer parallelism, and a spawned worker pays only a short start-up
(it loads the tokenizer itself; torch is kept out, see `_init_worker`). Each worker gets
the encoder (or its `EncoderSpec`), the row source (and the row order of a streamed
epoch) once, then only ``(start, stop)`` ranges; it returns
numpy arrays, so the traffic per row is its token ids and a few counters. At most
``2 x workers`` chunks are in flight, which keeps memory flat however large the file.
"""

from __future__ import annotations

import math
import os
import pickle
from collections import deque
from collections.abc import Iterator

__all__ = ["encode_in_processes", "plan_workers", "usable_cpus"]

#: Below this many rows per worker, starting processes costs more than it saves.
MIN_ROWS_PER_WORKER = 2000


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 quota (containers), if any."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def usable_cpus() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(n, limit) if limit else n)


def plan_workers(requested: int | None, rows: int, min_rows_per_worker: int | None = None) -> int:
    """Worker processes to use: ``requested`` (None = `usable_cpus`), fewer for small data; 1 = in-process."""
    n = usable_cpus() if requested is None else requested
    if n < 1:
        raise ValueError(f"--data-num-workers must be >= 1, got {n}")
    per_worker = MIN_ROWS_PER_WORKER if min_rows_per_worker is None else max(1, min_rows_per_worker)
    return max(1, min(n, rows // per_worker))


_STATE: dict = {}


def _init_worker(payload: bytes) -> None:
    # Only the tokenizer is needed here: keep transformers from importing torch (seconds
    # of start-up and hundreds of MB per worker), and keep each worker on one thread.
    os.environ.setdefault("USE_TORCH", "0")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["OMP_NUM_THREADS"] = "1"
    _STATE["encoder"], _STATE["source"], _STATE["order"] = pickle.loads(payload)


def _encode(start: int, stop: int):
    from slime.data.dataset import EncoderSpec
    from slime.data.prepare import encode_rows

    if isinstance(_STATE["encoder"], EncoderSpec):
        # Built here, not in the initializer, so a bad tokenizer or template raises through
        # the task's future with its own message instead of breaking the pool.
        _STATE["encoder"] = _STATE["encoder"].build()
    return encode_rows(_STATE["encoder"], _STATE["source"], start, stop, _STATE["order"])


def encode_in_processes(encoder, source, ranges: list[tuple[int, int]], workers: int, order=None) -> Iterator:
    """Yield `slime.data.prepare.Chunk` for each range, in order, computed by ``workers`` processes.

    ``order``: ranges index this array of rows instead of the rows themselves (sent once).

    Closing the generator (or an exception in a worker, re-raised here) stops the pool.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    payload = pickle.dumps((encoder, source, order), protocol=pickle.HIGHEST_PROTOCOL)
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(payload,))
    pending: deque = deque()
    todo = iter(ranges)
    try:
        for start, stop in todo:
            pending.append(pool.submit(_encode, start, stop))
            if len(pending) >= 2 * workers:
                break
        while pending:
            chunk = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_encode, *nxt))
            yield chunk
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
