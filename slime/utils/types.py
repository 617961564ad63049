"""`Sample`: the unit a rollout function returns (same fields and meaning as THUDM/slime).

For SFT: ``tokens`` is the whole sequence, ``response_length`` counts the tokens from the
first supervised one to the end, and ``loss_mask`` (length ``response_length``) marks which of
those are supervised. ``prompt`` holds the source messages. Kept free of torch so the data
side imports fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Sample"]


@dataclass
class Sample:
    """One sequence produced by a rollout function."""

    group_index: int | None = None
    index: int | None = None
    # prompt
    prompt: str | list[dict[str, Any]] = ""
    tokens: list[int] = field(default_factory=list)
    multimodal_inputs: dict[str, Any] | None = None
    # response
    response: str = ""
    response_length: int = 0
    label: Any = None
    reward: float | dict[str, Any] | None = None
    loss_mask: list[int] | None = None
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None
    remove_sample: bool = False

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    train_metadata: dict | None = None

    @property
    def effective_response_length(self) -> int:
        """Supervised tokens (what per-token loss normalization counts)."""
        return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    def full_loss_mask(self) -> list[int]:
        """``loss_mask`` padded with zeros over the prompt: aligned with ``tokens``."""
        mask = self.loss_mask if self.loss_mask is not None else [1] * self.response_length
        return [0] * (len(self.tokens) - len(mask)) + list(mask)

    def to_dict(self) -> dict:
        value = self.__dict__.copy()
        value["status"] = self.status.value
        return value

    @staticmethod
    def from_dict(data: dict) -> "Sample":
        data = dict(data)
        data["status"] = Sample.Status(data.get("status", "pending"))
        names = set(Sample.__dataclass_fields__)
        sample = Sample(**{k: v for k, v in data.items() if k in names})
        for k, v in data.items():
            if k not in names:
                setattr(sample, k, v)
        return sample
