"""generate_rollout contract, loaded through --rollout-function-path, and the plugin loader."""

from __future__ import annotations

import pytest

from conftest import TINY, TINY_DATA
from slime.data.config import SFTDataConfig, build_data_source
from slime.utils.arguments import SFT_ROLLOUT_FUNCTION, parse_args
from slime.utils.plugins import PluginError, load_function
from slime.utils.types import Sample

ROLLOUT_PARAMS = ("args", "rollout_id", "data_buffer")


@pytest.fixture(scope="module")
def args():
    return parse_args(
        ["--hf-checkpoint", str(TINY), "--prompt-data", str(TINY_DATA), "--rollout-batch-size", "8", "--rollout-shuffle",
         "--rollout-function-path", SFT_ROLLOUT_FUNCTION]
    )


def test_generate_rollout_contract(args):
    fn = load_function(args.rollout_function_path, "--rollout-function-path", ROLLOUT_PARAMS)
    source = build_data_source(SFTDataConfig.from_args(args), progress=False)
    samples = fn(args, 0, source)
    assert len(samples) == 8 and all(isinstance(s, Sample) for s in samples)
    tok = source.encoder.template.tokenizer
    for s in samples:
        assert len(s.loss_mask) == s.response_length <= len(s.tokens)
        assert s.loss_mask[0] == 1 and s.reward == 0.0
        assert s.status == Sample.Status.COMPLETED
        mask = s.full_loss_mask()
        assert len(mask) == len(s.tokens) and sum(mask) == s.effective_response_length
        assert s.tokens == tok.apply_chat_template(s.prompt, tools=s.metadata.get("tools"), tokenize=True)
    nxt = fn(args, 1, source)
    assert {s.index for s in nxt}.isdisjoint({s.index for s in samples})
    with pytest.raises(ValueError, match="evaluation"):
        fn(args, 0, source, evaluation=True)


def test_sample_dict_round_trip():
    s = Sample(index=3, tokens=[1, 2, 3], response_length=2, loss_mask=[1, 0], status=Sample.Status.TRUNCATED)
    back = Sample.from_dict(s.to_dict())
    assert back == s and back.full_loss_mask() == [0, 1, 0]


def _not_callable():
    pass


NOT_CALLABLE = 3


def two_args(a, b):
    return a, b


@pytest.mark.parametrize(
    "path, message",
    [
        ("nodots", "must be a dotted path"),
        ("no_such_module_xyz.fn", "cannot import module 'no_such_module_xyz'"),
        ("slime.rollout.sft_rollout.nope", "has no attribute 'nope'"),
        ("test_sft_rollout.NOT_CALLABLE", "is not callable"),
        ("test_sft_rollout.two_args", "expected a function taking"),
    ],
)
def test_bad_function_paths(path, message):
    with pytest.raises(PluginError, match=message):
        load_function(path, "--rollout-function-path", ROLLOUT_PARAMS)


def test_default_path_resolves():
    from slime.rollout.sft_rollout import generate_rollout

    assert load_function(SFT_ROLLOUT_FUNCTION, required_params=ROLLOUT_PARAMS) is generate_rollout


def test_parse_args_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--hf-checkpoint", str(TINY)])
    assert "--prompt-data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--hf-checkpoint", "x", "--prompt-data", "y", "--apply-chat-template-kwargs", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err
    a = parse_args(["--hf-checkpoint", "x", "--prompt-data", "y", "--max-length", "128"])
    assert a.rollout_max_context_len == 128
