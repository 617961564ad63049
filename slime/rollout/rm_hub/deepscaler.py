"""DeepScaleR-style rule reward for reasoning models: 1 if the boxed final answer is right, else 0.

Only the text after the reasoning counts: the part after the last ``</think>`` (or after
``###Response`` for the older prompt format). A response with neither never finished
thinking and scores 0, as does one without a boxed answer.
"""

from __future__ import annotations

from slime.rollout.rm_hub.math_utils import is_equiv, last_boxed

__all__ = ["get_deepscaler_rule_based_reward"]


def _references(label) -> list[str]:
    labels = label if isinstance(label, (list, tuple)) else [label]
    out = []
    for ref in labels:
        if ref is None or str(ref).strip() == "":
            continue
        ref = str(ref)
        # A label written as a full solution ("... \boxed{7}") is graded on its boxed part.
        out.append(last_boxed(ref) if "\\boxed" in ref and last_boxed(ref) is not None else ref)
    return out


def get_deepscaler_rule_based_reward(response: str, label) -> int:
    if "</think>" in response:
        solution = response.rsplit("</think>", 1)[1]
    elif "###Response" in response:
        solution = response.split("###Response", 1)[1]
    else:
        return 0
    answer = last_boxed(solution)
    if answer is None:
        return 0
    return int(any(is_equiv(answer, ref) for ref in _references(label)))


def boxed_math_reward(response: str, label) -> int:
    """Plain math grading (``--rm-type math``): the last boxed answer anywhere in the response."""
    answer = last_boxed(response)
    if answer is None:
        return 0
    return int(any(is_equiv(answer, ref) for ref in _references(label)))
