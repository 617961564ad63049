"""The reference model of the KL terms: a second set of weights kept off the device.

RL with ``--use-kl-loss`` or ``--kl-coef`` needs log-probs of a fixed reference policy (the
weights the run started from, or ``--ref-load``). Building a second model would double the
device memory; instead `ReferenceWeights` keeps a CPU copy of this rank's parameters (pinned
on CUDA so the copies are fast) and swaps it into the live model only for the reference
forward: the actor's own parameters are stashed to a CPU buffer, the reference copied in,
and the stash copied back afterwards. Copies are in the parameters' dtype, so the swap-back
is bit-exact and the optimizer's fp32 main params (bf16 runs) are never touched.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

__all__ = ["ReferenceWeights"]


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    out.copy_(t.detach())
    return out


class ReferenceWeights:
    """A CPU copy of one rank's parameters (its TP shard), swapped in for reference forwards.

    ``source`` says where the weights came from (``hf:DIR`` or ``torch_dist:DIR``); it is
    written into checkpoints so a resume can check it reloads the same reference.
    """

    def __init__(self, module: torch.nn.Module, source: str):
        self.source = source
        self._pin = torch.cuda.is_available()
        self.tensors = {name: _host_copy(p, self._pin) for name, p in module.named_parameters()}
        self._stash: dict[str, torch.Tensor] | None = None  # the actor's weights during a swap (reused)
        logger.info("reference weights from %s: %.1f MiB on the host", source, self.nbytes / 2**20)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[None]:
        """Inside the block ``module`` holds the reference weights; its own come back on exit."""
        params = dict(module.named_parameters())
        if params.keys() != self.tensors.keys():
            missing, extra = sorted(self.tensors.keys() - params.keys()), sorted(params.keys() - self.tensors.keys())
            raise ValueError(f"reference weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        if self._stash is None:
            self._stash = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=self._pin) for n, t in self.tensors.items()}
        with torch.no_grad():
            # Same stream for every copy, so the stash is filled before the reference overwrites.
            for name, p in params.items():
                self._stash[name].copy_(p.detach(), non_blocking=True)
                p.copy_(self.tensors[name], non_blocking=True)
            self._sync()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self._stash[name], non_blocking=True)
                self._sync()

    def _sync(self) -> None:
        if self._pin:
            torch.cuda.synchronize()
