"""The default rollout against the real CPU engine (tiny model): same code path SGLang gets."""

from __future__ import annotations

import pytest
from conftest import TINY
from rollout_helpers import make_args, write_jsonl

from slime.rollout.data_source import RolloutDataSourceWithBuffer
from slime.rollout.sglang_rollout import generate_rollout
from slime.utils.types import Sample

pytest.importorskip("slime.engines.http_server")
pytestmark = pytest.mark.timeout(120)

MAX_LEN = 8


@pytest.fixture(scope="module")
def engine_url():
    from slime.engines.config import EngineConfig
    from slime.engines.http_server import launch_server, shutdown_server

    url = launch_server(EngineConfig(model_path=str(TINY), seed=0, num_threads=1))
    yield url
    shutdown_server(url)


@pytest.fixture()
def data(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}], "label": w} for w in ("hello", "world", "again")]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def rollout(data, url, *extra, rollout_id=0, source=None):
    args = make_args(
        data,
        url,
        "--apply-chat-template",
        "--n-samples-per-prompt",
        "2",
        "--rm-type",
        "f1",
        "--rollout-max-response-len",
        str(MAX_LEN),
        "--rollout-deterministic-seeds",
        *extra,
    )
    source = source or RolloutDataSourceWithBuffer(args)
    return generate_rollout(args, rollout_id, source), source


def test_groups_tokens_and_determinism(engine_url, data, tiny_tokenizer):
    out, source = rollout(data, engine_url)
    again, _ = rollout(data, engine_url)
    assert [len(g) for g in out.samples] == [2, 2]
    for group, prompt in zip(out.samples, source.dataset.samples):
        for s in group:
            n = len(prompt.tokens)
            assert s.tokens[:n] == prompt.tokens and len(s.tokens) == n + s.response_length
            assert 0 < s.response_length <= MAX_LEN and s.loss_mask == [1] * s.response_length
            assert len(s.rollout_log_probs) == s.response_length and all(lp <= 0 for lp in s.rollout_log_probs)
            assert s.status == (Sample.Status.TRUNCATED if s.response_length == MAX_LEN else Sample.Status.COMPLETED)
            assert s.response == tiny_tokenizer.decode(s.tokens[n:], skip_special_tokens=False)
            assert isinstance(s.reward, float)
    # Same seed, same tokens and log-probs; the two samples of a group differ (different seeds).
    flat = [s for g in out.samples for s in g]
    flat2 = [s for g in again.samples for s in g]
    assert [s.tokens for s in flat] == [s.tokens for s in flat2]
    assert [s.rollout_log_probs for s in flat] == [pytest.approx(s.rollout_log_probs) for s in flat2]
    assert any(g[0].tokens != g[1].tokens for g in out.samples)
    assert out.metrics["rollout/gen_tokens"] == sum(s.response_length for s in flat)


def test_eval_against_the_engine(engine_url, data):
    args = make_args(
        data,
        engine_url,
        "--apply-chat-template --rm-type f1 --rollout-max-response-len",
        str(MAX_LEN),
        "--eval-prompt-data tiny",
        data,
        "--n-samples-per-eval-prompt 2 --eval-max-response-len 3 --eval-temperature 0",
    )
    out = generate_rollout(args, 0, None, evaluation=True)
    samples = out.data["tiny"]["samples"]
    assert len(samples) == 6 and all(s.response_length <= 3 for s in samples)
    # Greedy: both samples of a prompt agree.
    assert all(samples[i].tokens == samples[i + 1].tokens for i in range(0, 6, 2))
    assert out.metrics["eval/tiny/truncated_ratio"] == sum(out.data["tiny"]["truncated"]) / 6


def test_abort_and_partial_rollout_with_the_engine(engine_url, data):
    # A buffered group that only needs 2 more tokens fills the batch of 1 first; the fresh group
    # (64 tokens to go) is aborted mid-generation by the engine, buffered, and continued next rollout.
    budget = 64
    extra = (
        "--rollout-batch-size",
        "1",
        "--over-sampling-batch-size",
        "2",
        "--partial-rollout",
        "--rollout-max-response-len",
        str(budget),
    )
    args = make_args(
        data, engine_url, "--apply-chat-template", "--n-samples-per-prompt", "2", "--rm-type", "f1", *extra
    )
    source = RolloutDataSourceWithBuffer(args)
    seeded = source.get_samples(1)[0]
    for s in seeded:
        s.append_response_tokens(tokens=[5] * (budget - 2), log_probs=[-1.0] * (budget - 2), text="")
        s.status = Sample.Status.ABORTED
    source.add_samples([seeded])
    first = generate_rollout(args, 0, source)
    assert first.samples[0][0].group_index == seeded[0].group_index
    assert all(s.response_length == budget for s in first.samples[0])
    assert source.get_buffer_length() == 1
    partial = source.buffer[0]
    assert all(s.response_length < budget for s in partial)
    assert any(s.status == Sample.Status.ABORTED for s in partial)
    second = generate_rollout(args, 1, source)
    done = second.samples[0]
    assert done[0].group_index == partial[0].group_index and all(s.metadata["start_rollout_id"] == 0 for s in done)
    for s in done:
        assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED) and s.response_length <= budget
        assert len(s.loss_mask) == len(s.rollout_log_probs) == s.response_length
