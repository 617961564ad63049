"""The calculator tool loop example (--custom-generate-function-path): masks, log-probs, budget."""

from __future__ import annotations

import functools

import pytest
from rollout_helpers import RESPONSE_ID_BASE, FakeReply, FakeSGLang, make_args, write_jsonl

from slime.rollout.data_source import RolloutDataSourceWithBuffer
from slime.rollout.examples.calculator_tool import evaluate_expression
from slime.rollout.sglang_rollout import generate_rollout
from slime.utils.types import Sample

pytestmark = pytest.mark.timeout(60)

PLUGIN = "slime.rollout.examples.calculator_tool.generate"
TURN1 = "I will use the tool. <calc>12*(3+4)</calc>"
TURN2 = " So the answer is \\boxed{84}."


@functools.lru_cache(maxsize=1)
def tokenizer():
    from conftest import load_tokenizer

    return load_tokenizer()


@pytest.mark.parametrize(
    "expr, value",
    [
        ("12*(3+4)", "84"),
        ("2^10", "1024"),
        ("7/2", "3.5"),
        ("-3 + 1", "-2"),
        ("1/0", "error: division by zero"),
        ("__import__('os')", "error: unsupported expression element Call"),
        ("9**99999", "error: exponent too large"),
    ],
)
def test_calculator(expr, value):
    assert evaluate_expression(expr) == value


def run_calculator(tmp_path, model, budget: int) -> Sample:
    """One rollout of one prompt through the calculator plugin; its single sample."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 12*(3+4)?", "label": "84"}])
    with FakeSGLang(model) as srv:
        flags = f"--rollout-batch-size 1 --rm-type math --rollout-max-response-len {budget}"
        args = make_args(data, srv.url, flags, "--custom-generate-function-path", PLUGIN)
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
    return out.samples[0][0]


def test_tool_loop_masks_tool_tokens(tmp_path):
    seen_prompts = []

    def model(prompt_ids, payload):
        # The "model" answers turn 1 with a tool call, then (seeing the result) finishes.
        seen_prompts.append(tokenizer().decode(prompt_ids))
        assert "</calc>" in payload["sampling_params"]["stop"] and payload["sampling_params"]["no_stop_trim"] is True
        return FakeReply(TURN1 if "<result>" not in seen_prompts[-1] else TURN1 + TURN2)

    s = run_calculator(tmp_path, model, budget=256)
    n_requests = len(seen_prompts)
    tool_text = "<result>84</result>"
    tool_ids = tokenizer().encode(tool_text, add_special_tokens=False)
    assert n_requests == 2 and "<result>84</result>" in seen_prompts[1]
    assert s.response == TURN1 + tool_text + TURN2 and s.status == Sample.Status.COMPLETED
    assert s.reward == 1 and s.metadata["tool_calls"] == 1
    expected_mask = [1] * len(TURN1) + [0] * len(tool_ids) + [1] * len(TURN2)
    assert s.loss_mask == expected_mask and s.response_length == len(expected_mask)
    response_ids = s.tokens[-s.response_length :]
    assert response_ids[len(TURN1) : len(TURN1) + len(tool_ids)] == tool_ids
    assert all(t >= RESPONSE_ID_BASE for t, m in zip(response_ids, s.loss_mask) if m)  # model tokens are the engine's
    # log-probs: the engine's for model tokens (each turn restarts at -0.01), 0.0 placeholders for tool tokens
    lp = s.rollout_log_probs
    assert lp[: len(TURN1)] == pytest.approx([-0.01 * (i + 1) for i in range(len(TURN1))])
    assert lp[len(TURN1) : len(TURN1) + len(tool_ids)] == [0.0] * len(tool_ids)
    assert lp[-len(TURN2) :] == pytest.approx([-0.01 * (i + 1) for i in range(len(TURN2))])


def test_tool_loop_respects_the_token_budget(tmp_path):
    budget = len(TURN1) + 3  # room for only part of the tool result

    def model(prompt_ids, payload):
        return FakeReply(TURN1 if "<result>" not in tokenizer().decode(prompt_ids) else TURN1 + TURN2)

    s = run_calculator(tmp_path, model, budget)
    assert s.status == Sample.Status.TRUNCATED and s.response_length == budget
    assert s.loss_mask == [1] * len(TURN1) + [0] * 3 and len(s.rollout_log_probs) == budget
