"""The default RL rollout against a scripted SGLang-contract server (tests/rollout_helpers.py)."""

from __future__ import annotations

import functools

import pytest
from rollout_helpers import RESPONSE_ID_BASE, FakeReply, FakeSGLang, make_args, write_jsonl

from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput, call_rollout_fn
from slime.rollout.data_source import RolloutDataSourceWithBuffer
from slime.rollout.sglang_rollout import generate_rollout
from slime.utils.types import Sample

pytestmark = pytest.mark.timeout(60)


def prompts(tmp_path, names, name="prompts.jsonl"):
    return write_jsonl(tmp_path / name, [{"prompt": f"Question {n}: what is 2+2?", "label": "4"} for n in names])


@functools.lru_cache(maxsize=1)
def tokenizer():
    from conftest import load_tokenizer

    return load_tokenizer()


def prompt_tag(prompt_ids) -> str:
    """Which prompt a request is for ('Question <tag>: ...')."""
    text = tokenizer().decode(prompt_ids)
    return text.split("Question ", 1)[1].split(":", 1)[0]


def test_groups_tokens_logprobs_rewards_and_metrics(tmp_path):
    def responder(ids, payload):
        return FakeReply("The sum is \\boxed{4}." if prompt_tag(ids) == "a" else "It is \\boxed{5}.")

    with FakeSGLang(responder) as srv:
        args = make_args(prompts(tmp_path, ["a", "b", "c"]), srv.url, "--rm-type math --n-samples-per-prompt 3")
        source = RolloutDataSourceWithBuffer(args)
        out = call_rollout_fn(generate_rollout, args, 0, source, evaluation=False)
    assert isinstance(out, RolloutFnTrainOutput)
    assert [len(g) for g in out.samples] == [3, 3]
    flat = [s for g in out.samples for s in g]
    assert [s.index for s in flat] == list(range(6)) and [s.group_index for s in flat] == [0, 0, 0, 1, 1, 1]
    prompt_len = len(source.dataset.samples[0].tokens)
    for s in flat:
        assert s.status == Sample.Status.COMPLETED
        assert len(s.tokens) == prompt_len + s.response_length
        assert s.tokens[prompt_len:] == [RESPONSE_ID_BASE + ord(c) for c in s.response]
        assert s.loss_mask == [1] * s.response_length
        assert s.rollout_log_probs == pytest.approx([-0.01 * (i + 1) for i in range(s.response_length)])
        assert s.metadata["start_rollout_id"] == 0 and s.weight_versions == ["default"]
    assert [s.reward for s in flat] == [1, 1, 1, 0, 0, 0]
    m = out.metrics
    assert m["rollout/num_samples"] == 6 and m["rollout/reward_mean"] == pytest.approx(0.5)
    assert m["rollout/reward_std"] == pytest.approx(0.5) and m["rollout/truncated_ratio"] == 0.0
    assert m["rollout/response_len_tokens_max"] == len("The sum is \\boxed{4}.")
    assert m["rollout/gen_tokens"] == sum(s.response_length for s in flat) and m["rollout/gen_tokens_per_s"] > 0
    assert m["rollout/time_s"] > 0 and m["rollout/kept_groups"] == 2 and m["rollout/dropped_groups"] == 0
    # The next rollout continues with the next prompt (c), then wraps around to a.
    with FakeSGLang(responder) as srv:
        args2 = make_args(prompts(tmp_path, ["a", "b", "c"]), srv.url, "--rm-type math --n-samples-per-prompt 3")
        out2 = generate_rollout(args2, 1, source)
    assert [g[0].group_index for g in out2.samples] == [2, 3] and out2.samples[1][0].reward == 1


def test_sampling_params_truncation_and_seeds(tmp_path):
    with FakeSGLang(lambda ids, p: FakeReply("x" * 50)) as srv:
        args = make_args(
            prompts(tmp_path, ["a", "b"]),
            srv.url,
            "--rm-type f1 --n-samples-per-prompt 2 --rollout-max-response-len 5",
            "--rollout-temperature 0.7 --rollout-top-p 0.9 --rollout-top-k 20 --rollout-stop </answer>",
            "--rollout-stop-token-ids 151645 --rollout-deterministic-seeds --rollout-seed 100",
        )
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
        requests = list(srv.requests)
    for s in (s for g in out.samples for s in g):
        assert s.status == Sample.Status.TRUNCATED and s.response_length == 5 and s.response == "xxxxx"
    assert out.metrics["rollout/truncated_ratio"] == 1.0
    params = sorted((r["sampling_params"] for r in requests), key=lambda p: p["sampling_seed"])
    assert [p["sampling_seed"] for p in params] == [100, 101, 102, 103]
    assert params[0] | {"sampling_seed": 0} == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "max_new_tokens": 5,
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "stop": ["</answer>"],
        "stop_token_ids": [151645],
        "sampling_seed": 0,
    }
    assert all(r["return_logprob"] is True for r in requests)


def test_dynamic_sampling_refills_then_aborts_what_is_still_running(tmp_path):
    # Prompts 0 and 1 are always wrong (zero reward std: dropped); 2 and 3 are mixed; 4 is slow;
    # 5 never finishes on its own. Batch 2, over-sampling 3: round 1 = 0,1,2 -> two drops ->
    # refill round 2 = 3,4,5 -> 3 fills the batch -> 4 and 5 are aborted/awaited.
    def responder(ids, payload):
        tag = prompt_tag(ids)
        if tag in ("p0", "p1"):
            return FakeReply("\\boxed{5}")
        answer = "\\boxed{4}" if payload["sampling_params"]["sampling_seed"] % 2 else "\\boxed{3}"
        return FakeReply(answer, delay_s=0.5 if tag == "p4" else 0.0, hang=tag == "p5")

    with FakeSGLang(responder) as srv:
        args = make_args(
            prompts(tmp_path, [f"p{i}" for i in range(6)]),
            srv.url,
            "--rm-type math --n-samples-per-prompt 2 --over-sampling-batch-size 3",
            "--rollout-deterministic-seeds --dynamic-sampling-filter-path slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std",
        )
        source = RolloutDataSourceWithBuffer(args)
        out = generate_rollout(args, 0, source)
        aborts = srv.aborts
    assert [g[0].group_index for g in out.samples] == [2, 3]
    assert all(sorted(s.reward for s in g) == [0, 1] for g in out.samples)
    m = out.metrics
    assert m["rollout/sampling_rounds"] == 2 and m["rollout/dropped_groups"] == 2
    assert m["rollout/dynamic_filter/drop_zero_std_0"] == 2
    assert m["rollout/discarded_groups"] == 2 and m["rollout/kept_groups"] == 2
    assert aborts >= 1
    assert source.get_buffer_length() == 0  # without --partial-rollout nothing is kept


def test_partial_rollout_continues_aborted_samples_next_rollout(tmp_path):
    hang = {"on": True}

    def responder(ids, payload):
        tag = prompt_tag(ids)
        return FakeReply(f"Answer for {tag}: \\boxed{{4}}", hang=hang["on"] and tag == "slow", partial=3)

    data = prompts(tmp_path, ["fast1", "slow", "fast2", "fast3"])
    with FakeSGLang(responder) as srv:
        args = make_args(
            data,
            srv.url,
            "--rm-type math --n-samples-per-prompt 2 --rollout-batch-size 2",
            "--over-sampling-batch-size 3 --partial-rollout",
        )
        source = RolloutDataSourceWithBuffer(args)
        first = generate_rollout(args, 0, source)
        assert [g[0].group_index for g in first.samples] == [0, 2]
        assert first.metrics["rollout/partial_groups_buffered"] == 1 and source.get_buffer_length() == 1
        buffered = source.buffer[0]
        assert all(
            s.status == Sample.Status.ABORTED and s.response == "Ans" and s.response_length == 3 for s in buffered
        )
        assert all(s.metadata["start_rollout_id"] == 0 for s in buffered)

        hang["on"] = False
        srv.reset_abort()
        n_before = len(srv.requests)
        second = generate_rollout(args, 1, source)
        continued = [r for r in srv.requests[n_before:] if any(t >= RESPONSE_ID_BASE for t in r["input_ids"])]
    assert len(continued) == 2  # both samples of the slow group continued from their 3 tokens
    assert all(r["sampling_params"]["max_new_tokens"] == 64 - 3 for r in continued)
    groups = {g[0].group_index: g for g in second.samples}
    assert sorted(groups) == [1, 3]  # the buffered group first, then the next fresh prompt
    for s in groups[1]:
        assert s.status == Sample.Status.COMPLETED and s.response == "Answer for slow: \\boxed{4}" and s.reward == 1
        assert s.loss_mask == [1] * s.response_length and len(s.rollout_log_probs) == s.response_length
        assert s.metadata["start_rollout_id"] == 0
    assert all(s.metadata["start_rollout_id"] == 1 for s in groups[3])


def test_mask_offpolicy_in_partial_rollout(tmp_path):
    with FakeSGLang(lambda ids, p: FakeReply("\\boxed{4}")) as srv:
        args = make_args(
            prompts(tmp_path, ["a"]),
            srv.url,
            "--rm-type math --rollout-batch-size 1 --partial-rollout",
            "--mask-offpolicy-in-partial-rollout",
        )
        source = RolloutDataSourceWithBuffer(args)
        group = source.get_samples(1)[0]
        s = group[0]
        s.append_response_tokens(tokens=[RESPONSE_ID_BASE + ord(c) for c in "\\bo"], log_probs=[-1.0] * 3, text="\\bo")
        s.status = Sample.Status.ABORTED
        source.add_samples([group])
        out = generate_rollout(args, 5, source)
    s = out.samples[0][0]
    assert s.response == "\\boxed{4}" and s.loss_mask == [0, 0, 0] + [1] * 6 and s.reward == 1


def test_eval_per_dataset(tmp_path):
    def responder(ids, payload):
        return FakeReply("\\boxed{4}" if prompt_tag(ids) == "a" else "a long wrong answer")

    with FakeSGLang(responder) as srv:
        args = make_args(
            prompts(tmp_path, ["a", "b"]),
            srv.url,
            "--rm-type math --eval-prompt-data easy",
            prompts(tmp_path, ["a"], "easy.jsonl"),
            "mixed",
            prompts(tmp_path, ["a", "b"], "mixed.jsonl"),
            "--n-samples-per-eval-prompt 3 --eval-max-response-len 10 --eval-temperature 0.3",
        )
        out = call_rollout_fn(generate_rollout, args, 7, None, evaluation=True)
        requests = list(srv.requests)
    assert isinstance(out, RolloutFnEvalOutput) and sorted(out.data) == ["easy", "mixed"]
    assert out.data["easy"]["rewards"] == [1, 1, 1] and out.data["easy"]["truncated"] == [False] * 3
    assert out.data["mixed"]["rewards"] == [1, 1, 1, 0, 0, 0]
    assert out.data["mixed"]["truncated"] == [False] * 3 + [True] * 3
    m = out.metrics
    assert m["eval/easy/reward_mean"] == 1.0 and m["eval/mixed/reward_mean"] == 0.5
    assert m["eval/mixed/truncated_ratio"] == 0.5 and m["eval/easy/truncated_ratio"] == 0.0
    assert {r["sampling_params"]["temperature"] for r in requests} == {0.3}
    assert {r["sampling_params"]["max_new_tokens"] for r in requests} == {10}


def test_engine_errors_are_clear(tmp_path):
    data = prompts(tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match="no inference engine URL"):
        args = make_args(data, None, "--rm-type math")
        generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
    # A continuation that does not match what the server generated -> HTTP 400, raised with the URL.
    with FakeSGLang(lambda ids, p: FakeReply("abc")) as srv:
        args = make_args(data, srv.url, "--rm-type math --rollout-batch-size 1")
        source = RolloutDataSourceWithBuffer(args)
        group = source.get_samples(1)[0]
        for s in group:
            s.append_response_tokens(tokens=[RESPONSE_ID_BASE + ord("z")], log_probs=[-1.0], text="z")
            s.status = Sample.Status.ABORTED
        source.add_samples([group])
        with pytest.raises(Exception, match=r"/generate -> HTTP 400"):
            generate_rollout(args, 0, source)


def test_fallback_filter_keeps_rejected_groups_instead_of_another_round(tmp_path, caplog):
    with FakeSGLang(lambda ids, p: FakeReply("\\boxed{5}")) as srv:  # every group all-wrong: zero std
        args = make_args(
            prompts(tmp_path, ["a", "b", "c", "d"]),
            srv.url,
            "--rm-type math --n-samples-per-prompt 2 --dynamic-sampling-filter-path slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std_with_fallback",
        )
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
    assert out.metrics["rollout/sampling_rounds"] == 1 and out.metrics["rollout/dropped_groups"] == 0
    assert [g[0].group_index for g in out.samples] == [0, 1]


def test_a_filter_that_drops_everything_is_reported(tmp_path, caplog):
    # Batch 1 of 3 prompts: 4 drops trigger the warning, then a mixed group finally fills the batch.
    calls = {"n": 0}

    def responder(ids, payload):
        calls["n"] += 1
        return FakeReply(
            "\\boxed{4}" if calls["n"] > 8 and payload["sampling_params"]["sampling_seed"] % 2 else "\\boxed{5}"
        )

    with FakeSGLang(responder) as srv, caplog.at_level("WARNING"):
        args = make_args(
            prompts(tmp_path, ["a", "b", "c"]),
            srv.url,
            "--rm-type math --n-samples-per-prompt 2 --rollout-batch-size 1",
            "--rollout-deterministic-seeds --dynamic-sampling-filter-path slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std",
        )
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
    assert out.metrics["rollout/dropped_groups"] == 4 and out.metrics["rollout/sampling_rounds"] == 5
    assert "4 groups dropped so far {'zero_std_0': 4}, 0 of 1 kept" in caplog.text
