"""Validate one data row and normalize it into what chat templates expect.

The accepted input is OpenAI chat ``messages``: roles ``system/user/assistant/tool``;
``content`` a string, ``null`` or a list of text parts (``{"type": "text", "text": ...}``;
``"value"`` is accepted for ``"text"``, and ``reasoning``/``thinking`` parts of an assistant
message become its ``reasoning_content``); assistant ``reasoning_content`` (or ``reasoning``)
and ``tool_calls`` (``{"type": "function", "function": {"name", "arguments"}}`` with
arguments a JSON object or its string); per-message ``loss_weight`` / ``step_loss_mask`` /
``weight`` of 0 or 1. Every problem raises `RowFieldError` naming the field; the caller adds
the file and row. Nothing is guessed: other shapes have converters in `slime.data.converters`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from slime.data.chat_template import RowFieldError

ROLES = ("system", "user", "assistant", "tool")
WEIGHT_KEYS = ("loss_weight", "step_loss_mask", "weight")
_TEXT_PARTS = ("text", "input_text", "output_text")
_REASONING_PARTS = ("reasoning", "thinking")


@dataclass(frozen=True)
class DataKeys:
    """Which columns of a row hold what (slime's ``--input-key`` and friends)."""

    input_key: str = "messages"
    tool_key: str | None = "tools"
    metadata_key: str | None = "metadata"
    label_key: str | None = None

    def __post_init__(self):
        if not self.input_key:
            raise ValueError("input_key must be a non-empty column name")


@dataclass
class Conversation:
    """A validated row: template-ready messages, which turns train, tools, label, metadata."""

    messages: list[dict]
    train: list[bool]
    tools: list[dict] | None = None
    label: Any = None
    metadata: dict = field(default_factory=dict)


def _json_value(value: Any, field_name: str, want: type) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowFieldError(field_name, f"is a string but not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(value, want):
        raise RowFieldError(field_name, f"must be a {want.__name__} (or its JSON string), got {type(value).__name__}")
    return value


def _content(msg: dict, where: str) -> tuple[str, list[str]]:
    """(text, reasoning parts) of a message's content."""
    content = msg.get("content")
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RowFieldError(f"{where}.content", f"must be a string or a list of parts, got {type(content).__name__}")
    texts, reasoning = [], []
    for j, part in enumerate(content):
        pf = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise RowFieldError(pf, f"must be an object with 'type', got {type(part).__name__}")
        kind = part.get("type")
        value = part.get("text", part.get("value"))
        if kind in _TEXT_PARTS or kind in _REASONING_PARTS:
            if not isinstance(value, str):
                raise RowFieldError(pf, f"part of type {kind!r} needs a string 'text'")
            (reasoning if kind in _REASONING_PARTS else texts).append(value)
        else:
            raise RowFieldError(
                pf,
                f"unsupported content part type {kind!r} (text and reasoning only; for tool_call parts use "
                "tools/convert_sft_data.py --format content-parts)",
            )
    if reasoning and msg.get("role") != "assistant":
        raise RowFieldError(f"{where}.content", "reasoning parts are only allowed in assistant messages")
    return "".join(texts), reasoning


def _tool_calls(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowFieldError(where, f"must be a list, got {type(value).__name__}")
    calls = []
    for j, call in enumerate(value):
        cf = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise RowFieldError(cf, "must be an object")
        if call.get("type", "function") != "function":
            raise RowFieldError(f"{cf}.type", f"only function tool calls are supported, got {call.get('type')!r}")
        fn = call.get("function", call)
        if not isinstance(fn, dict):
            raise RowFieldError(f"{cf}.function", "must be an object with 'name' and 'arguments'")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise RowFieldError(f"{cf}.function.name", "must be a non-empty string")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError as e:
                raise RowFieldError(f"{cf}.function.arguments", f"is not valid JSON ({e.msg})") from None
            if not isinstance(parsed, dict):
                raise RowFieldError(f"{cf}.function.arguments", "must encode a JSON object")
        elif not isinstance(args, dict):
            raise RowFieldError(f"{cf}.function.arguments", f"must be an object or JSON string, got {type(args).__name__}")
        out = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return calls


def _weight(msg: dict, where: str) -> bool:
    for key in WEIGHT_KEYS:
        if key in msg and msg[key] is not None:
            w = msg[key]
            if w not in (0, 1) or isinstance(w, str):
                raise RowFieldError(f"{where}.{key}", f"must be 0 or 1, got {w!r}")
            return bool(w)
    return True


def normalize_messages(raw: Any, field_name: str = "messages") -> tuple[list[dict], list[bool]]:
    """Validated, template-ready messages and the per-message train flags."""
    raw = _json_value(raw, field_name, list)
    if not raw:
        raise RowFieldError(field_name, "is empty")
    messages, train = [], []
    for i, msg in enumerate(raw):
        where = f"{field_name}[{i}]"
        if not isinstance(msg, dict):
            raise RowFieldError(where, f"must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise RowFieldError(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        text, reasoning_parts = _content(msg, where)
        out: dict[str, Any] = {"role": role, "content": text}
        if role == "assistant":
            given = {k: msg[k] for k in ("reasoning_content", "reasoning") if msg.get(k) is not None}
            if len(given) == 2 and given["reasoning_content"] != given["reasoning"]:
                raise RowFieldError(where, "has both reasoning_content and reasoning, with different text")
            reasoning = next(iter(given.values()), None)
            if reasoning is not None and not isinstance(reasoning, str):
                raise RowFieldError(f"{where}.{next(iter(given))}", "must be a string")
            if reasoning_parts:
                if reasoning:
                    raise RowFieldError(where, "has both reasoning parts and reasoning_content")
                reasoning = "\n".join(reasoning_parts)
            if reasoning:
                out["reasoning_content"] = reasoning
            if msg.get("tool_calls"):
                out["tool_calls"] = _tool_calls(msg["tool_calls"], f"{where}.tool_calls")
        elif msg.get("tool_calls"):
            raise RowFieldError(f"{where}.tool_calls", f"only assistant messages may call tools, not {role!r}")
        if role == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(msg.get(key), str):
                    out[key] = msg[key]
        weight = _weight(msg, where)
        if not weight and role != "assistant":
            raise RowFieldError(where, f"a loss weight only applies to assistant messages, not {role!r}")
        messages.append(out)
        train.append(role == "assistant" and weight)
    if not any(train):
        raise RowFieldError(field_name, "has no assistant turn to supervise")
    return messages, train


def normalize_tools(raw: Any, field_name: str) -> list[dict] | None:
    if raw is None:
        return None
    tools = _json_value(raw, field_name, list)
    out = []
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise RowFieldError(f"{field_name}[{j}]", "must be an object")
        if tool.get("type", "function") != "function":
            raise RowFieldError(f"{field_name}[{j}].type", f"only function tools are supported, got {tool.get('type')!r}")
        if isinstance(tool.get("function"), dict):
            spec = tool["function"]
        else:
            # Bare specs (glaive, older dumps) and Responses-API flat tools {"type", "name", ...}
            # become the OpenAI chat shape that templates expect.
            spec = {k: v for k, v in tool.items() if k != "type"}
            tool = {"type": "function", "function": spec}
        if not isinstance(spec.get("name"), str):
            raise RowFieldError(f"{field_name}[{j}]", "must be a function tool with a string 'name'")
        out.append(tool)
    return out or None


def parse_row(row: dict, keys: DataKeys) -> Conversation:
    """Validate and normalize one row; raises `RowFieldError`."""
    if not isinstance(row, dict):
        raise RowFieldError("<row>", f"must be a JSON object, got {type(row).__name__}")
    if keys.input_key not in row or row[keys.input_key] is None:
        present = ", ".join(sorted(row)) or "none"
        raise RowFieldError(keys.input_key, f"is missing (columns present: {present}); see --input-key")
    messages, train = normalize_messages(row[keys.input_key], keys.input_key)
    tools = normalize_tools(row.get(keys.tool_key), keys.tool_key) if keys.tool_key else None
    metadata = {}
    if keys.metadata_key and row.get(keys.metadata_key) is not None:
        metadata = dict(_json_value(row[keys.metadata_key], keys.metadata_key, dict))
    label = row.get(keys.label_key) if keys.label_key else None
    return Conversation(messages, train, tools, label, metadata)
