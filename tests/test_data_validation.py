"""Bad rows: each gives an error naming file, row and field, or is skipped and counted."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, write_jsonl
from slime.data.config import SFTDataConfig, build_data_source
from slime.data.dataset import DataValidationError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def msgs(*extra):
    return {"messages": [{"role": "user", "content": "hi"}, *extra]}


BAD_ROWS = [
    (msgs({"role": "bot", "content": "x"}), "messages[1].role", "unknown role 'bot'"),
    (msgs({"role": "assistant", "content": 5}), "messages[1].content", "must be a string or a list of parts"),
    (msgs({"role": "assistant", "content": [{"type": "image_url", "image_url": "x"}]}), "messages[1].content[0]", "unsupported content part"),
    (msgs({"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}), "messages[1].tool_calls[0].function.name", "non-empty string"),
    (msgs({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}), "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    (msgs({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}), "messages[1].tool_calls[0].function.arguments", "JSON object"),
    (msgs({"role": "assistant", "content": "", "tool_calls": {"name": "f"}}), "messages[1].tool_calls", "must be a list"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}, {"role": "assistant", "content": "a"}]}, "messages[0].tool_calls", "only assistant"),
    (msgs({"role": "assistant", "content": "a", "loss_weight": 0.5}), "messages[1].loss_weight", "must be 0 or 1"),
    (msgs({"role": "assistant", "content": "a", "loss_weight": 0}), "messages", "no assistant turn to supervise"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "messages", "no assistant turn"),
    ({"messages": []}, "messages", "is empty"),
    ({"conversations": []}, "messages", "is missing"),
    ({"messages": "not json"}, "messages", "not valid JSON"),
    ({**GOOD, "tools": "{bad"}, "tools", "not valid JSON"),
    ({**GOOD, "tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]", "string 'name'"),
    (msgs({"role": "assistant", "content": "x<|im_end|>y"}), "messages[1].content", "turn marker"),
]


def config(path, **kw):
    return SFTDataConfig(prompt_data=str(path), hf_checkpoint=str(TINY), **kw)


@pytest.mark.parametrize("row, field, message", BAD_ROWS, ids=[f for _, f, _ in BAD_ROWS])
def test_bad_row_names_file_row_and_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataValidationError) as e:
        build_data_source(config(path), progress=False)
    text = str(e.value)
    assert f"{path}: row 2 (line 3): field '{field}'" in text
    assert message in text
    # The same data with skipping keeps the good rows and counts the bad one.
    source = build_data_source(config(path, skip_invalid=True), progress=False)
    report = source.data.report
    assert (report.rows, report.rows_invalid, report.samples) == (4, 1, 3)
    assert sorted(source.data.rows.tolist()) == [0, 1, 3]
    assert any("invalid" in line and "1 invalid" in line for line in report.summary_lines())


def test_invalid_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [GOOD, "{not json", GOOD])
    with pytest.raises(DataValidationError, match=r"row 1 \(line 2\): field '<json>': invalid JSON"):
        build_data_source(config(path), progress=False)


def test_all_errors_listed_and_counted(tmp_path):
    rows = [GOOD] + [msgs({"role": "bot", "content": "x"})] * 3
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataValidationError) as e:
        build_data_source(config(path), progress=False)
    assert str(e.value).startswith("3 invalid row(s)")
    assert str(e.value).count("unknown role") == 3


def test_truncation_counted_and_zero_supervised_is_invalid(tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there " * 20}]}
    path = write_jsonl(tmp_path / "data.jsonl", [short, long_prompt])
    with pytest.raises(DataValidationError, match=r"row 1 \(line 2\): field 'messages': no supervised token left after truncation to --rollout-max-context-len 40"):
        build_data_source(config(path, max_length=40), progress=False)
    source = build_data_source(config(path, max_length=40, skip_invalid=True), progress=False)
    r = source.data.report
    assert (r.samples, r.samples_truncated, r.samples_dropped) == (1, 1, 1)
    (sample,) = source.get_samples(1)
    assert len(sample.tokens) == 40 and sample.status.value == "truncated"
    assert sum(sample.loss_mask) > 0


def test_per_turn_truncation_drops_only_late_turns(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "word " * 100},
            {"role": "assistant", "content": "c"},
        ]
    }
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    source = build_data_source(config(path, policy="per-turn", max_length=30, skip_invalid=True), progress=False)
    r = source.data.report
    assert (r.rows, r.rows_invalid, r.samples, r.samples_dropped) == (1, 0, 1, 1)
    assert source.data.turns.tolist() == [1]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        build_data_source(config(tmp_path / "nope.jsonl"), progress=False)


def test_bad_hf_checkpoint_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    with pytest.raises(ValueError, match="--hf-checkpoint"):
        build_data_source(SFTDataConfig(prompt_data=str(path), hf_checkpoint=str(tmp_path)), progress=False)


def test_config_checks():
    with pytest.raises(ValueError, match="multi-turn-policy"):
        SFTDataConfig(prompt_data="x", hf_checkpoint="y", policy="nope")
    with pytest.raises(ValueError, match="rollout-max-context-len"):
        SFTDataConfig(prompt_data="x", hf_checkpoint="y", max_length=1)


def test_content_parts_and_weights_accepted(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "sys"}]},
            {"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "reasoning", "text": "r"}, {"type": "text", "text": "a"}], "step_loss_mask": 0},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2", "weight": 1},
        ],
        "tools": json.dumps([{"name": "f", "parameters": {}}]),
        "metadata": {"source": "unit"},
    }
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    source = build_data_source(config(path), progress=False)
    (s,) = source.get_samples(1)
    assert s.metadata["source"] == "unit" and s.metadata["tools"][0]["function"]["name"] == "f"
    assert s.prompt[2]["reasoning_content"] == "r" and s.prompt[2]["content"] == "a"
    tok = source.encoder.template.tokenizer
    assert tok.decode([t for t, m in zip(s.tokens, s.full_loss_mask()) if m]) == "<think>\n\n</think>\n\na2<|im_end|>"
