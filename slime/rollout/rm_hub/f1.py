"""Token-level F1 between a response and a reference answer (SQuAD/HotpotQA style)."""

from __future__ import annotations

import re
import string
from collections import Counter

__all__ = ["f1_score", "normalize_text"]

_PUNCT = str.maketrans("", "", string.punctuation)
_YES_NO = {"yes", "no", "noanswer"}


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower().translate(_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str | None, ground_truth: str) -> tuple[float, float, float]:
    """``(f1, precision, recall)``; a yes/no answer must match exactly."""
    if prediction is None:
        return 0.0, 0.0, 0.0
    pred, gold = normalize_text(prediction), normalize_text(ground_truth)
    if (pred in _YES_NO or gold in _YES_NO) and pred != gold:
        return 0.0, 0.0, 0.0
    pred_tokens, gold_tokens = pred.split(), gold.split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall), precision, recall
