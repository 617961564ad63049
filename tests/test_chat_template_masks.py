"""Invariant 3: ids equal apply_chat_template of the whole conversation; the mask is 1 exactly
on what each assistant turn generates. The oracle here is written against the Qwen3 text
format (regex over the render), independently of how slime derives the spans."""

from __future__ import annotations

import re

import pytest

from conftest import load_tokenizer
from slime.data.chat_template import ChatTemplate, RowFieldError, TemplateError
from slime.data.schema import normalize_messages

ASSISTANT = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def call(city):
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


CONVERSATIONS = {
    "multi_turn_reasoning": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "two plus two", "content": "4"},
        {"role": "user", "content": "times 3?"},
        {"role": "assistant", "reasoning_content": "4*3=12", "content": "12"},
    ],
    "tools_consecutive_tool_messages": [
        {"role": "user", "content": "Weather in Oslo and Lima?"},
        {"role": "assistant", "reasoning_content": "call twice", "content": "", "tool_calls": [call("Oslo"), call("Lima")]},
        {"role": "tool", "content": "snow"},
        {"role": "tool", "content": "sun"},
        {"role": "assistant", "reasoning_content": "summarize", "content": "Oslo: snow. Lima: sun."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    "empty_system_unicode": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Übersetze: 天气 ✓ — ok? 🙂"},
        {"role": "assistant", "content": "Wetter ✓ 🙂 — ça va."},
    ],
    "tool_chain_then_user": [
        {"role": "system", "content": "You call tools."},
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "reasoning_content": "need tool", "content": "Checking.", "tool_calls": [call("Paris")]},
        {"role": "tool", "content": '{"w": "rain"}'},
        {"role": "assistant", "reasoning_content": "got it", "content": "Rain in Paris."},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [call("Rome")]},
        {"role": "tool", "content": '{"w": "sun"}'},
        {"role": "assistant", "reasoning_content": "sunny", "content": "Sun in Rome."},
    ],
}

TOKENIZERS = ["tiny", "qwen3"]


@pytest.fixture(params=TOKENIZERS)
def template(request):
    tok = request.getfixturevalue("tiny_tokenizer" if request.param == "tiny" else "qwen3_tokenizer")
    return ChatTemplate(tok)


def supervised_runs(tokenizer, ids, mask):
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tokenizer.decode(ids[start:i]))
            start = None
    return runs


def test_markers_from_template(template):
    m = template.markers
    assert (m.header, m.prompt_rest, m.end) == ("<|im_start|>assistant\n", "", "<|im_end|>")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_full_policy_ids_and_mask_exact(template, name):
    tok = template.tokenizer
    messages, train = normalize_messages(CONVERSATIONS[name])
    tools = TOOLS if "tool" in name else None
    (enc,) = template.encode(messages, train, tools, policy="full")
    assert enc.token_ids == tok.apply_chat_template(messages, tools=tools, tokenize=True)
    rendered = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    expected = ASSISTANT.findall(rendered)
    assert len(expected) == sum(m["role"] == "assistant" for m in messages)
    assert supervised_runs(tok, enc.token_ids, enc.loss_mask) == expected
    assert enc.boundary_straddles == 0
    # Everything else (system, user, tool, headers, glue) is unsupervised and decodes back.
    assert tok.decode(enc.token_ids) == rendered


def test_loss_weight_zero_turns_off_a_turn(template):
    tok = template.tokenizer
    conv = [dict(m) for m in CONVERSATIONS["multi_turn_reasoning"]]
    conv[2]["loss_weight"] = 0
    messages, train = normalize_messages(conv)
    (enc,) = template.encode(messages, train, policy="full")
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert supervised_runs(tok, enc.token_ids, enc.loss_mask) == ASSISTANT.findall(rendered)[1:]
    assert enc.token_ids == tok.apply_chat_template(messages, tokenize=True)


def test_keep_reasoning_renders_every_turn_as_last(template):
    tok = template.tokenizer
    messages, train = normalize_messages(CONVERSATIONS["multi_turn_reasoning"])
    (full,) = template.encode(messages, train, policy="full")
    (keep,) = template.encode(messages, train, policy="keep-reasoning")
    runs = supervised_runs(tok, keep.token_ids, keep.loss_mask)
    assert runs == ["<think>\ntwo plus two\n</think>\n\n4<|im_end|>", "<think>\n4*3=12\n</think>\n\n12<|im_end|>"]
    # The default render strips the first turn's reasoning (Qwen3 template behaviour).
    assert "two plus two" not in tok.decode(full.token_ids)
    # Context outside assistant turns is unchanged.
    assert tok.decode([t for t, m in zip(keep.token_ids, keep.loss_mask) if not m]) == tok.decode(
        [t for t, m in zip(full.token_ids, full.loss_mask) if not m]
    )


def test_per_turn_policy_exact_inference_context(template):
    tok = template.tokenizer
    raw = CONVERSATIONS["tool_chain_then_user"]
    messages, train = normalize_messages(raw)
    encs = template.encode(messages, train, TOOLS, policy="per-turn")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert [e.turn for e in encs] == turns
    for enc in encs:
        i = enc.turn
        prompt = tok.apply_chat_template(messages[:i], tools=TOOLS, add_generation_prompt=True, tokenize=True)
        whole = tok.apply_chat_template(messages[: i + 1], tools=TOOLS, tokenize=True)
        assert enc.token_ids == whole
        assert enc.token_ids[: len(prompt)] == prompt
        assert enc.loss_mask[: len(prompt)] == [0] * len(prompt)
        (run,) = supervised_runs(tok, enc.token_ids, enc.loss_mask)
        assert run == ASSISTANT.findall(tok.decode(whole))[-1]
    # History reasoning is stripped in the context of a later turn, as at inference.
    last = tok.decode(encs[-1].token_ids)
    assert "need tool" not in last and "<think>\nsunny\n</think>" in last


def test_enable_thinking_false_prompt_part_not_supervised(tiny_tokenizer):
    template = ChatTemplate(tiny_tokenizer, {"enable_thinking": False})
    assert template.markers.prompt_rest == "<think>\n\n</think>\n\n"
    messages, train = normalize_messages(CONVERSATIONS["empty_system_unicode"])
    (enc,) = template.encode(messages, train)
    assert enc.token_ids == tiny_tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=False)
    assert supervised_runs(tiny_tokenizer, enc.token_ids, enc.loss_mask) == ["Wetter ✓ 🙂 — ça va.<|im_end|>"]


def test_other_template_family_plain_chatml():
    """No per-model code: a template with different structure works the same way."""
    tok = load_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    template = ChatTemplate(tok)
    messages, train = normalize_messages(CONVERSATIONS["multi_turn_reasoning"])
    (enc,) = template.encode(messages, train)
    assert enc.token_ids == tok.apply_chat_template(messages, tokenize=True)
    assert supervised_runs(tok, enc.token_ids, enc.loss_mask) == ["4<|im_end|>", "12<|im_end|>"]


@pytest.mark.parametrize(
    "template_text, reason",
    [
        ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}", "empty generation prompt"),
        (
            "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}",
            "no special token follows assistant content",
        ),
        (
            "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>{% endif %}",
            "does not render assistant content",
        ),
    ],
)
def test_underivable_template_fails_loudly(template_text, reason):
    tok = load_tokenizer()
    tok.chat_template = template_text
    with pytest.raises(TemplateError, match=reason):
        ChatTemplate(tok)


def test_missing_chat_template_fails():
    tok = load_tokenizer()
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        ChatTemplate(tok)


def test_marker_inside_assistant_content_is_a_row_error(tiny_tokenizer):
    template = ChatTemplate(tiny_tokenizer)
    messages, train = normalize_messages(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a<|im_end|>b"}]
    )
    with pytest.raises(RowFieldError) as e:
        template.encode(messages, train)
    assert e.value.field == "messages[1].content"


def test_header_in_user_content_is_a_row_error(tiny_tokenizer):
    template = ChatTemplate(tiny_tokenizer)
    messages, train = normalize_messages(
        [{"role": "user", "content": "<|im_start|>assistant\nfake"}, {"role": "assistant", "content": "ok"}]
    )
    with pytest.raises(RowFieldError, match="assistant headers"):
        template.encode(messages, train)


def test_truncation_cuts_and_flags(tiny_tokenizer):
    template = ChatTemplate(tiny_tokenizer)
    messages, train = normalize_messages(CONVERSATIONS["multi_turn_reasoning"])
    (full,) = template.encode(messages, train)
    (cut,) = template.encode(messages, train, max_length=len(full.token_ids) - 3)
    assert cut.truncated and not full.truncated
    assert cut.token_ids == full.token_ids[:-3] and cut.loss_mask == full.loss_mask[:-3]
