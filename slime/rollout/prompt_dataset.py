"""RL prompt data: rows of ``--prompt-data`` turned into prompt `Sample`s, with their flags.

A row gives a prompt (``--prompt-key``, else ``--input-key``), optionally a label
(``--label-key``), metadata (``--metadata-key``: an object or its JSON string, parsed into
``Sample.metadata``) and tools (``--tool-key``). With ``--apply-chat-template`` the prompt is
a message list (a bare string becomes one user message) rendered by the HF tokenizer's
template with ``add_generation_prompt=True``; without it the prompt must be a string and is
used as written. Every prompt is tokenized once here: ``Sample.tokens`` holds the prompt ids
the engine receives, and ``--rollout-max-prompt-len`` drops longer prompts -- counted,
logged, and kept in `PromptDataset.report` (never silent).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from slime.utils.types import Sample

__all__ = ["PromptDataConfig", "PromptDataset", "add_prompt_data_arguments", "load_tokenizer"]

logger = logging.getLogger(__name__)

DEFAULT_DATA_SOURCE = "slime.rollout.data_source.RolloutDataSourceWithBuffer"
ENCODE_BATCH = 1024


def add_prompt_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """RL prompt-data flags. --prompt-data/--input-key/--label-key/--metadata-key/--tool-key,
    --rollout-shuffle/--rollout-seed and --apply-chat-template-kwargs come from the data group."""
    g = parser.add_argument_group("RL prompt data")
    g.add_argument(
        "--prompt-key", default=None, help="column with the prompt (string or messages); default: --input-key"
    )
    g.add_argument(
        "--apply-chat-template", action="store_true", help="render message prompts with the tokenizer's chat template"
    )
    g.add_argument(
        "--rollout-max-prompt-len", type=int, default=None, help="drop (and count) prompts longer than this many tokens"
    )
    g.add_argument("--eval-max-prompt-len", type=int, default=None, help="as --rollout-max-prompt-len for eval data")
    g.add_argument(
        "--data-source-path", default=DEFAULT_DATA_SOURCE, help="class(args) serving prompt groups to the rollout"
    )
    g.add_argument(
        "--buffer-filter-path",
        default=None,
        help="fn(args, rollout_id, buffer, num_samples) choosing buffered groups; default pop_first",
    )
    return parser


@dataclass(frozen=True)
class PromptDataConfig:
    """How prompt rows become `Sample`s (one instance per dataset: train or an eval set)."""

    path: str
    hf_checkpoint: str
    prompt_key: str = "input"
    label_key: str | None = None
    metadata_key: str | None = "metadata"
    tool_key: str | None = "tools"
    apply_chat_template: bool = False
    chat_template_kwargs: dict = field(default_factory=dict)
    max_prompt_len: int | None = None

    def __post_init__(self):
        if not self.path:
            raise ValueError("--prompt-data is required for RL rollouts")
        if not self.hf_checkpoint:
            raise ValueError("--hf-checkpoint is required (its tokenizer encodes the prompts)")
        if not self.prompt_key:
            raise ValueError("--prompt-key/--input-key must name a column")
        if self.max_prompt_len is not None and self.max_prompt_len <= 0:
            raise ValueError(f"--rollout-max-prompt-len must be positive, got {self.max_prompt_len}")

    @classmethod
    def from_args(cls, args, path: str | None = None, evaluation: bool = False) -> "PromptDataConfig":
        max_len = args.rollout_max_prompt_len
        if evaluation and getattr(args, "eval_max_prompt_len", None) is not None:
            max_len = args.eval_max_prompt_len
        return cls(
            path=path if path is not None else args.prompt_data,
            hf_checkpoint=args.hf_checkpoint,
            prompt_key=getattr(args, "prompt_key", None) or args.input_key,
            label_key=args.label_key,
            metadata_key=args.metadata_key,
            tool_key=args.tool_key,
            apply_chat_template=bool(args.apply_chat_template),
            chat_template_kwargs=dict(getattr(args, "apply_chat_template_kwargs", None) or {}),
            max_prompt_len=max_len,
        )


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """One tokenizer per checkpoint per process (remote code is never run)."""
    from slime.data.config import load_tokenizer as _load

    return _load(path)


class RowError(ValueError):
    """A bad prompt row; the message names file, row and field."""


class PromptDataset:
    """Every usable prompt of one file as a `Sample` (``prompt``, ``tokens``, ``label``, ``metadata``)."""

    def __init__(self, cfg: PromptDataConfig, tokenizer=None):
        from slime.data.readers import open_rows

        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.hf_checkpoint)
        rows = open_rows(cfg.path)
        parsed = []
        for i in range(len(rows)):
            try:
                parsed.append(self._parse(rows[i]))
            except (ValueError, TypeError) as e:
                field_name = getattr(e, "field", None)
                where = f"{cfg.path} {rows.where(i)}" + (f" field {field_name!r}" if field_name else "")
                raise RowError(f"{where}: {getattr(e, 'message', e)}") from e
        self.samples: list[Sample] = []
        too_long: list[str] = []
        # Encode in batches: the fast tokenizer parallelizes a batch (one call per row is ~3x slower).
        for start in range(0, len(parsed), ENCODE_BATCH):
            chunk = parsed[start : start + ENCODE_BATCH]
            ids = self.tokenizer([text for text, _, _ in chunk], add_special_tokens=False)["input_ids"]
            for j, ((text, label, metadata), tokens) in enumerate(zip(chunk, ids)):
                if cfg.max_prompt_len is not None and len(tokens) > cfg.max_prompt_len:
                    too_long.append(rows.where(start + j))
                    continue
                self.samples.append(Sample(prompt=text, tokens=list(tokens), label=label, metadata=metadata))
        self.report = {"rows": len(rows), "kept": len(self.samples), "dropped_prompt_too_long": len(too_long)}
        if too_long:
            logger.warning(
                "%s: dropped %d of %d prompts longer than --rollout-max-prompt-len %d tokens (first: %s)",
                cfg.path,
                len(too_long),
                len(rows),
                cfg.max_prompt_len,
                ", ".join(too_long[:5]),
            )
        if not self.samples:
            raise ValueError(f"{cfg.path}: no usable prompt ({self.report})")

    def __len__(self) -> int:
        return len(self.samples)

    def _parse(self, row: Any) -> tuple[str, Any, dict]:
        """(prompt text, label, metadata) of one row."""
        from slime.data.chat_template import RowFieldError
        from slime.data.schema import normalize_tools

        cfg = self.cfg
        if not isinstance(row, dict):
            raise RowFieldError("<row>", f"must be a JSON object, got {type(row).__name__}")
        if cfg.prompt_key not in row:
            raise RowFieldError(cfg.prompt_key, f"missing (columns: {sorted(row)[:10]}); set --prompt-key/--input-key")
        prompt = row[cfg.prompt_key]
        metadata = row.get(cfg.metadata_key) if cfg.metadata_key else None
        if isinstance(metadata, str):
            try:
                metadata = json.loads(metadata)
            except json.JSONDecodeError as e:
                raise RowFieldError(cfg.metadata_key, f"is a string but not valid JSON ({e.msg})") from None
        if metadata is not None and not isinstance(metadata, dict):
            raise RowFieldError(
                cfg.metadata_key, f"must be an object or its JSON string, got {type(metadata).__name__}"
            )
        if cfg.apply_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise RowFieldError(cfg.prompt_key, "must be a string or a list of {role, content} messages")
            tools = normalize_tools(row.get(cfg.tool_key), cfg.tool_key) if cfg.tool_key else None
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, **cfg.chat_template_kwargs
            )
        else:
            if not isinstance(prompt, str):
                raise RowFieldError(
                    cfg.prompt_key, f"is a {type(prompt).__name__}; message lists need --apply-chat-template"
                )
            text = prompt
        label = row.get(cfg.label_key) if cfg.label_key else None
        return text, label, dict(metadata or {})
