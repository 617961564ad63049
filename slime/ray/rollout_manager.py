"""The RolloutManager actor: owns the data source and the rollout function.

``generate(rollout_id)`` calls the rollout function (``--rollout-function-path``), turns the
samples into train data and returns one object ref per DP rank: a list of optimizer steps,
each that rank's token-balanced share of the step's global batch. The data source position
before each rollout is kept, so a checkpoint taken after training rollout k records the
position of rollout k+1 even when train_async.py already prefetched it.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import ray

logger = logging.getLogger(__name__)

__all__ = ["RolloutManager"]

ROLLOUT_PARAMS = ("args", "rollout_id", "data_buffer")


def _train_dict(sample) -> dict:
    return {"tokens": sample.tokens, "loss_mask": sample.loss_mask, "response_length": sample.response_length}


@ray.remote(num_cpus=0)
class RolloutManager:
    def __init__(self, args, dp_size: int):
        from slime.data.config import SFTDataConfig, build_data_source
        from slime.utils.plugins import load_function

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.args, self.dp_size = args, dp_size
        self.generate_fn = load_function(args.rollout_function_path, "--rollout-function-path", ROLLOUT_PARAMS)
        cfg = SFTDataConfig.from_args(args)
        # Preparation logs rows/s, ETA and the summary as log lines: Ray forwards them to the driver.
        self.source = build_data_source(cfg, progress=True)
        pairs = args.eval_prompt_data or []
        self.eval_sources = {
            name: build_data_source(replace(cfg, prompt_data=path, shuffle=False), progress=True)
            for name, path in zip(pairs[::2], pairs[1::2])
        }
        self.states: dict[int, dict] = {}

    def report(self) -> list[str]:
        return self.source.data.report.summary_lines()

    def num_samples(self) -> int:
        return len(self.source)

    def load_state(self, state: dict) -> None:
        self.source.load_state_dict(state)

    def state_before(self, rollout_id: int) -> dict:
        """The data position at the start of ``rollout_id`` (generated or not)."""
        return self.states.get(rollout_id) or self.source.state_dict()

    def _split(self, samples: list, steps: int) -> list:
        from slime.utils.data_split import split_balanced

        per_step = len(samples) // steps
        shares = [[] for _ in range(self.dp_size)]
        for k in range(steps):
            chunk = samples[k * per_step : (k + 1) * per_step]
            for r, idx in enumerate(split_balanced([len(s["tokens"]) for s in chunk], self.dp_size)):
                shares[r].append([chunk[i] for i in idx])
        return [ray.put(share) for share in shares]

    def generate(self, rollout_id: int) -> list:
        self.states[rollout_id] = self.source.state_dict()
        for old in [k for k in self.states if k < rollout_id - 2]:
            del self.states[old]
        samples = self.generate_fn(self.args, rollout_id, self.source)
        data = [_train_dict(s) for s in samples]
        from slime.utils.arguments import global_batch_size

        steps = len(data) // global_batch_size(self.args)
        return self._split(data, steps)

    def eval_names(self) -> list[str]:
        return list(self.eval_sources)

    def eval_data(self, name: str) -> list:
        """Every sample of eval set ``name``, dealt round-robin to the DP ranks (counts may differ)."""
        source = self.eval_sources[name]
        data = [_train_dict(source.data.sample(k)) for k in range(len(source))]
        return [ray.put(data[r :: self.dp_size]) for r in range(self.dp_size)]
