"""`SFTDataConfig`: the data flags as one typed, checked group, and the data source factory."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

from slime.data.chat_template import POLICIES
from slime.data.schema import DataKeys

logger = logging.getLogger(__name__)

__all__ = ["SFTDataConfig", "build_data_source", "load_tokenizer"]


@dataclass(frozen=True)
class SFTDataConfig:
    """Everything the SFT data path needs, taken once from the parsed command line.

    prompt_data: file or directory with the rows (``--prompt-data``).
    hf_checkpoint: directory whose tokenizer (and chat template) renders the rows.
    keys: column names (``--input-key --tool-key --metadata-key --label-key``).
    policy: multi-turn policy (``--multi-turn-policy``), one of `POLICIES`.
    max_length: tokens per sample; longer samples are cut (``--rollout-max-context-len``).
    skip_invalid: skip and count bad rows instead of failing (``--skip-invalid-samples``).
    shuffle / seed: ``--rollout-shuffle`` / ``--rollout-seed``; the order is reshuffled per epoch.
    chat_template_kwargs: extra template variables (``--apply-chat-template-kwargs``).
    """

    prompt_data: str
    hf_checkpoint: str
    keys: DataKeys = field(default_factory=DataKeys)
    policy: str = "full"
    max_length: int | None = None
    skip_invalid: bool = False
    shuffle: bool = False
    seed: int = 42
    chat_template_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.prompt_data:
            raise ValueError("--prompt-data is required")
        if not self.hf_checkpoint:
            raise ValueError("--hf-checkpoint is required (a directory holding at least the tokenizer files)")
        if self.policy not in POLICIES:
            raise ValueError(f"--multi-turn-policy must be one of {POLICIES}, got {self.policy!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--rollout-max-context-len must be >= 2, got {self.max_length}")
        reserved = {"tools", "add_generation_prompt", "tokenize", "conversation", "messages", "continue_final_message"}
        clash = sorted(reserved & set(self.chat_template_kwargs))
        if clash:
            raise ValueError(f"--apply-chat-template-kwargs may not set {clash}: slime passes those itself")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SFTDataConfig":
        return cls(
            prompt_data=args.prompt_data,
            hf_checkpoint=args.hf_checkpoint,
            keys=DataKeys(args.input_key, args.tool_key, args.metadata_key, args.label_key),
            policy=args.multi_turn_policy,
            max_length=args.rollout_max_context_len,
            skip_invalid=args.skip_invalid_samples,
            shuffle=args.rollout_shuffle,
            seed=args.rollout_seed,
            chat_template_kwargs=dict(args.apply_chat_template_kwargs or {}),
        )


def load_tokenizer(path: str):
    """The HF tokenizer of ``path``; remote code is never executed."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--hf-checkpoint {path!r}: cannot load a tokenizer: {e}") from e


def build_data_source(cfg: SFTDataConfig, progress: bool = True):
    """Open, validate and index ``cfg.prompt_data``; returns an `SFTDataSource`."""
    from slime.data.chat_template import ChatTemplate
    from slime.data.data_source import SFTDataSource
    from slime.data.dataset import SFTEncoder, prepare
    from slime.data.readers import open_rows

    template = ChatTemplate(load_tokenizer(cfg.hf_checkpoint), cfg.chat_template_kwargs)
    encoder = SFTEncoder(template, cfg.keys, cfg.policy, cfg.max_length)
    data = prepare(open_rows(cfg.prompt_data), encoder, skip_invalid=cfg.skip_invalid, progress=progress)
    return SFTDataSource(data, shuffle=cfg.shuffle, seed=cfg.seed)
