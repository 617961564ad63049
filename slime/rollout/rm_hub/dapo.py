"""DAPO math reward: +1 / -1 on the final ``Answer: ...`` line (DAPO-Math-17k's format).

The reward is a dict, so train with ``--reward-key score``: ``{"score": 1.0 | -1.0,
"acc": bool, "pred": the normalized prediction}``. Only the last 300 characters are read
(final answers are short; this bounds the regex work on long reasoning traces). With
``strict_box_verify`` the last ``\\boxed{}`` of the final 100 characters must equal the label
exactly.
"""

from __future__ import annotations

import re

from slime.rollout.rm_hub.math_utils import last_boxed

__all__ = ["compute_score", "normalize_final_answer"]

_ANSWER_LINE = re.compile(r"(?i)answer\s*:\s*([^\n]+)")

# Unit words and markup that decorate an otherwise numeric final answer.
_UNIT_WORDS = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "pounds",
    "meters",
    "students",
    "edges",
)
_MARKUP = ("\\ldots", "\\dots", "\\;", ",\\!", "{,}", '"', "<|im_end|>", "<|endoftext|>", "\\%", "^\\circ", "^{\\circ}")


def normalize_final_answer(answer: str) -> str:
    s = str(answer).split("=")[-1].strip()
    for piece in _MARKUP:
        s = s.replace(piece, "")
    s = s.replace("\\$", "").replace("$", "")
    # \text{...}, \textbf{...}, \boxed{...}: keep the inside (one level is what answers use).
    s = re.sub(r"\\(?:text|textbf|mathrm|boxed|overline)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\b(?:an?|the)\s+", "", s)
    for word in _UNIT_WORDS:
        s = re.sub(rf"\s*\b{word}\b", "", s)
    s = s.replace(" ", "").rstrip(".")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def _label_value(label) -> str:
    gt = normalize_final_answer(label)
    # DAPO's labels are integers; "34.0" and "34" must agree.
    try:
        as_float = float(gt)
    except ValueError:
        return gt
    return str(int(as_float)) if as_float.is_integer() else gt


def compute_score(solution_str: str, ground_truth, strict_box_verify: bool = False) -> dict:
    tail = solution_str[-300:]
    if strict_box_verify:
        pred = last_boxed(tail[-100:])
        correct = pred is not None and pred.strip() == str(ground_truth).strip()
    else:
        matches = _ANSWER_LINE.findall(tail)
        pred = normalize_final_answer(matches[-1]) if matches else "[INVALID]"
        correct = pred == _label_value(ground_truth)
    return {"score": 1.0 if correct else -1.0, "acc": bool(correct), "pred": pred}
