"""Every converter, on inline rows (always) and on the real files in ../shared/data (if present).
Converted rows must pass slime's own validation and encode with the Qwen3 template."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, load_tool, shared_data, write_jsonl
from slime.data.chat_template import ChatTemplate
from slime.data.converters import (
    ConversionError,
    alpaca_row,
    content_parts_row,
    convert_file,
    nemo_gym_row,
    sharegpt_row,
)
from slime.data.schema import DataKeys, parse_row


@pytest.fixture(scope="module")
def template(tiny_tokenizer):
    return ChatTemplate(tiny_tokenizer)


def encodes(template, row):
    conv = parse_row(row, DataKeys())
    (enc,) = template.encode(conv.messages, conv.train, conv.tools)
    assert enc.num_supervised > 0
    return conv


def test_sharegpt_function_calls(template):
    row = {
        "system": "sys",
        "conversations": [
            {"from": "human", "value": "find a recipe"},
            {"from": "function_call", "value": '{"name": "search", "arguments": {"q": "rice"}}'},
            {"from": "observation", "value": '{"hits": 2}'},
            {"from": "gpt", "value": "Found 2.", "weight": 0},
            {"from": "human", "value": "thanks"},
            {"from": "gpt", "value": "welcome"},
        ],
        "tools": '[{"name": "search", "description": "d", "parameters": {"type": "object"}}]',
    }
    conv = encodes(template, sharegpt_row(row))
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert conv.messages[2]["tool_calls"][0]["function"] == {"name": "search", "arguments": {"q": "rice"}}
    assert conv.train == [False, False, True, False, False, False, True]
    assert conv.tools == [{"type": "function", "function": {"name": "search", "description": "d", "parameters": {"type": "object"}}}]
    with pytest.raises(ConversionError, match="conversations\\[0\\].from"):
        sharegpt_row({"conversations": [{"from": "robot", "value": "x"}]})


def test_alpaca_with_history(template):
    conv = encodes(template, alpaca_row({"instruction": "Sum", "input": "1 2", "output": "3", "system": "s", "history": [["hi", "hello"]]}))
    assert [(m["role"], m["content"]) for m in conv.messages] == [
        ("system", "s"), ("user", "hi"), ("assistant", "hello"), ("user", "Sum\n1 2"), ("assistant", "3")]
    assert alpaca_row({"instruction": "Q", "input": "", "output": "A"})["messages"][0]["content"] == "Q"
    with pytest.raises(ConversionError, match="field 'output'"):
        alpaca_row({"instruction": "Q"})


def nemo_rollout(reward):
    return {
        "responses_create_params": {
            "input": [{"role": "developer", "content": "Use tools."}, {"role": "user", "content": "Weather in Oslo?"}],
            "tools": [{"type": "function", "name": "get_weather", "description": "w", "parameters": {"type": "object"}, "strict": True}],
        },
        "response": {
            "output": [
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "call the tool"}]},
                {"type": "function_call", "name": "get_weather", "arguments": '{"city": "Oslo"}', "call_id": "c1"},
                {"type": "function_call_output", "call_id": "c1", "output": "snow"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Snow in Oslo."}]},
            ]
        },
        "reward": reward,
    }


def test_nemo_gym_rollout(template):
    conv = encodes(template, nemo_gym_row(nemo_rollout(1.0)))
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[2]["reasoning_content"] == "call the tool"
    assert conv.messages[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert conv.messages[3] == {"role": "tool", "content": "snow", "tool_call_id": "c1"}
    assert conv.tools[0]["function"]["name"] == "get_weather" and "strict" not in conv.tools[0]["function"]
    assert nemo_gym_row(nemo_rollout(0.5)) is None
    assert nemo_gym_row(nemo_rollout(0.5), min_reward=0.5) is not None


def test_nemo_gym_cli_prints_kept_k_of_n(tmp_path, capsys):
    src = write_jsonl(tmp_path / "rollouts.jsonl", [nemo_rollout(r) for r in (1.0, 0.2, 0.9, 0.79, 0.8)])
    out = tmp_path / "sft.jsonl"
    tool = load_tool("convert_sft_data")
    assert tool.main(["--format", "nemo-gym", "--input", str(src), "--output", str(out)]) == 0
    assert "kept 3 of 5" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3
    assert tool.main(["--format", "nemo-gym", "--input", str(src), "--output", str(out), "--min-reward", "0.95"]) == 0
    assert "kept 1 of 5" in capsys.readouterr().out


def test_cli_bad_row_names_row_and_field(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q"}])
    tool = load_tool("convert_sft_data")
    assert tool.main(["--format", "alpaca", "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert "row 1 (line 2): field 'output'" in capsys.readouterr().err
    assert tool.main(["--format", "alpaca", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--skip-invalid"]) == 0
    assert "kept 1 of 2 (0 filtered, 1 invalid)" in capsys.readouterr().out


def test_content_parts(template):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "Movie?"}]},
            {"role": "assistant", "content": [
                {"type": "reasoning", "value": "look it up"},
                {"type": "tool_call", "value": '{"name": "get_movie", "arguments": {"title": "Inception"}}'},
            ]},
            {"role": "tool", "content": [{"type": "text", "value": "2010"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "It is from 2010."}]},
        ],
        "tools": json.dumps([{"type": "function", "function": {"name": "get_movie", "parameters": {}}}]),
    }
    conv = encodes(template, content_parts_row(row))
    assert conv.messages[1]["reasoning_content"] == "look it up" and conv.messages[1]["content"] == ""
    assert conv.messages[1]["tool_calls"][0]["function"]["arguments"] == {"title": "Inception"}
    assert conv.messages[2] == {"role": "tool", "content": "2010"}


@pytest.mark.parametrize(
    "name, fmt, n_rows",
    [("glaive_toolcall_en_demo.json", "sharegpt", 300), ("alpaca_en_demo.json", "alpaca", 999), ("reason_tool_use_demo_50.jsonl", "content-parts", 50)],
)
def test_real_files(tmp_path, template, name, fmt, n_rows):
    rows, stats = convert_file(str(shared_data(name)), fmt)
    assert (stats.read, stats.kept, stats.invalid) == (n_rows, n_rows, 0)
    for row in rows[:: max(1, n_rows // 40)]:
        conv = encodes(template, row)
        tok = template.tokenizer
        assert tok.apply_chat_template(conv.messages, tools=conv.tools, tokenize=False)
    if fmt == "sharegpt":
        assert sum(any(m.get("tool_calls") for m in r["messages"]) for r in rows) > 100
    if fmt == "content-parts":
        assert sum(any(m.get("tool_calls") for m in r["messages"]) for r in rows) > 20
        assert sum(any(m.get("reasoning_content") for m in r["messages"]) for r in rows) > 40
    # The converted file goes through slime's data path end to end.
    from slime.data.config import SFTDataConfig, build_data_source

    out = write_jsonl(tmp_path / "converted.jsonl", rows)
    source = build_data_source(SFTDataConfig(prompt_data=str(out), hf_checkpoint=str(TINY)), progress=False)
    assert source.data.report.samples == n_rows and source.data.report.rows_invalid == 0
