"""Token ids and loss masks derived from a tokenizer's own chat template.

No code here knows any model family. From three probe renders of the template we learn
three strings (`TurnMarkers`):

* ``header``: what opens an assistant turn (``<|im_start|>assistant\\n`` for Qwen); it is
  context, never supervised;
* ``prompt_rest``: what the generation prompt adds after that header at inference time
  (empty for Qwen3's default, ``<think>\\n\\n</think>\\n\\n`` with ``enable_thinking=False``);
  when a turn starts with it, it was part of the prompt, so it is skipped;
* ``end``: the end-of-turn text the model must learn to emit (``<|im_end|>``): the
  rendered text after the assistant content up to and including its last special token.

A conversation is then rendered ONCE, the i-th assistant turn is found by scanning for the
i-th header and the first end marker after it, and the text is tokenized once with offsets,
so the cost is one ``apply_chat_template(tokenize=True)`` plus a scan: linear in turns, no
prefix re-rendering. The scan is checked (header count equals assistant count, no marker
inside assistant text), and any template where the markers cannot be learned raises
`TemplateError` with the reason instead of producing a wrong mask.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "POLICIES",
    "ChatTemplate",
    "Encoded",
    "RowFieldError",
    "TemplateError",
    "TurnMarkers",
]

#: Multi-turn policies (``--multi-turn-policy``), see docs/sft_data.md for rendered examples.
POLICIES = ("full", "keep-reasoning", "per-turn")

_PROBE_USER = {"role": "user", "content": "Probe question 7f3a?"}
_PROBE_USER2 = {"role": "user", "content": "Probe follow-up 2b8d?"}
_PROBE_ANSWER = "Probe answer 9c1e."


class TemplateError(ValueError):
    """The chat template does not let us derive exact assistant spans."""


class RowFieldError(ValueError):
    """A problem with one field of one row; the caller adds file and row."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class TurnMarkers:
    """Strings that delimit generated assistant text in this template's renders."""

    header: str
    prompt_rest: str
    end: str

    def __post_init__(self):
        if not self.header:
            raise TemplateError("the template renders no assistant header; assistant turns cannot be located")
        if not self.end:
            raise TemplateError("the template renders no end-of-turn marker after assistant content")


@dataclass
class Encoded:
    """One training sequence: aligned ``token_ids`` / ``loss_mask`` (1 = supervised)."""

    token_ids: list[int]
    loss_mask: list[int]
    turn: int | None = None  # index of the supervised message (per-turn policy), else None
    truncated: bool = False
    boundary_straddles: int = 0  # tokens that cross a span edge (merged by the tokenizer)
    text: str = field(default="", repr=False)

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)


def _common_prefix(*texts: str) -> str:
    return os.path.commonprefix(list(texts))


class ChatTemplate:
    """Renders conversations with a HF tokenizer's chat template and derives loss masks.

    ``messages`` given to the encode methods are normalized (see `slime.data.schema`):
    string contents, optional ``reasoning_content`` and ``tool_calls``. ``train`` says, per
    message, whether an assistant turn is supervised (``loss_weight`` 0 turns it off).
    """

    def __init__(self, tokenizer: Any, template_kwargs: dict | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise TemplateError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
        if not getattr(tokenizer, "is_fast", False):
            # Offsets are what map template spans to tokens; slow tokenizers have none.
            raise TemplateError(f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer (no offset mapping)")
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        self._special_ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._special_ids.update(tokenizer.all_special_ids)
        self.markers = self._learn_markers()
        self._probe_prefix = self.render([_PROBE_USER])

    # ------------------------------------------------------------------ rendering
    def render(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )

    def _render_row(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
        """`render` for data rows: a template failure is a problem of this row (skippable)."""
        if not messages:
            raise RowFieldError("messages", "an assistant turn needs at least one message before it")
        try:
            return self.render(messages, tools, add_generation_prompt)
        except Exception as e:  # jinja's TemplateError / raise_exception, IndexError, ...
            raise RowFieldError("messages", f"the chat template failed on this row: {type(e).__name__}: {e}") from None

    def _learn_markers(self) -> TurnMarkers:
        answer = {"role": "assistant", "content": _PROBE_ANSWER}
        try:
            ctx = self.render([_PROBE_USER])
            with_prompt = self.render([_PROBE_USER], add_generation_prompt=True)
            last = self.render([_PROBE_USER, answer])
            hist = self.render([_PROBE_USER, answer, _PROBE_USER2])
        except Exception as e:  # jinja raises its own types
            raise TemplateError(f"the chat template fails on a plain user/assistant probe: {e}") from e
        for name, text in (("generation prompt", with_prompt), ("assistant turn", last), ("history", hist)):
            if not text.startswith(ctx):
                raise TemplateError(f"the {name} render does not extend the user-only render; turns are not appendable")
        gen_prompt = with_prompt[len(ctx) :]
        last, hist = last[len(ctx) :], hist[len(ctx) :]
        if not gen_prompt:
            raise TemplateError("the template has an empty generation prompt; assistant turns cannot be located")
        header = _common_prefix(gen_prompt, last, hist)
        at = last.find(_PROBE_ANSWER)
        if at < 0:
            raise TemplateError("the template does not render assistant content verbatim")
        end = self._end_of_turn(last[at + len(_PROBE_ANSWER) :])
        hist_at = hist.find(_PROBE_ANSWER)
        if hist_at < 0 or not hist[hist_at + len(_PROBE_ANSWER) :].startswith(end):
            raise TemplateError(f"assistant turns in history do not end with {end!r} like the last turn does")
        markers = TurnMarkers(header=header, prompt_rest=gen_prompt[len(header) :], end=end)
        self._check_tool_call_turns(ctx, last[last.find(end, at) + len(end) :], markers)
        return markers

    def _check_tool_call_turns(self, ctx: str, glue: str, m: TurnMarkers) -> None:
        """A turn that calls a tool must end like a plain one (some templates use another token)."""
        call = {"type": "function", "function": {"name": "probe_fn", "arguments": {"x": 1}}}
        answer = {"role": "assistant", "content": "", "tool_calls": [call]}
        try:
            text = self.render([_PROBE_USER, answer])
        except Exception:
            return  # the template does not take tool calls; rows with them will fail as row errors
        if "probe_fn" not in text:
            return
        if not text.startswith(ctx + m.header) or not text.endswith(m.end + glue):
            raise TemplateError(
                f"assistant turns with tool calls do not end with {m.end!r} like plain turns; "
                "their generated span cannot be derived from this template"
            )

    def _end_of_turn(self, tail: str) -> str:
        """The generated part of what follows assistant content: up to its last special token."""
        enc = self.tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)
        stop = None
        for tid, (_, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            if tid in self._special_ids:
                stop = e
        if stop is None:
            eos = self.tokenizer.eos_token
            if eos and eos in tail:
                stop = tail.index(eos) + len(eos)
            else:
                raise TemplateError(
                    f"no special token follows assistant content (tail {tail!r}); the end of a turn is undefined"
                )
        return tail[:stop]

    # ------------------------------------------------------------------ spans
    def _check_assistant_text(self, messages: list[dict]) -> None:
        """No generated text may contain a turn marker: the span would end inside it."""
        m = self.markers
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            fields = [("content", msg.get("content")), ("reasoning_content", msg.get("reasoning_content"))]
            for j, call in enumerate(msg.get("tool_calls") or []):
                fn = call.get("function", {})
                args = fn.get("arguments")
                fields.append((f"tool_calls[{j}].function.name", fn.get("name")))
                fields.append((f"tool_calls[{j}].function.arguments", args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
            for key, text in fields:
                if isinstance(text, str) and (m.end in text or m.header in text):
                    raise RowFieldError(
                        f"messages[{i}].{key}",
                        f"contains the template's turn marker ({m.end!r} or {m.header!r}); the turn boundary is ambiguous",
                    )

    def assistant_spans(self, text: str, messages: list[dict]) -> list[tuple[int, int, int]]:
        """(message index, start, end) character spans of each assistant turn's generated text."""
        m = self.markers
        n_assistant = sum(1 for msg in messages if msg["role"] == "assistant")
        found = text.count(m.header)
        if found != n_assistant:
            raise RowFieldError(
                "messages",
                f"the rendered conversation has {found} assistant headers {m.header!r} but {n_assistant} assistant "
                "messages (a message contains the header text, or the template drops/merges assistant turns)",
            )
        spans, pos = [], 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            start = text.find(m.header, pos)
            if start < 0:
                raise RowFieldError(f"messages[{i}]", "the template did not render this assistant turn where expected")
            start += len(m.header)
            if m.prompt_rest and text.startswith(m.prompt_rest, start):
                start += len(m.prompt_rest)
            end = text.find(m.end, start)
            if end < 0:
                raise RowFieldError(f"messages[{i}]", f"the rendered assistant turn has no end marker {m.end!r}")
            end += len(m.end)
            if m.header in text[start:end]:
                # The turn ended with something other than the learned end marker, so the
                # span ran into the next turn: refuse rather than supervise context.
                raise RowFieldError(
                    f"messages[{i}]", f"this assistant turn does not end with {m.end!r} in the rendered text"
                )
            spans.append((i, start, end))
            pos = end
        return spans

    # ------------------------------------------------------------------ tokenizing
    def _tokenize(self, text: str, spans: list[tuple[int, int]], turn: int | None, max_length: int | None) -> Encoded:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        offsets = enc["offset_mapping"]
        starts = [o[0] for o in offsets]
        mask = [0] * len(ids)
        straddles = 0
        for s, e in spans:
            i0, i1 = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
            mask[i0:i1] = [1] * (i1 - i0)
            # A token that begins before a span and reaches into it (or leaves it) was merged by
            # the tokenizer across the boundary; it is counted, the mask follows its first char.
            straddles += (i0 > 0 and offsets[i0 - 1][1] > s) + (i1 > 0 and offsets[i1 - 1][1] > e)
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, mask = ids[:max_length], mask[:max_length]
        return Encoded(ids, mask, turn=turn, truncated=truncated, boundary_straddles=straddles, text=text)

    # ------------------------------------------------------------------ policies
    def encode(
        self,
        messages: list[dict],
        train: list[bool],
        tools: list | None = None,
        policy: str = "full",
        max_length: int | None = None,
    ) -> list[Encoded]:
        """Encode one conversation under ``policy``; per-turn gives one `Encoded` per trained turn."""
        if policy not in POLICIES:
            raise ValueError(f"unknown multi-turn policy {policy!r}; choose from {POLICIES}")
        self._check_assistant_text(messages)
        if policy == "per-turn":
            return [self.encode_turn(messages, i, tools, max_length) for i in range(len(messages)) if train[i]]
        text = self._render_row(messages, tools)
        spans = self.assistant_spans(text, messages)
        if policy == "keep-reasoning":
            text, spans = self._splice_as_last(text, spans, messages)
        kept = [(s, e) for i, s, e in spans if train[i]]
        return [self._tokenize(text, kept, None, max_length)]

    def encode_turn(self, messages: list[dict], i: int, tools: list | None, max_length: int | None) -> Encoded:
        head = messages[: i + 1]
        context = self._render_row(messages[:i], tools, add_generation_prompt=True)
        text = self._render_row(head, tools)
        _, start, end = self.assistant_spans(text, head)[-1]
        if text[:start] != context:
            raise RowFieldError(
                f"messages[{i}]",
                "per-turn policy: the inference prompt of this turn is not a prefix of the rendered turn "
                "(e.g. consecutive assistant messages, or reasoning with enable_thinking off), so its exact "
                "inference-time context cannot be reproduced",
            )
        return self._tokenize(text, [(start, end)], i, max_length)

    def render_as_last(self, messages: list[dict]) -> list[str]:
        """Each assistant message's generated text as the template renders a final turn.

        One batched template call for all turns of a conversation (per-call overhead
        dominates these small renders).
        """
        if not messages:
            return []
        try:
            texts = self.tokenizer.apply_chat_template(
                [[_PROBE_USER, m] for m in messages], tokenize=False, **self.template_kwargs
            )
        except Exception as e:
            raise RowFieldError("messages", f"the chat template failed on this row: {type(e).__name__}: {e}") from None
        out = []
        for message, text in zip(messages, texts):
            if not text.startswith(self._probe_prefix):
                raise TemplateError("the template renders the probe user turn differently when followed by an answer")
            ((_, start, end),) = self.assistant_spans(text, [_PROBE_USER, message])
            out.append(text[start:end])
        return out

    def _splice_as_last(self, text: str, spans: list[tuple[int, int, int]], messages: list[dict]):
        """Replace every assistant span by its as-if-last rendering (reasoning kept)."""
        pieces, new_spans, pos, out_len = [], [], 0, 0
        as_last = self.render_as_last([messages[i] for i, _, _ in spans])
        for (i, s, e), generated in zip(spans, as_last):
            pieces.append(text[pos:s])
            out_len += s - pos
            pieces.append(generated)
            new_spans.append((i, out_len, out_len + len(generated)))
            out_len += len(generated)
            pos = e
        pieces.append(text[pos:])
        return "".join(pieces), new_spans
