"""Converters from other projects' SFT formats to rows of OpenAI ``messages`` (+ ``tools``).

Each ``*_row`` function maps one input row to one output row (or ``None`` to drop it, only
where the format's own rule says so, e.g. a NeMo Gym reward below the threshold) and raises
`ConversionError` naming the field it cannot read. `convert_file` runs one over a file and
returns a `ConversionStats`; ``tools/convert_sft_data.py`` is the command line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

__all__ = [
    "CONVERTERS",
    "ConversionError",
    "ConversionStats",
    "alpaca_row",
    "content_parts_row",
    "convert_file",
    "iter_rows",
    "nemo_gym_row",
    "sharegpt_row",
]


class ConversionError(ValueError):
    """A row the converter cannot read; ``location`` (file and row) is added by `convert_file`."""

    def __init__(self, field: str, message: str, location: str = ""):
        prefix = f"{location}: " if location else ""
        super().__init__(f"{prefix}field '{field}': {message}")
        self.field, self.message = field, message


def _loads(value: Any, field: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ConversionError(field, f"is not valid JSON ({e.msg})") from None


def _openai_tools(tools: Any, field: str) -> list[dict] | None:
    tools = _loads(tools, field)
    if not tools:
        return None
    if not isinstance(tools, list):
        raise ConversionError(field, "must be a list of tools")
    out = []
    for t in tools:
        if not isinstance(t, dict):
            raise ConversionError(field, "each tool must be an object")
        if t.get("type") == "function" and isinstance(t.get("function"), dict):
            out.append(t)
        else:  # bare function spec, or Responses-API flat {"type": "function", "name": ...}
            spec = {k: v for k, v in t.items() if k in ("name", "description", "parameters")}
            out.append({"type": "function", "function": spec})
    return out


def _tool_call(name: Any, arguments: Any, field: str, call_id: str | None = None) -> dict:
    if not isinstance(name, str) or not name:
        raise ConversionError(field, "tool call without a 'name'")
    arguments = _loads(arguments if arguments is not None else {}, f"{field}.arguments")
    if not isinstance(arguments, dict):
        raise ConversionError(f"{field}.arguments", "must be a JSON object")
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id:
        call["id"] = call_id
    return call


def _output_row(messages: list[dict], row: dict, tools_key: str) -> dict:
    out = {"messages": messages}
    tools = _openai_tools(row.get(tools_key), tools_key) if tools_key in row else None
    if tools:
        out["tools"] = tools
    return out


# --------------------------------------------------------------------------- ShareGPT
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
}


def sharegpt_row(row: dict, conversations_key: str = "conversations", tools_key: str = "tools", system_key: str = "system") -> dict:
    """ShareGPT / OpenHermes-2.5 ``conversations`` (from/value) to ``messages``.

    ``function_call`` turns become assistant ``tool_calls`` (value: one call or a list of
    calls as JSON); ``observation`` turns become ``tool`` messages; a turn ``weight`` of 0
    (OpenHermes) becomes ``loss_weight`` 0; a row-level system prompt is put first.
    """
    convs = row.get(conversations_key)
    if not isinstance(convs, list) or not convs:
        raise ConversionError(conversations_key, "missing or not a non-empty list")
    messages: list[dict] = []
    if isinstance(row.get(system_key), str) and row[system_key]:
        messages.append({"role": "system", "content": row[system_key]})
    for i, turn in enumerate(convs):
        where = f"{conversations_key}[{i}]"
        if not isinstance(turn, dict):
            raise ConversionError(where, "must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise ConversionError(f"{where}.from", f"unknown speaker {turn.get('from')!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ConversionError(f"{where}.value", "must be a string")
        if role == "function_call":
            calls = _loads(value, f"{where}.value")
            calls = calls if isinstance(calls, list) else [calls]
            tool_calls = [
                _tool_call(c.get("name") if isinstance(c, dict) else None, c.get("arguments") if isinstance(c, dict) else None, f"{where}.value")
                for c in calls
            ]
            messages.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
        else:
            msg = {"role": role, "content": value}
            if role == "assistant" and turn.get("weight") in (0, False):
                msg["loss_weight"] = 0
            messages.append(msg)
    return _output_row(messages, row, tools_key)


# --------------------------------------------------------------------------- Alpaca
def alpaca_row(row: dict, query_sep: str = "\n") -> dict:
    """Alpaca ``instruction``/``input``/``output`` (+ optional ``system``, ``history``).

    The user turn is ``instruction`` and ``input`` joined by a newline (when input is not
    empty); ``history`` is a list of ``[query, response]`` pairs placed before it.
    """
    instruction, inp, output = row.get("instruction"), row.get("input", ""), row.get("output")
    if not isinstance(instruction, str):
        raise ConversionError("instruction", "missing or not a string")
    if not isinstance(output, str):
        raise ConversionError("output", "missing or not a string")
    if inp is not None and not isinstance(inp, str):
        raise ConversionError("input", "must be a string")
    messages: list[dict] = []
    if isinstance(row.get("system"), str) and row["system"]:
        messages.append({"role": "system", "content": row["system"]})
    for j, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ConversionError(f"history[{j}]", "must be a [query, response] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = instruction + (query_sep + inp if inp else "")
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": output}]
    return {"messages": messages}


# --------------------------------------------------------------------------- NeMo Gym
def _responses_text(content: Any, field: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                raise ConversionError(f"{field}[{j}]", f"unsupported content part {part!r:.60}")
            texts.append(part.get("text", ""))
        return "".join(texts)
    raise ConversionError(field, "must be a string or a list of text parts")


def _responses_items_to_messages(items: list, field: str) -> list[dict]:
    """Responses-API items to chat messages; reasoning, text and calls of one reply merge."""
    messages: list[dict] = []
    pending: dict | None = None  # the assistant message being assembled

    def assistant() -> dict:
        nonlocal pending
        if pending is None:
            pending = {"role": "assistant", "content": ""}
            messages.append(pending)
        return pending

    for j, item in enumerate(items):
        where = f"{field}[{j}]"
        if not isinstance(item, dict):
            raise ConversionError(where, "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("system", "user", "assistant"):
                raise ConversionError(f"{where}.role", f"unsupported role {item.get('role')!r}")
            text = _responses_text(item.get("content"), f"{where}.content")
            if role == "assistant":
                msg = assistant()
                msg["content"] += text
            else:
                pending = None
                messages.append({"role": role, "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = "\n".join(p.get("text", "") for p in parts if isinstance(p, dict))
            msg = assistant()
            if msg["content"] or msg.get("tool_calls"):  # reasoning after output starts a new reply
                pending = None
                msg = assistant()
            msg["reasoning_content"] = msg["reasoning_content"] + "\n" + text if msg.get("reasoning_content") else text
        elif kind == "function_call":
            msg = assistant()
            call = _tool_call(item.get("name"), item.get("arguments"), where, item.get("call_id"))
            msg.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            pending = None
            output = item.get("output")
            msg = {"role": "tool", "content": output if isinstance(output, str) else json.dumps(output)}
            if item.get("call_id"):
                msg["tool_call_id"] = item["call_id"]
            messages.append(msg)
        else:
            raise ConversionError(f"{where}.type", f"unsupported item type {kind!r}")
    return messages


def nemo_gym_row(row: dict, min_reward: float = 0.8) -> dict | None:
    """A NeMo Gym rollout (``responses_create_params.input`` + ``output`` items + ``reward``).

    Returns ``None`` when ``reward < min_reward``. ``output`` is read from the row or from
    ``response.output``. Tools come from ``responses_create_params.tools``.
    """
    reward = row.get("reward")
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or reward != reward:
        raise ConversionError("reward", "missing or not a number (NaN included)")
    if reward < min_reward:
        return None
    params = row.get("responses_create_params")
    if not isinstance(params, dict):
        raise ConversionError("responses_create_params", "missing or not an object")
    inp = params.get("input")
    if isinstance(inp, str):
        inp = [{"role": "user", "content": inp}]
    if not isinstance(inp, list):
        raise ConversionError("responses_create_params.input", "must be a string or a list of items")
    output = row.get("output")
    if output is None and isinstance(row.get("response"), dict):
        output = row["response"].get("output")
    if not isinstance(output, list):
        raise ConversionError("output", "missing: expected 'output' or 'response.output' as a list of items")
    messages = _responses_items_to_messages(inp, "responses_create_params.input")
    for m in messages:  # the prompt is context: never trained on
        if m["role"] == "assistant":
            m["loss_weight"] = 0
    messages += _responses_items_to_messages(output, "output")
    out = {"messages": messages, "metadata": {"reward": reward}}
    tools = _openai_tools(params.get("tools"), "responses_create_params.tools")
    if tools:
        out["tools"] = tools
    return out


# --------------------------------------------------------------------------- content parts
def content_parts_row(row: dict, messages_key: str = "messages", tools_key: str = "tools") -> dict:
    """Messages whose content is a list of ``{"type": text|reasoning|tool_call, "value"}`` parts.

    Text parts join into ``content``, reasoning parts into ``reasoning_content``, and each
    ``tool_call`` part (``{"name", "arguments"}`` JSON) becomes an entry of ``tool_calls``.
    """
    msgs = row.get(messages_key)
    if not isinstance(msgs, list):
        raise ConversionError(messages_key, "missing or not a list")
    messages = []
    for i, m in enumerate(msgs):
        where = f"{messages_key}[{i}]"
        if not isinstance(m, dict):
            raise ConversionError(where, "must be an object")
        out = {"role": m.get("role")}
        content = m.get("content")
        if isinstance(content, str) or content is None:
            out["content"] = content or ""
        elif isinstance(content, list):
            texts, reasoning, calls = [], [], []
            for j, part in enumerate(content):
                pf = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                value = part.get("value", part.get("text")) if isinstance(part, dict) else None
                if not isinstance(value, str):
                    raise ConversionError(pf, "part without a string 'value'")
                if kind == "text":
                    texts.append(value)
                elif kind == "reasoning":
                    reasoning.append(value)
                elif kind == "tool_call":
                    call = _loads(value, pf)
                    if not isinstance(call, dict):
                        raise ConversionError(pf, "tool_call value must be a JSON object")
                    calls.append(_tool_call(call.get("name"), call.get("arguments"), pf))
                else:
                    raise ConversionError(f"{pf}.type", f"unsupported part type {kind!r}")
            out["content"] = "".join(texts)
            if reasoning:
                out["reasoning_content"] = "\n".join(reasoning)
            if calls:
                out["tool_calls"] = calls
        else:
            raise ConversionError(f"{where}.content", "must be a string or a list of parts")
        messages.append(out)
    return _output_row(messages, row, tools_key)


CONVERTERS: dict[str, Callable[..., dict | None]] = {
    "sharegpt": sharegpt_row,
    "alpaca": alpaca_row,
    "nemo-gym": nemo_gym_row,
    "content-parts": content_parts_row,
}


# --------------------------------------------------------------------------- files
@dataclass
class ConversionStats:
    read: int = 0
    kept: int = 0
    filtered: int = 0  # dropped by the format's rule (e.g. reward below threshold)
    invalid: int = 0  # could not be converted (with skip_invalid)

    def line(self) -> str:
        return f"kept {self.kept} of {self.read} ({self.filtered} filtered, {self.invalid} invalid)"


def iter_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(location, row) for each row of a .json list, .jsonl or .parquet file, streaming."""
    from slime.data.readers import open_rows

    rows = open_rows(path)
    for i in range(len(rows)):
        yield rows.where(i), rows[i]


def convert_file(
    path: str, fmt: str, skip_invalid: bool = False, **kwargs: Any
) -> tuple[list[dict], ConversionStats]:
    """Convert every row of ``path``; stops at the first bad row unless ``skip_invalid``."""
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(CONVERTERS)}")
    fn = CONVERTERS[fmt]
    stats, out = ConversionStats(), []
    for where, row in iter_rows(path):
        stats.read += 1
        try:
            if not isinstance(row, dict):
                raise ConversionError("<row>", "must be a JSON object")
            converted = fn(row, **kwargs)
        except ConversionError as e:
            if not skip_invalid:
                raise ConversionError(e.field, e.message, f"{path}: {where}") from None
            stats.invalid += 1
            continue
        if converted is None:
            stats.filtered += 1
        else:
            stats.kept += 1
            out.append(converted)
    return out, stats


def write_jsonl(rows: Iterable[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
