"""Buffer filters: which buffered (partially generated) groups the next rollout continues."""

from __future__ import annotations

from slime.utils.types import Sample

__all__ = ["pop_first"]


def pop_first(args, rollout_id, buffer: list[list[Sample]], num_samples: int) -> list[list[Sample]]:
    """The oldest ``num_samples`` groups, removed from ``buffer`` (FIFO)."""
    taken = buffer[: max(0, num_samples)]
    del buffer[: len(taken)]
    return taken
