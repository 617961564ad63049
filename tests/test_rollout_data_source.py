"""The RL prompt data source: keys, chat template, metadata, length filter, epochs, state, buffer."""

from __future__ import annotations

import json

import pytest
from conftest import QWEN3_TOKENIZER, TINY
from rollout_helpers import make_args, write_jsonl

from slime.rollout.data_source import RolloutDataSource, RolloutDataSourceWithBuffer
from slime.rollout.prompt_dataset import PromptDataConfig, PromptDataset, RowError
from slime.utils.plugins import PluginError
from slime.utils.types import Sample


def rows(n):
    return [
        {"prompt": f"Compute {i} * 3.", "label": str(3 * i), "metadata": json.dumps({"id": i, "rm_type": "math"})}
        for i in range(n)
    ]


def test_prompt_samples_from_keys(tmp_path, tiny_tokenizer):
    args = make_args(write_jsonl(tmp_path / "d.jsonl", rows(3)), None, "--n-samples-per-prompt 2")
    source = RolloutDataSource(args)
    groups = source.get_samples(2)
    assert [[s.index for s in g] for g in groups] == [[0, 1], [2, 3]]
    assert [[s.group_index for s in g] for g in groups] == [[0, 0], [1, 1]]
    s = groups[1][0]
    assert s.prompt == "Compute 1 * 3." and s.label == "3" and s.metadata == {"id": 1, "rm_type": "math"}
    assert s.tokens == tiny_tokenizer.encode("Compute 1 * 3.", add_special_tokens=False)
    assert s.status == Sample.Status.PENDING and s.response_length == 0
    groups[1][0].tokens.append(7)  # copies: mutating one sample never leaks into another or the dataset
    assert groups[1][1].tokens == source.dataset.samples[1].tokens == s.tokens[:-1]
    with pytest.raises(RuntimeError, match="read-only"):
        source.add_samples(groups)


def test_prompt_key_overrides_input_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Why?", "messages": "unused"}])
    args = make_args(path, None, "--prompt-key question")
    assert RolloutDataSource(args).get_samples(1)[0][0].prompt == "Why?"


def test_chat_template_with_tools(tmp_path):
    if not (QWEN3_TOKENIZER / "tokenizer.json").exists():
        pytest.skip("../shared/assets/qwen3-tokenizer not present")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "math",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    data = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            "tools": json.dumps(tools),
        },
        {"prompt": "plain string becomes a user turn"},
    ]
    args = make_args(
        write_jsonl(tmp_path / "d.jsonl", data),
        None,
        "--apply-chat-template --rollout-batch-size 1 --apply-chat-template-kwargs",
        '{"enable_thinking": false}',
        tokenizer_dir=str(QWEN3_TOKENIZER),
    )
    ds = RolloutDataSource(args).dataset
    first, second = ds.samples
    assert "calculator" in first.prompt and "<tools>" in first.prompt
    assert first.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "<|im_start|>user\nplain string becomes a user turn<|im_end|>" in second.prompt


def test_tiny_chat_template(tmp_path, tiny_tokenizer):
    data = [{"prompt": [{"role": "user", "content": "hi"}]}]
    args = make_args(write_jsonl(tmp_path / "d.jsonl", data), None, "--apply-chat-template")
    sample = RolloutDataSource(args).dataset.samples[0]
    expected = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert sample.prompt == expected and sample.tokens == tiny_tokenizer.encode(expected, add_special_tokens=False)


def test_max_prompt_len_drops_and_counts(tmp_path, caplog):
    data = [{"prompt": "short"}, {"prompt": "a much longer prompt " * 20}, {"prompt": "also short"}]
    args = make_args(write_jsonl(tmp_path / "d.jsonl", data), None, "--rollout-max-prompt-len 8")
    with caplog.at_level("WARNING"):
        source = RolloutDataSource(args)
    assert len(source) == 2 and source.report == {"rows": 3, "kept": 2, "dropped_prompt_too_long": 1}
    assert "dropped 1 of 3 prompts" in caplog.text and "row 1 (line 2)" in caplog.text
    args = make_args(write_jsonl(tmp_path / "e.jsonl", data[1:2]), None, "--rollout-max-prompt-len 8")
    with pytest.raises(ValueError, match="no usable prompt"):
        RolloutDataSource(args)


@pytest.mark.parametrize(
    "row, extra, message",
    [
        ({"question": "x"}, [], r"row 0 \(line 1\) field 'prompt': missing"),
        ({"prompt": [{"role": "user", "content": "x"}]}, [], "need --apply-chat-template"),
        ({"prompt": "x", "metadata": "{not json"}, [], "field 'metadata': is a string but not valid JSON"),
        ({"prompt": "x", "metadata": [1]}, [], "field 'metadata': must be an object"),
        ({"prompt": [{"content": "no role"}]}, ["--apply-chat-template"], "list of {role, content} messages"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, extra, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(RowError, match=message) as e:
        RolloutDataSource(make_args(path, None, *extra))
    assert "bad.jsonl" in str(e.value)


def test_epochs_shuffle_and_resume(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(5))
    args = make_args(path, None, "--rollout-shuffle --rollout-seed 3")
    a = RolloutDataSource(args)
    seen = [g[0].label for g in a.get_samples(7)]
    assert sorted(seen[:5]) == sorted(str(3 * i) for i in range(5))  # epoch 0 visits every prompt once
    assert seen[:5] != [str(3 * i) for i in range(5)]  # shuffled
    b = RolloutDataSource(make_args(path, None, "--rollout-shuffle --rollout-seed 3"))
    assert [g[0].label for g in b.get_samples(7)] == seen  # same seed, same order
    state = json.loads(json.dumps(a.state_dict()))
    c = RolloutDataSource(make_args(path, None, "--rollout-shuffle --rollout-seed 3"))
    c.load_state_dict(state)
    nxt = c.get_samples(2)
    assert [g[0].label for g in nxt] == [g[0].label for g in a.get_samples(2)]
    assert nxt[0][0].index == 7  # counters resume too
    other = RolloutDataSource(make_args(path, None, "--rollout-shuffle --rollout-seed 4"))
    with pytest.raises(ValueError, match="saved seed=3"):
        other.load_state_dict(state)


def test_save_load_files_and_buffer_state(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(4))
    save = tmp_path / "ckpt"
    args = make_args(path, None, "--save", str(save), "--n-samples-per-prompt 2")
    args.load = str(save)
    src = RolloutDataSourceWithBuffer(args)
    groups = src.get_samples(2)
    groups[0][0].append_response_tokens(tokens=[5, 6], log_probs=[-0.5, -0.25], text="ab")
    groups[0][0].status = Sample.Status.ABORTED
    src.add_samples([groups[0]])
    src.save(3)
    assert (save / "rollout" / "data_source_state_3.json").exists()
    fresh = RolloutDataSourceWithBuffer(args)
    fresh.load(3)
    assert fresh.get_buffer_length() == 1
    restored = fresh.buffer[0][0]
    assert (
        restored.status == Sample.Status.ABORTED
        and restored.rollout_log_probs == [-0.5, -0.25]
        and restored.response == "ab"
    )
    served = fresh.get_samples(2)  # buffer first, then the next unseen prompt
    assert [g[0].index for g in served] == [0, 4] and fresh.get_buffer_length() == 0
    with pytest.raises(ValueError, match="group 0 has 1 samples, expected --n-samples-per-prompt 2"):
        fresh.add_samples([[Sample()]])


def drop_all_but_one(args, rollout_id, buffer, num_samples):
    return buffer[:1]  # returns a group but leaves it in the buffer: broken contract


def newest_first(args, rollout_id, buffer, num_samples):
    taken = buffer[-num_samples:][::-1]
    del buffer[-num_samples:]
    return taken


def test_buffer_filter_plugin_and_contract(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(4))
    args = make_args(path, None, "--buffer-filter-path test_rollout_data_source:newest_first")
    src = RolloutDataSourceWithBuffer(args)
    src.add_samples([[Sample(index=i)] for i in range(3)])
    assert [g[0].index for g in src.get_samples(2)] == [2, 1]
    bad = RolloutDataSourceWithBuffer(
        make_args(path, None, "--buffer-filter-path test_rollout_data_source.drop_all_but_one")
    )
    bad.add_samples([[Sample(index=0)]])
    with pytest.raises(PluginError, match="must remove exactly what it returns"):
        bad.get_samples(1)
    with pytest.raises(PluginError, match="--buffer-filter-path"):
        RolloutDataSourceWithBuffer(make_args(path, None, "--buffer-filter-path test_rollout_data_source.nope"))


def test_config_errors():
    with pytest.raises(ValueError, match="--prompt-data is required"):
        PromptDataConfig(path="", hf_checkpoint=str(TINY))
    with pytest.raises(ValueError, match="--rollout-max-prompt-len must be positive"):
        PromptDataset(PromptDataConfig(path="x.jsonl", hf_checkpoint=str(TINY), max_prompt_len=0))


class NoBuffer:
    def __init__(self, args):
        self.args = args

    def get_samples(self, n):
        return []


def test_build_data_source_from_flag(tmp_path):
    from slime.rollout.data_source import build_data_source

    path = write_jsonl(tmp_path / "d.jsonl", rows(2))
    assert type(build_data_source(make_args(path, None))) is RolloutDataSourceWithBuffer
    plain = build_data_source(make_args(path, None, "--data-source-path slime.rollout.data_source:RolloutDataSource"))
    assert type(plain) is RolloutDataSource
    with pytest.raises(PluginError, match="NoBuffer lacks add_samples, save, load, __len__"):
        build_data_source(make_args(path, None, "--data-source-path test_rollout_data_source.NoBuffer"))
