"""A multi-turn tool loop: ``--custom-generate-function-path slime.rollout.examples.calculator_tool.generate``.

The model may call a calculator by writing ``<calc>EXPRESSION</calc>``. Generation stops at
``</calc>`` (a stop string), the expression is evaluated, and ``<result>VALUE</result>`` is
appended as tool output; then the model continues, until it stops without a call, runs out
of ``max_new_tokens`` (counted over the whole response, tool tokens included) or makes
`MAX_TOOL_CALLS` calls. The sample's response is everything after the prompt: model tokens
with loss mask 1 and their engine log-probs, tool tokens with loss mask 0 (the policy did
not choose them, so they must not be trained on). Reward it like any sample, e.g.
``--rm-type math`` on a final ``\\boxed{}`` answer.

This is the pattern for any agent loop: call `engine_generate` with the token ids so far,
append the model's tokens with ``trainable=True`` and the environment's with
``trainable=False`` (`Sample.append_response_tokens` keeps mask and log-probs aligned).
"""

from __future__ import annotations

import ast
import operator
import re

from slime.rollout.sglang_rollout import engine_generate
from slime.utils.types import Sample

__all__ = ["MAX_TOOL_CALLS", "evaluate_expression", "generate"]

MAX_TOOL_CALLS = 4
CALL_OPEN, CALL_CLOSE = "<calc>", "</calc>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval(node: ast.AST) -> float | int:
    # Only arithmetic on literals: the text comes from a model, so nothing else is evaluated.
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def evaluate_expression(expression: str) -> str:
    """The calculator: ``"12*(3+4)"`` -> ``"84"``; errors come back as text the model can read."""
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    if len(text) > 200:
        return "error: expression too long"
    try:
        value = _eval(ast.parse(text, mode="eval"))
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, TypeError, OverflowError) as e:
        return f"error: {e}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


def _tokenizer(args):
    from slime.rollout.prompt_dataset import load_tokenizer

    return load_tokenizer(args.hf_checkpoint)


async def generate(args, sample: Sample, sampling_params: dict, evaluation: bool = False) -> Sample:
    tokenizer = _tokenizer(args)
    if not sample.tokens:
        sample.tokens = tokenizer.encode(sample.prompt, add_special_tokens=False)
    budget = int(sampling_params["max_new_tokens"])
    params = dict(sampling_params)
    params["stop"] = list(params.get("stop") or []) + [CALL_CLOSE]
    params["no_stop_trim"] = True  # keep "</calc>" in the model's tokens: it generated them
    calls = sample.metadata.get("tool_calls", 0)
    while True:
        left = budget - sample.response_length
        if left <= 0:
            sample.status = Sample.Status.TRUNCATED
            return sample
        out = await engine_generate(
            args,
            {
                "input_ids": list(sample.tokens),
                "sampling_params": {**params, "max_new_tokens": left},
                "return_logprob": True,
            },
        )
        entries = out["meta_info"]["output_token_logprobs"]
        turn = out.get("text", "")
        sample.append_response_tokens(
            args,
            tokens=[e[1] for e in entries],
            log_probs=[e[0] for e in entries],
            meta_info=out["meta_info"],
            text=turn,
        )
        call = _CALL.search(turn)
        if sample.status != Sample.Status.COMPLETED or call is None or not turn.rstrip().endswith(CALL_CLOSE):
            return sample
        if calls >= MAX_TOOL_CALLS:
            return sample
        calls += 1
        sample.metadata["tool_calls"] = calls
        result = f"<result>{evaluate_expression(call.group(1))}</result>"
        result_ids = tokenizer.encode(result, add_special_tokens=False)
        # Never exceed the budget with tool text: cut it and stop as truncated.
        room = budget - sample.response_length
        kept = result_ids[:room]
        text = result if len(kept) == len(result_ids) else tokenizer.decode(kept)
        sample.append_response_tokens(args, tokens=kept, trainable=False, text=text)
        if len(result_ids) >= room:
            sample.status = Sample.Status.TRUNCATED
            return sample
