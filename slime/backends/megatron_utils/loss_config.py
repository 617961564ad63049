"""Flags of the output layer's loss memory (`lean_ce`), torch-free so the CLI imports fast."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


__all__ = ["CrossEntropyConfig", "DEFAULT_CHUNK_TOKENS", "add_loss_arguments"]

DEFAULT_CHUNK_TOKENS = 256


def add_loss_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("loss memory (output layer)")
    g.add_argument(
        "--cross-entropy-chunk-tokens",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        help="tokens per chunk of the memory-lean vocab-parallel cross-entropy (sft_loss, policy_loss log-probs "
        "and entropy): the full-vocabulary logits of a micro-batch never exist at once. 0 = the plain path "
        "(model returns the logits; custom losses always get logits)",
    )
    g.add_argument(
        "--no-lean-cross-entropy",
        action="store_true",
        help="same as --cross-entropy-chunk-tokens 0",
    )
    return parser


@dataclass(frozen=True)
class CrossEntropyConfig:
    """How the output layer's log-probs are computed.

    chunk_tokens: tokens per chunk of `chunked_log_probs`; 0 turns the lean path off (the model
        returns logits and the losses use megatron's vocab-parallel cross-entropy).
    """

    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self):
        if self.chunk_tokens < 0:
            raise ValueError(f"--cross-entropy-chunk-tokens must be >= 0 (0 = off), got {self.chunk_tokens}")

    @property
    def lean(self) -> bool:
        return self.chunk_tokens > 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CrossEntropyConfig:
        return cls(chunk_tokens=0 if args.no_lean_cross_entropy else args.cross_entropy_chunk_tokens)
