"""The inspection tool and the embedded tiny default."""

from __future__ import annotations

import json

import pytest

from conftest import QWEN3_TOKENIZER, TINY, TINY_DATA, load_tool


def test_inspect_tool_dump_and_summary(tmp_path, capsys):
    dump = tmp_path / "dump.jsonl"
    tool = load_tool("inspect_sft_data")
    code = tool.main(["--hf-checkpoint", str(TINY), "--prompt-data", str(TINY_DATA), "--dump", str(dump), "--show", "4", "--no-color"])
    assert code == 0
    out = capsys.readouterr().out
    for needle in ("rows: 80 read, 0 invalid", "samples: 80 kept, 0 truncated", "supervised", "p50=", "p99=", "[[", "]]"):
        assert needle in out
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(records) == 80
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY))
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    for rec in records[:10]:
        assert len(rec["token_ids"]) == len(rec["loss_mask"])
        row = rows[rec["row_index"]]
        assert rec["token_ids"] == tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=True)


def test_inspect_tool_colour_and_tokenizer_only_dir(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (tok_dir / name).write_bytes((TINY / name).read_bytes())
    tool = load_tool("inspect_sft_data")
    assert tool.main(["--hf-checkpoint", str(tok_dir), "--prompt-data", str(TINY_DATA), "--multi-turn-policy", "per-turn"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" in out  # ANSI colour
    assert "samples: 160 kept" in out


def test_inspect_tool_reports_bad_data(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    tool = load_tool("inspect_sft_data")
    assert tool.main(["--hf-checkpoint", str(TINY), "--prompt-data", str(bad)]) == 1
    assert "row 0 (line 1): field 'messages': has no assistant turn" in capsys.readouterr().err


def test_tiny_checkpoint_is_a_small_qwen3():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(TINY))
    assert model.config.model_type == "qwen3"
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000
    tok = AutoTokenizer.from_pretrained(str(TINY))
    assert len(tok) == model.config.vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == model.config.eos_token_id


def test_tiny_template_is_the_real_qwen3_one():
    if not (QWEN3_TOKENIZER / "chat_template.jinja").exists():
        pytest.skip("../shared/assets/qwen3-tokenizer not present")
    assert (TINY / "chat_template.jinja").read_text() == (QWEN3_TOKENIZER / "chat_template.jinja").read_text()


def test_tiny_data_covers_the_cases():
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    msgs = [m for r in rows for m in r["messages"]]
    assert any(len([m for m in r["messages"] if m["role"] == "assistant"]) == 1 for r in rows)  # single turn
    assert any(len([m for m in r["messages"] if m["role"] == "user"]) > 1 for r in rows)  # multi-turn
    assert any(m["role"] == "system" for m in msgs) and any(m.get("tool_calls") for m in msgs)
    assert any(m.get("reasoning_content") for m in msgs) and any(r.get("tools") for r in rows)
