"""Prompt groups for the RL rollout (slime's ``slime.rollout.data_source``).

`RolloutDataSource(args)` serves ``get_samples(n)`` -> ``n`` groups of
``--n-samples-per-prompt`` copies of the next prompts. Epoch ``e`` visits every prompt once,
in ``permutation(--rollout-seed + e)`` order with ``--rollout-shuffle`` or file order
without; a request crossing an epoch end continues into the next epoch. Every sample gets
a unique, increasing ``index`` and its group a ``group_index``.

`RolloutDataSourceWithBuffer` adds the partial-rollout buffer: ``add_samples(groups)``
keeps aborted or unused groups and the next ``get_samples`` serves them first, chosen by
``--buffer-filter-path`` (`pop_first` by default).

State (`state_dict` / `load_state_dict`, and slime's ``save(rollout_id)`` /
``load(rollout_id)`` as JSON under ``--save``/``--load``) holds the position, counters and
the buffer, plus a fingerprint of the prompt set so resuming on changed data is refused.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import logging
import os

import numpy as np

from slime.rollout.filter_hub.buffer_filters import pop_first
from slime.rollout.plugin_contracts import PluginError, load_buffer_filter
from slime.rollout.prompt_dataset import DEFAULT_DATA_SOURCE, PromptDataConfig, PromptDataset
from slime.utils.types import Sample

__all__ = ["DataSource", "RolloutDataSource", "RolloutDataSourceWithBuffer", "build_data_source", "pop_first"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class DataSource(abc.ABC):
    """What a rollout function needs from its data: groups out, unused groups back, state."""

    @abc.abstractmethod
    def get_samples(self, num_samples: int) -> list[list[Sample]]: ...

    @abc.abstractmethod
    def add_samples(self, samples: list[list[Sample]]) -> None: ...

    @abc.abstractmethod
    def save(self, rollout_id: int) -> None: ...

    @abc.abstractmethod
    def load(self, rollout_id: int | None = None) -> None: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...


def _state_path(root: str, rollout_id: int) -> str:
    return os.path.join(root, "rollout", f"data_source_state_{rollout_id}.json")


class RolloutDataSource(DataSource):
    """Read-only prompt groups from ``--prompt-data``."""

    def __init__(self, args, dataset: PromptDataset | None = None):
        self.args = args
        self.n_samples_per_prompt = int(args.n_samples_per_prompt)
        if self.n_samples_per_prompt < 1:
            raise ValueError(f"--n-samples-per-prompt must be >= 1, got {self.n_samples_per_prompt}")
        self.dataset = dataset if dataset is not None else PromptDataset(PromptDataConfig.from_args(args))
        self.shuffle = bool(args.rollout_shuffle)
        self.seed = int(args.rollout_seed)
        self.epoch = 0
        self.offset = 0
        self.sample_index = 0
        self.group_index = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def report(self) -> dict:
        return dict(self.dataset.report)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            self._order = np.random.default_rng(self.seed + self.epoch).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def _next_prompts(self, n: int) -> list[Sample]:
        out: list[Sample] = []
        while len(out) < n:
            order = self._epoch_order()
            take = min(n - len(out), len(order) - self.offset)
            out.extend(self.dataset.samples[int(k)] for k in order[self.offset : self.offset + take])
            self.offset += take
            if self.offset == len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def _groups(self, prompts: list[Sample]) -> list[list[Sample]]:
        groups = []
        for prompt in prompts:
            group = []
            for _ in range(self.n_samples_per_prompt):
                sample = copy.deepcopy(prompt)
                sample.group_index, sample.index = self.group_index, self.sample_index
                self.sample_index += 1
                group.append(sample)
            self.group_index += 1
            groups.append(group)
        return groups

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        if num_samples < 0:
            raise ValueError(f"get_samples: num_samples must be >= 0, got {num_samples}")
        return self._groups(self._next_prompts(num_samples))

    def add_samples(self, samples: list[list[Sample]]) -> None:
        raise RuntimeError(f"{type(self).__name__} is read-only; use RolloutDataSourceWithBuffer for --partial-rollout")

    # -- state ---------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.dataset.samples:
            h.update(np.asarray(s.tokens, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "offset": self.offset,
            "sample_index": self.sample_index,
            "group_index": self.group_index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_prompts": len(self),
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_prompts", "fingerprint"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume the prompt data source: saved {key}={state.get(key)!r}, this run has {mine[key]!r} "
                    "(the prompt file or the data flags changed)"
                )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.sample_index, self.group_index = int(state["sample_index"]), int(state["group_index"])

    def save(self, rollout_id: int) -> None:
        root = getattr(self.args, "save", None)
        if not root:
            return
        path = _state_path(root, rollout_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state_dict(), f)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated state

    def load(self, rollout_id: int | None = None) -> None:
        root = getattr(self.args, "load", None)
        if not root or rollout_id is None:
            return
        path = _state_path(root, rollout_id)
        if not os.path.exists(path):
            logger.info("no data source state at %s; starting from the first prompt", path)
            return
        with open(path) as f:
            self.load_state_dict(json.load(f))


class RolloutDataSourceWithBuffer(RolloutDataSource):
    """Prompt groups plus a buffer of returned groups, served first (partial rollout)."""

    def __init__(self, args, dataset: PromptDataset | None = None):
        super().__init__(args, dataset)
        self.buffer: list[list[Sample]] = []
        path = getattr(args, "buffer_filter_path", None)
        self.buffer_filter = load_buffer_filter(path) if path else pop_first
        self._filter_name = path or "pop_first"

    def get_buffer_length(self) -> int:
        return len(self.buffer)

    def _from_buffer(self, num_samples: int) -> list[list[Sample]]:
        if not self.buffer or num_samples == 0:
            return []
        before = len(self.buffer)
        groups = self.buffer_filter(self.args, None, self.buffer, num_samples)
        if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
            raise PluginError(
                f"--buffer-filter-path {self._filter_name!r} returned {type(groups).__name__}; expected a list of groups"
            )
        if len(groups) > num_samples:
            raise PluginError(
                f"--buffer-filter-path {self._filter_name!r} returned {len(groups)} groups, asked for at most {num_samples}"
            )
        if before - len(self.buffer) != len(groups):
            raise PluginError(
                f"--buffer-filter-path {self._filter_name!r} returned {len(groups)} groups but removed "
                f"{before - len(self.buffer)} from the buffer (it must remove exactly what it returns)"
            )
        return groups

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        groups = self._from_buffer(num_samples)
        return groups + super().get_samples(num_samples - len(groups))

    def add_samples(self, samples: list[list[Sample]]) -> None:
        if not isinstance(samples, list):
            raise TypeError(f"add_samples takes a list of groups, got {type(samples).__name__}")
        for i, group in enumerate(samples):
            if not isinstance(group, list) or len(group) != self.n_samples_per_prompt:
                size = len(group) if isinstance(group, list) else type(group).__name__
                raise ValueError(
                    f"add_samples: group {i} has {size} samples, expected --n-samples-per-prompt {self.n_samples_per_prompt}"
                )
            self.buffer.append(group)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["buffer"] = [[s.to_dict() for s in group] for group in self.buffer]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer = [[Sample.from_dict(d) for d in group] for group in state.get("buffer", [])]


_DATA_SOURCE_METHODS = ("get_samples", "add_samples", "save", "load", "__len__")


def build_data_source(args) -> DataSource:
    """The ``--data-source-path`` class built with ``args``, checked for the methods the rollout calls."""
    from slime.utils.plugins import load_function

    path = getattr(args, "data_source_path", None) or DEFAULT_DATA_SOURCE
    cls = load_function(path, "--data-source-path", ("args",))
    source = cls(args)
    missing = [m for m in _DATA_SOURCE_METHODS if not callable(getattr(source, m, None))]
    if missing:
        raise PluginError(
            f"--data-source-path {path!r}: {type(source).__name__} lacks {', '.join(missing)} (see slime.rollout.data_source.DataSource)"
        )
    return source
