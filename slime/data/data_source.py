"""The rollout data buffer for SFT: serves prepared samples in a seeded, resumable order.

Epoch ``e`` visits every sample once, in ``permutation(seed + e)`` order with
``--rollout-shuffle`` (a fresh order each epoch) or in file order without it. A batch that
runs past the end of an epoch continues into the next one, so every epoch is seen whole.
`state_dict` is (epoch, offset) plus a fingerprint of the sample set (a hash of every
sample's token ids and mask); loading it into a source built from the same data and flags
continues with exactly the next sample, and changed data or flags are refused.

The order depends only on the sample count, the seed and the epoch (`epoch_order`), never
on token content, so a streamed start (`slime.data.stream`) can prepare the samples in the
order this source will ask for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slime.data.dataset import PreparedData
from slime.utils.types import Sample

__all__ = ["SFTDataSource", "epoch_order"]


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Sample indices of epoch ``epoch``: ``permutation(seed + epoch)`` of ``n``, or ``0..n-1``."""
    return np.random.default_rng(seed + epoch).permutation(n) if shuffle else np.arange(n)


@dataclass
class SFTDataSource:
    """``get_samples(n)`` returns the next ``n`` samples with tokens and loss masks.

    ``data``: a `PreparedData`, or a `slime.data.stream.StreamingData` still being prepared
    (same interface; a sample not yet prepared is waited for).
    """

    data: PreparedData
    shuffle: bool = False
    seed: int = 42
    epoch: int = 0
    offset: int = 0

    def __post_init__(self):
        if len(self.data) == 0:
            raise ValueError("SFTDataSource needs at least one sample")
        self._order_epoch = None
        self._order = None

    def __len__(self) -> int:
        """Samples per epoch."""
        return len(self.data)

    @property
    def encoder(self):
        return self.data.encoder

    def num_rollouts(self, num_epoch: int, rollout_batch_size: int) -> int:
        """slime's rule: ``num_epoch * samples // rollout_batch_size`` rollouts."""
        if rollout_batch_size <= 0:
            raise ValueError(f"rollout_batch_size must be positive, got {rollout_batch_size}")
        return num_epoch * len(self) // rollout_batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = epoch_order(len(self.data), self.shuffle, self.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def next_indices(self, n: int) -> list[int]:
        """Advance the position by ``n`` samples and return their indices into ``data``."""
        out = []
        while len(out) < n:
            order = self._epoch_order(self.epoch)
            take = min(n - len(out), len(order) - self.offset)
            out.extend(int(k) for k in order[self.offset : self.offset + take])
            self.offset += take
            if self.offset == len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def get_samples(self, n: int) -> list[Sample]:
        position = self.epoch * len(self) + self.offset
        return [self.data.sample(k, index=position + j) for j, k in enumerate(self.next_indices(n))]

    def position(self) -> dict:
        """Where the next sample comes from; cheap (`state_dict` adds the fingerprint, which
        needs every sample prepared)."""
        return {"epoch": self.epoch, "offset": self.offset}

    def state_dict(self, position: dict | None = None) -> dict:
        """The resumable state, at ``position`` (from `position`) or at the current one."""
        position = position or self.position()
        return {
            "epoch": position["epoch"],
            "offset": position["offset"],
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": len(self),
            "fingerprint": self.data.fingerprint(),
        }

    def close(self) -> None:
        """Stop the data's background preparation, if any (a streamed start)."""
        self.data.close()

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_samples", "fingerprint"):
            if key not in state:
                raise ValueError(f"cannot resume the data source: the saved state has no {key!r} (not a data source state?)")
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume the data source: saved {key}={state[key]!r} but this run has {mine[key]!r} "
                    "(the data file or the data flags changed)"
                )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
