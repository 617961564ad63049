"""The dynamic-sampling filter contract and the call that enforces it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["DynamicFilterOutput", "call_dynamic_filter"]


@dataclass
class DynamicFilterOutput:
    """Verdict on one group.

    ``reason`` names why a group was dropped (counted per reason in the rollout metrics).
    ``keep_when_insufficient`` keeps a rejected group anyway when dropping it would leave
    too few candidates to fill the batch (no extra sampling round for it).
    """

    keep: bool
    reason: str | None = None
    keep_when_insufficient: bool = False


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def call_dynamic_filter(fn: Callable | None, args, samples: list, **kwargs) -> DynamicFilterOutput:
    """Run ``fn`` on a group; ``None`` keeps everything. A bool result is the legacy form."""
    if fn is None:
        return DynamicFilterOutput(keep=True)
    output = fn(args, samples, **kwargs)
    if isinstance(output, DynamicFilterOutput):
        return output
    # numpy.bool_ and similar scalars are accepted; anything else is a broken contract.
    if isinstance(output, bool) or type(output).__name__ in ("bool_", "bool"):
        return DynamicFilterOutput(keep=bool(output))
    raise TypeError(
        f"--dynamic-sampling-filter-path {_name(fn)} returned {type(output).__name__} ({output!r}); "
        "expected DynamicFilterOutput or bool"
    )
