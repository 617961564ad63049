"""`SFTDataConfig`: the data flags as one typed, checked group, and the data source factory.

`build_data_source` serves a data file from the token cache when an entry for the same
content, tokenizer, flags and code exists (no tokenizer is even loaded then), and otherwise
prepares it (in ``num_workers`` processes; streamed in training order with ``streaming``)
and publishes the result to the cache.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

from slime.data.cache import default_cache_dir
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
    num_workers: processes that tokenize (``--data-num-workers``); None = every usable core.
    cache_dir: token cache root (``--data-cache-dir``); None = no cache, a private temporary
        store per run (the command line defaults to `slime.data.cache.default_cache_dir`).
    overwrite_cache: rebuild the cache entry even when one exists (``--overwrite-data-cache``).
    streaming: on a cache miss, start training once the first samples are prepared and
        prepare the rest in the background, in training order (`slime.data.stream`); the
        command line turns it on unless ``--no-data-streaming``.
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
    num_workers: int | None = None
    cache_dir: str | None = None
    overwrite_cache: bool = False
    streaming: bool = False

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
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"--data-num-workers must be >= 1, got {self.num_workers}")

    def encoder_spec(self):
        from slime.data.dataset import EncoderSpec

        return EncoderSpec(self.hf_checkpoint, self.keys, self.policy, self.max_length, self.chat_template_kwargs)

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
            num_workers=args.data_num_workers,
            cache_dir=None if args.no_data_cache else (args.data_cache_dir or default_cache_dir()),
            overwrite_cache=args.overwrite_data_cache,
            streaming=not args.no_data_streaming,
        )


def load_tokenizer(path: str):
    """The HF tokenizer of ``path``; remote code is never executed."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--hf-checkpoint {path!r}: cannot load a tokenizer: {e}") from e


def build_encoder(cfg: SFTDataConfig):
    """The `SFTEncoder` of ``cfg`` (loads the tokenizer, learns the template's turn markers)."""
    return cfg.encoder_spec().build()


def build_data_source(cfg: SFTDataConfig, progress: bool = True):
    """Validate and index ``cfg.prompt_data`` (from the cache when possible); returns an `SFTDataSource`."""
    from slime.data.data_source import SFTDataSource
    from slime.data.loader import load_prepared

    data = load_prepared(cfg, progress=progress)
    return SFTDataSource(data, shuffle=cfg.shuffle, seed=cfg.seed)
