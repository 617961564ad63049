"""--colocate / --offload*: slime's flag semantics, start-up refusals, and the driver's order of
offloads (the trainer's full state and the engines' weights are never on the devices together).
The real offload / release round trips are in test_trainer_offload.py and test_cpu_engine.py;
a colocated GRPO run through Ray is in test_rl_e2e.py."""

from __future__ import annotations

import pytest

from conftest import TINY, write_jsonl


def _args(*flags):
    from slime.utils.arguments import get_parser

    return get_parser().parse_args(["--hf-checkpoint", str(TINY), "--prompt-data", "x.jsonl", *flags])


@pytest.mark.parametrize(
    "flags,train,rollout",
    [
        ([], False, False),
        (["--colocate"], True, True),
        (["--colocate", "--no-offload-train"], False, True),
        (["--colocate", "--no-offload-rollout"], True, False),
        (["--offload"], True, True),
        (["--offload-train"], True, False),
        (["--offload", "--no-offload-rollout"], True, False),
        (["--colocate", "--debug-rollout-only"], False, False),  # no trainer to share with (as slime)
    ],
)
def test_offload_flags_resolve_as_in_slime(flags, train, rollout):
    from slime.ray.colocate import OffloadArgs

    assert OffloadArgs.from_args(_args(*flags)) == OffloadArgs(train=train, rollout=rollout)


def _rl_args(tmp_path, *flags):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "label": "2"}])
    from slime.utils.arguments import get_parser

    return get_parser().parse_args(
        ["--hf-checkpoint", str(TINY), "--prompt-data", str(data), "--rollout-batch-size", "1", "--num-rollout", "1",
         "--rm-type", "deepscaler", "--rollout-engine", "cpu", "--rollout-max-response-len", "4", *flags]
    )  # fmt: skip


def test_train_async_refuses_colocate_and_sft_refuses_offload(tmp_path):
    from slime.utils.arguments import validate_trainer_args

    validate_trainer_args(_rl_args(tmp_path, "--colocate"))  # train.py: fine
    for flags in (["--colocate"], ["--offload-train"], ["--offload"]):
        with pytest.raises(ValueError, match="train_async.py .* not with --colocate or --offload"):
            validate_trainer_args(_rl_args(tmp_path, *flags), overlap=True)
    validate_trainer_args(_rl_args(tmp_path, "--colocate", "--no-offload-train", "--no-offload-rollout"), overlap=False)
    sft = ["--rollout-function-path", "slime.rollout.sft_rollout.generate_rollout", "--loss-type", "sft_loss"]
    with pytest.raises(ValueError, match="--offload-train: SFT starts no inference engine"):
        validate_trainer_args(_rl_args(tmp_path, *sft, "--offload-train"))


class _Group:
    def __init__(self, log):
        self.log = log

    def offload(self, keep_weights=False):
        self.log.append("trainer offload" + (" rest" if keep_weights else ""))

    def onload(self):
        self.log.append("trainer onload")


def _residency(plan, log):
    from slime.ray.colocate import Residency

    r = Residency(plan, engines=["engine-handle"])
    r._call_engines = lambda method, tags: log.append(f"{method.split('_')[0]} {' '.join(tags)}")
    return r


def _check_never_both(r):
    # The trainer's optimizer state / grads and the engines' weights never share the devices.
    assert not (r.trainer == "resident" and "weights" in r.engine_memory), r.history


def test_driver_order_frees_before_it_takes(tmp_path):
    from slime.ray.colocate import OffloadArgs

    log: list[str] = []
    r = _residency(OffloadArgs(train=True, rollout=True), log)
    r.before_trainer_starts()
    r.group = _Group(log)
    steps = [r.for_weight_sync]  # the start-up sync
    for _ in range(2):  # train.py: generate, train, save, sync, evaluate (generates)
        steps += [r.for_generation, r.for_training, r.for_training, r.for_weight_sync, r.for_generation]
    for step in steps + [r.for_training]:  # the HF export at the end
        step()
        _check_never_both(r)
    assert log[:8] == [
        "release kv_cache weights",  # the engines make room for the trainer to build
        "trainer offload rest",  # start-up sync: grads and optimizer state leave first ...
        "resume weights",  # ... then the engines take their weights back and get synced
        "trainer offload",  # generate: the trainer's weights leave too
        "resume kv_cache",
        "release kv_cache weights",  # train
        "trainer onload",
        "trainer offload rest",  # sync after training
    ]
    assert log.count("trainer onload") == 3 and r.seconds >= 0 and len(r.history) == len(log)
    r.for_training()
    with pytest.raises(RuntimeError, match="weight sync must come before generating"):
        r.for_generation()


def test_no_offload_and_no_engines_move_nothing():
    from slime.ray.colocate import OffloadArgs, Residency

    log: list[str] = []
    r = _residency(OffloadArgs(), log)
    r.group = _Group(log)
    for step in (r.before_trainer_starts, r.for_weight_sync, r.for_generation, r.for_training):
        step()
    bare = Residency(OffloadArgs(train=True, rollout=True))  # --debug-train-only: no engines
    bare.group = _Group(log)
    for step in (bare.before_trainer_starts, bare.for_generation, bare.for_training, bare.for_weight_sync):
        step()
    assert log == [] and r.history == [] and bare.history == []
