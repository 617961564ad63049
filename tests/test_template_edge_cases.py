"""Templates of other shapes, and rows that must fail as row errors (skippable, counted)."""

from __future__ import annotations

import pytest

from conftest import TINY, load_tokenizer, write_jsonl
from slime.data.chat_template import ChatTemplate, RowFieldError, TemplateError
from slime.data.config import SFTDataConfig, build_data_source
from slime.data.dataset import DataValidationError
from slime.data.schema import normalize_messages

U = {"role": "user", "content": "q"}

# A Llama-3-like template: header and end are different tokens than Qwen's, the system
# prompt is a default block, and the assistant header ends with a blank line.
LLAMA_LIKE = (
    "{{ '<|endoftext|>' }}{% for m in messages %}"
    "{{ '<|im_start|>' + m.role + '<|im_end|>\n\n' + m.content | trim + '<|endoftext|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}"
)
# A Gemma-like template: 'model' role, system merged into the first user turn, alternation enforced.
GEMMA_LIKE = (
    "{% set sys = messages[0].content + '\n\n' if messages[0].role == 'system' else '' %}"
    "{% set msgs = messages[1:] if messages[0].role == 'system' else messages %}"
    "{% for m in msgs %}"
    "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% set role = 'model' if m.role == 'assistant' else m.role %}"
    "{{ '<|im_start|>' + role + '\n' + (sys if loop.first else '') + m.content | trim + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>model\n' }}{% endif %}"
)


def runs(tok, enc):
    out, start = [], None
    for i, m in enumerate(list(enc.loss_mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append(tok.decode(enc.token_ids[start:i]))
            start = None
    return out


@pytest.mark.parametrize(
    "template, header, expected",
    [
        (LLAMA_LIKE, "<|im_start|>assistant<|im_end|>\n\n", ["a1<|endoftext|>", "a2<|endoftext|>"]),
        (GEMMA_LIKE, "<|im_start|>model\n", ["a1<|im_end|>", "a2<|im_end|>"]),
    ],
    ids=["llama_like", "gemma_like"],
)
def test_other_template_families(template, header, expected):
    tok = load_tokenizer()
    tok.chat_template = template
    ct = ChatTemplate(tok)
    assert ct.markers.header == header
    conv = [{"role": "system", "content": "sys"}, U, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    m, t = normalize_messages(conv)
    for policy in ("full", "keep-reasoning"):
        (enc,) = ct.encode(m, t, policy=policy)
        assert enc.token_ids == tok.apply_chat_template(m, tokenize=True)
        assert runs(tok, enc) == expected
    per_turn = ct.encode(m, t, policy="per-turn")
    assert [runs(tok, e) for e in per_turn] == [[expected[0]], [expected[1]]]


def test_template_raising_on_a_row_is_a_skippable_row_error(tmp_path):
    tok_dir = tmp_path / "tok"
    tok = load_tokenizer()
    tok.chat_template = GEMMA_LIKE
    tok.save_pretrained(tok_dir)
    bad = {"messages": [U, U, {"role": "assistant", "content": "a"}]}
    good = {"messages": [U, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    cfg = dict(prompt_data=str(path), hf_checkpoint=str(tok_dir))
    with pytest.raises(DataValidationError, match=r"row 1 \(line 2\): field 'messages': the chat template failed on this row: .*alternate"):
        build_data_source(SFTDataConfig(**cfg), progress=False)
    src = build_data_source(SFTDataConfig(**cfg, skip_invalid=True), progress=False)
    assert (src.data.report.rows_invalid, src.data.report.samples) == (1, 1)


def test_marker_in_tool_call_is_a_row_error(tiny_tokenizer):
    ct = ChatTemplate(tiny_tokenizer)
    call = {"type": "function", "function": {"name": "f", "arguments": {"x": "a<|im_end|>b"}}}
    m, t = normalize_messages([U, {"role": "assistant", "content": "", "tool_calls": [call]}])
    with pytest.raises(RowFieldError) as e:
        ct.encode(m, t)
    assert e.value.field == "messages[1].tool_calls[0].function.arguments"


def test_tool_call_turns_ending_differently_fail_loudly():
    tok = load_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content }}"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}{{ c.function.name + '(' + (c.function.arguments|tojson) + ')' }}{% endfor %}"
        "{{ '<|endoftext|>' }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="tool calls do not end with"):
        ChatTemplate(tok)


def test_history_turns_ending_differently_fail_loudly():
    tok = load_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content }}"
        "{{ '<|endoftext|>' if m.role == 'assistant' and not loop.last else '<|im_end|>' }}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="in history do not end with"):
        ChatTemplate(tok)


def test_per_turn_rows_that_cannot_be_exact_are_row_errors(tiny_tokenizer):
    ct = ChatTemplate(tiny_tokenizer)
    m, t = normalize_messages([{"role": "assistant", "content": "hi"}, U, {"role": "assistant", "content": "a"}])
    with pytest.raises(RowFieldError, match="needs at least one message before it"):
        ct.encode(m, t, policy="per-turn")
    m, t = normalize_messages([U, {"role": "assistant", "content": "one"}, {"role": "assistant", "content": "two"}])
    with pytest.raises(RowFieldError, match="not a prefix") as e:
        ct.encode(m, t, policy="per-turn")
    assert e.value.field == "messages[2]"


def test_per_turn_sample_prompt_is_its_prefix(tmp_path):
    conv = {"messages": [U, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [conv])
    src = build_data_source(SFTDataConfig(prompt_data=str(path), hf_checkpoint=str(TINY), policy="per-turn"), progress=False)
    first, second = src.get_samples(2)
    assert len(first.prompt) == 2 and len(second.prompt) == 4


def test_reasoning_field_variants():
    messages, _ = normalize_messages([U, {"role": "assistant", "content": "a", "reasoning_content": None, "reasoning": "R"}])
    assert messages[1]["reasoning_content"] == "R"
    with pytest.raises(RowFieldError, match="different text"):
        normalize_messages([U, {"role": "assistant", "content": "a", "reasoning_content": "X", "reasoning": "Y"}])


def test_flat_responses_tools_are_wrapped():
    from slime.data.schema import normalize_tools

    (tool,) = normalize_tools([{"type": "function", "name": "f", "parameters": {}}], "tools")
    assert tool == {"type": "function", "function": {"name": "f", "parameters": {}}}
    with pytest.raises(RowFieldError, match="only function tools"):
        normalize_tools([{"type": "web_search"}], "tools")


def test_reserved_template_kwargs_rejected():
    with pytest.raises(ValueError, match="may not set \\['tools'\\]"):
        SFTDataConfig(prompt_data="x", hf_checkpoint="y", chat_template_kwargs={"tools": []})


def test_changed_content_is_refused_on_resume(tmp_path):
    rows = [{"messages": [U, {"role": "assistant", "content": "abc"}]}, {"messages": [U, {"role": "assistant", "content": "xyz"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    state = build_data_source(SFTDataConfig(prompt_data=str(path), hf_checkpoint=str(TINY)), progress=False).state_dict()
    rows[1]["messages"][1]["content"] = "xyw"  # same length, different text
    write_jsonl(path, rows)
    src = build_data_source(SFTDataConfig(prompt_data=str(path), hf_checkpoint=str(TINY)), progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        src.load_state_dict(state)
    with pytest.raises(ValueError, match="no 'seed'"):
        src.load_state_dict({"epoch": 0})


def test_merged_boundary_token_is_counted(qwen3_tokenizer):
    ct = ChatTemplate(qwen3_tokenizer)
    m, t = normalize_messages([U, {"role": "assistant", "content": "\nhello"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}])
    (enc,) = ct.encode(m, t)
    assert enc.token_ids == qwen3_tokenizer.apply_chat_template(m, tokenize=True)
    assert enc.boundary_straddles == 1
