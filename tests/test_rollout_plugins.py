"""Plugin contracts: each plugin kind fails clearly (naming the plugin) at load or first call."""

from __future__ import annotations

import argparse

import pytest
from rollout_helpers import FakeReply, FakeSGLang, make_args, rl_parser, write_jsonl

from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput, call_rollout_fn
from slime.rollout.data_source import RolloutDataSourceWithBuffer
from slime.rollout.sglang_rollout import generate, generate_rollout
from slime.utils.misc import load_function as slime_load_function
from slime.utils.plugins import PluginError, load_function
from slime.utils.types import Sample

pytestmark = pytest.mark.timeout(60)


# --- plugins used by the tests (imported by path) ------------------------------------------
async def reward_len(args, sample, **kwargs):
    return float(len(sample.response))


async def reward_none(args, sample, **kwargs):
    return None


async def reward_text(args, sample, **kwargs):
    return "good"


async def group_reward_rank(args, samples, **kwargs):
    order = sorted(range(len(samples)), key=lambda i: samples[i].index)
    return [float(order.index(i)) for i in range(len(samples))]


async def group_reward_short(args, samples, **kwargs):
    return [1.0]


def sync_reward(args, sample):
    return 1.0


async def generate_no_params(args, sample):
    return sample


async def generate_returns_dict(args, sample, sampling_params):
    return {"text": "hi"}


async def generate_with_eval(args, sample, sampling_params, evaluation=False):
    sample = await generate(args, sample, sampling_params)
    sample.metadata["evaluation"] = evaluation
    return sample


async def generate_drops_sample(args, sample, sampling_params):
    return []


def filter_returns_int(args, samples, **kwargs):
    return 3


async def async_filter(args, samples, **kwargs):
    return True


def legacy_rollout(args, rollout_id, data_source, evaluation=False):
    if evaluation:
        return {"set": {"rewards": [1.0], "truncated": [False], "samples": [Sample()]}}
    return [[Sample(index=0)], [Sample(index=1)]]


def bad_rollout(args, rollout_id, data_source, evaluation=False):
    return [[Sample()], ["not a sample"]]


# --- load_function -----------------------------------------------------------------------------
def test_load_function_accepts_dot_and_colon_forms():
    dotted = load_function("slime.rollout.sglang_rollout.generate_rollout")
    assert dotted is generate_rollout
    assert load_function("slime.rollout.sglang_rollout:generate_rollout") is generate_rollout
    assert load_function("slime.utils.types:Sample.from_dict") == Sample.from_dict
    assert slime_load_function("slime.rollout.sglang_rollout:generate_rollout") is generate_rollout  # slime's path
    with pytest.raises(PluginError, match="must look like 'package.module:function'"):
        load_function("pkg:", "--x")
    with pytest.raises(PluginError, match="must be an async function"):
        load_function("test_rollout_plugins.sync_reward", "--custom-rm-path", require_async=True)


def test_old_flag_spellings_are_aliases():
    args = rl_parser().parse_args(
        ["--rollout-generate-func-path", "a.b:c", "--reward-fn-path", "x.y.z", "--rollout-batch-size", "1"]
    )
    assert args.custom_generate_function_path == "a.b:c" and args.custom_rm_path == "x.y.z"


def test_rl_group_fits_the_main_parser():
    """The RL group joins the trainer's full parser without a clash (or is already wired in whole)."""
    from slime.rollout.config import add_rollout_rl_arguments
    from slime.utils.arguments import get_parser

    ours = add_rollout_rl_arguments(argparse.ArgumentParser())._option_string_actions.keys() - {"-h", "--help"}
    main = get_parser()._option_string_actions.keys()
    if ours & main:
        assert ours <= main, f"the main parser has only part of the RL group: missing {sorted(ours - main)}"
        return
    try:
        get_parser(add_custom_arguments=add_rollout_rl_arguments)
    except argparse.ArgumentError as e:
        pytest.fail(f"RL rollout flag clashes with the main parser: {e}")


# --- contracts checked at load ------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--custom-generate-function-path", "test_rollout_plugins.generate_no_params"],
            r"expected a function taking \(args, sample, sampling_params\)",
        ),
        (["--custom-generate-function-path", "test_rollout_plugins.nope"], "has no attribute 'nope'"),
        (
            ["--custom-rm-path", "test_rollout_plugins.sync_reward"],
            "--custom-rm-path 'test_rollout_plugins.sync_reward': sync_reward must be an async function",
        ),
        (
            ["--dynamic-sampling-filter-path", "test_rollout_plugins.async_filter"],
            "must be a plain function, not async",
        ),
        (["--dynamic-sampling-filter-path", "no_such_module.f"], "cannot import module 'no_such_module'"),
    ],
)
def test_bad_plugins_fail_at_load(tmp_path, extra, message):
    from slime.rollout.config import RolloutConfig
    from slime.rollout.rm_hub.config import RewardConfig

    args = make_args(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p"}]), "http://127.0.0.1:1", *extra)
    with pytest.raises(PluginError, match=message):
        RolloutConfig.from_args(args)
        RewardConfig.from_args(args)


# --- contracts checked at call -------------------------------------------------------------------
def run_rollout(tmp_path, responder, *extra, evaluation=False):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"prompt {i}", "label": "4"} for i in range(3)])
    with FakeSGLang(responder) as srv:
        args = make_args(data, srv.url, "--n-samples-per-prompt", "2", *extra)
        if evaluation:
            args.eval_prompt_data = ["set", data]
        return generate_rollout(args, 0, RolloutDataSourceWithBuffer(args), evaluation=evaluation)


def answer(ids, payload):
    return FakeReply("\\boxed{4} done")


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--custom-rm-path", "test_rollout_plugins.reward_none"],
            r"--custom-rm-path 'test_rollout_plugins.reward_none' on sample \d+: reward is None",
        ),
        (["--custom-rm-path", "test_rollout_plugins.reward_text"], "reward 'good' is a str, expected a number"),
        (
            ["--custom-rm-path", "test_rollout_plugins.group_reward_short", "--group-rm"],
            "returned 1 rewards for a group of 2 samples",
        ),
        (
            ["--custom-generate-function-path", "test_rollout_plugins.generate_returns_dict", "--rm-type", "math"],
            "generate_returns_dict' returned dict; expected a Sample",
        ),
        (
            ["--custom-generate-function-path", "test_rollout_plugins.generate_drops_sample", "--rm-type", "math"],
            "returned list of",
        ),
        (
            ["--dynamic-sampling-filter-path", "test_rollout_plugins.filter_returns_int", "--rm-type", "math"],
            "filter_returns_int returned int",
        ),
        ([], "no reward: set --rm-type"),
    ],
)
def test_bad_plugins_fail_at_first_call(tmp_path, extra, message):
    with pytest.raises(Exception, match=message):
        run_rollout(tmp_path, answer, *extra)


def test_custom_reward_and_group_reward(tmp_path):
    out = run_rollout(tmp_path, answer, "--custom-rm-path", "test_rollout_plugins:reward_len")
    assert all(s.reward == float(len("\\boxed{4} done")) for g in out.samples for s in g)
    out = run_rollout(tmp_path, answer, "--custom-rm-path", "test_rollout_plugins.group_reward_rank", "--group-rm")
    assert [[s.reward for s in g] for g in out.samples] == [[0.0, 1.0], [0.0, 1.0]]


def test_generate_plugin_gets_evaluation_flag(tmp_path):
    path = "test_rollout_plugins.generate_with_eval"
    out = run_rollout(tmp_path, answer, "--custom-generate-function-path", path, "--rm-type", "math")
    assert {s.metadata["evaluation"] for g in out.samples for s in g} == {False}
    out = run_rollout(tmp_path, answer, "--custom-generate-function-path", path, "--rm-type", "math", evaluation=True)
    assert {s.metadata["evaluation"] for s in out.data["set"]["samples"]} == {True}
    assert out.data["set"]["rewards"] == [1] * 3  # --n-samples-per-eval-prompt 1


def test_call_rollout_fn_wraps_legacy_results_and_checks_them():
    train = call_rollout_fn(legacy_rollout, None, 0, None, evaluation=False)
    assert isinstance(train, RolloutFnTrainOutput) and len(train.samples) == 2 and train.metrics == {}
    ev = call_rollout_fn(legacy_rollout, None, 0, None, evaluation=True)
    assert isinstance(ev, RolloutFnEvalOutput) and ev.data["set"]["rewards"] == [1.0]
    with pytest.raises(TypeError, match=r"bad_rollout: samples\[1\] holds a str"):
        call_rollout_fn(bad_rollout, None, 0, None, evaluation=False)


def eval_output_always(args, rollout_id, data_source, evaluation=False):
    return RolloutFnEvalOutput(data={})


def test_call_rollout_fn_rejects_the_wrong_output_kind():
    with pytest.raises(TypeError, match="returned a RolloutFnEvalOutput for a training call"):
        call_rollout_fn(eval_output_always, None, 0, None, evaluation=False)
