"""Split a global batch across DP ranks balanced by tokens (no tensor math: lists only)."""

from __future__ import annotations

import heapq

__all__ = ["split_balanced"]


def split_balanced(lengths: list[int], parts: int) -> list[list[int]]:
    """Indices for each of ``parts`` ranks: equal sample counts, token sums as even as greedy gets.

    Longest-first assignment to the least-loaded rank that still has room; each rank's indices
    are returned in their original order. Equal counts keep every rank's micro-batch plan and
    the per-rank sample share of ``--global-batch-size`` fixed.
    """
    n = len(lengths)
    if parts < 1 or n % parts:
        raise ValueError(f"{n} samples cannot be split evenly over {parts} DP ranks")
    per = n // parts
    heap = [(0, r) for r in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(n), key=lambda i: -lengths[i]):
        full = []
        while True:
            load, r = heapq.heappop(heap)
            if len(out[r]) < per:
                break
            full.append((load, r))
        out[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
        for item in full:
            heapq.heappush(heap, item)
    return [sorted(ix) for ix in out]
