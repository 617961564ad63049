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
    # Per-sample plugin overrides (slime sets them from eval dataset configs).
    generate_function_path: str | None = None
    custom_rm_path: str | None = None
    train_metadata: dict | None = None

    @property
    def effective_response_length(self) -> int:
        """Supervised tokens (what per-token loss normalization counts)."""
        return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    def get_reward_value(self, args) -> float:
        """The scalar reward: ``reward`` itself, or ``reward[args.reward_key]`` for dict rewards."""
        return self.reward_for_key(getattr(args, "reward_key", None))

    def reward_for_key(self, key: str | None):
        """``reward`` itself, or ``reward[key]`` for dict rewards (a clear KeyError when absent)."""
        if not key:
            return self.reward
        if not isinstance(self.reward, dict) or key not in self.reward:
            raise KeyError(f"sample {self.index}: --reward-key {key!r} not in its reward {self.reward!r}")
        return self.reward[key]

    def append_response_tokens(
        self,
        args=None,
        *,
        tokens: list[int] | None = None,
        log_probs: list[float] | None = None,
        trainable: bool = True,
        meta_info: dict | None = None,
        text: str | None = None,
        update_terminal_info: bool = True,
    ) -> None:
        """Append response-side tokens keeping ``loss_mask`` and ``rollout_log_probs`` aligned.

        Model tokens (``trainable=True``) get mask 1 and the engine's log-probs; tool or
        environment tokens (``trainable=False``) get mask 0 and log-prob 0.0 placeholders.
        ``meta_info`` is SGLang's: its ``finish_reason`` sets ``status`` and its
        ``weight_version`` is recorded.
        """
        tokens = [int(t) for t in (tokens or [])]
        if log_probs is not None and len(log_probs) != len(tokens):
            raise ValueError(f"sample {self.index}: {len(log_probs)} log-probs for {len(tokens)} tokens")
        if not trainable:
            if log_probs is not None:
                raise ValueError(f"sample {self.index}: non-trainable (tool) tokens take no log-probs")
            log_probs = [0.0] * len(tokens)
        before = self.response_length
        if text is not None:
            self.response += text
        if tokens:
            self.tokens = list(self.tokens) + tokens
            self.response_length += len(tokens)
            mask = list(self.loss_mask) if self.loss_mask is not None else [1] * before
            self.loss_mask = mask + [int(trainable)] * len(tokens)
        if log_probs is not None and tokens:
            if self.rollout_log_probs is None and before and trainable:
                raise ValueError(
                    f"sample {self.index}: has {before} response tokens without log-probs; cannot append log-probs"
                )
            previous = self.rollout_log_probs if self.rollout_log_probs is not None else [0.0] * before
            self.rollout_log_probs = list(previous) + [float(x) for x in log_probs]
        if meta_info:
            if "weight_version" in meta_info:
                self.weight_versions.append(str(meta_info["weight_version"]))
            reason = (meta_info.get("finish_reason") or {}).get("type") if update_terminal_info else None
            if reason is not None:
                statuses = {
                    "stop": Sample.Status.COMPLETED,
                    "length": Sample.Status.TRUNCATED,
                    "abort": Sample.Status.ABORTED,
                }
                if reason not in statuses:
                    raise ValueError(f"sample {self.index}: unknown finish_reason type {reason!r} from the engine")
                self.status = statuses[reason]
        if self.loss_mask is not None and len(self.loss_mask) != self.response_length:
            raise ValueError(
                f"sample {self.index}: loss_mask has {len(self.loss_mask)} entries "
                f"for {self.response_length} response tokens"
            )

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
