"""The SFT data set: validated samples, their tokens, and the report of what was dropped.

`SFTEncoder` turns a row into samples (the one code path for validation and tokens).
`PreparedData` serves samples from a `TokenStore` (memory-mapped token ids and loss masks
written once by `slime.data.prepare`); a sample's prompt, label and metadata are re-read
from its row, which is cheap next to tokenizing it. `DataReport` counts every row and
sample, kept or not, and is stored with the tokens so a cache hit reports the same.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from slime.data.chat_template import ChatTemplate, Encoded
from slime.data.readers import RowSource
from slime.data.schema import Conversation, DataKeys, parse_row
from slime.data.store import TokenStore
from slime.utils.types import Sample

logger = logging.getLogger(__name__)

__all__ = ["DataReport", "DataValidationError", "EncoderSpec", "PreparedData", "SFTEncoder", "make_sample",
           "stored_sample"]


class DataValidationError(ValueError):
    """Raised before training when rows are invalid and skipping was not asked for."""


def make_sample(conv: Conversation, enc: Encoded, index: int, row_index: int) -> Sample:
    """slime's convention: ``loss_mask`` covers the last ``response_length`` tokens."""
    first = enc.loss_mask.index(1)
    # Per-turn samples cover the conversation up to their turn only.
    prompt = conv.messages if enc.turn is None else conv.messages[: enc.turn + 1]
    metadata = dict(conv.metadata)
    metadata.update(row_index=row_index, turn_index=enc.turn)
    if conv.tools:
        metadata["tools"] = conv.tools
    return Sample(
        index=index,
        prompt=prompt,
        tokens=enc.token_ids,
        response_length=len(enc.token_ids) - first,
        loss_mask=enc.loss_mask[first:],
        label=conv.label,
        reward=0.0,
        status=Sample.Status.TRUNCATED if enc.truncated else Sample.Status.COMPLETED,
        metadata=metadata,
    )


def stored_sample(source: RowSource, keys: DataKeys, ids: list[int], mask: list[int], row_index: int, turn: int,
                  truncated: bool, index: int) -> Sample:
    """A sample from its stored tokens and mask; prompt, label and metadata re-read from its row."""
    enc = Encoded(ids, mask, turn=None if turn < 0 else turn, truncated=truncated)
    return make_sample(parse_row(source[row_index], keys), enc, index, row_index)


@dataclass
class SFTEncoder:
    """Row -> training samples: the one code path that validates rows and makes their tokens and masks."""

    template: ChatTemplate
    keys: DataKeys
    policy: str = "full"
    max_length: int | None = None

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {self.max_length}")

    def encode_row(self, row: dict) -> tuple[Conversation, list[Encoded]]:
        conv = parse_row(row, self.keys)
        encs = self.template.encode(conv.messages, conv.train, conv.tools, self.policy, self.max_length)
        return conv, encs


@dataclass(frozen=True)
class EncoderSpec:
    """What an `SFTEncoder` is built from. Picklable and cheap: worker processes build their
    own encoder from it, and a cache hit builds one only if something asks for it."""

    hf_checkpoint: str
    keys: DataKeys
    policy: str = "full"
    max_length: int | None = None
    template_kwargs: dict = field(default_factory=dict)

    def build(self) -> SFTEncoder:
        from slime.data.config import load_tokenizer

        template = ChatTemplate(load_tokenizer(self.hf_checkpoint), self.template_kwargs)
        return SFTEncoder(template, self.keys, self.policy, self.max_length)


@dataclass
class DataReport:
    """What `prepare` saw: counts for every row and sample, kept or not."""

    path: str
    policy: str
    max_length: int | None
    rows: int = 0
    rows_invalid: int = 0
    samples: int = 0
    samples_truncated: int = 0
    samples_dropped: int = 0  # no supervised token after truncation (skipped)
    tokens: int = 0
    supervised_tokens: int = 0
    boundary_straddles: int = 0
    error_fields: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lengths: np.ndarray | None = None

    def length_percentiles(self) -> dict[str, int]:
        if self.lengths is None or len(self.lengths) == 0:
            return {}
        qs = np.percentile(self.lengths, [50, 90, 99, 100]).round().astype(int)
        return {"p50": int(qs[0]), "p90": int(qs[1]), "p99": int(qs[2]), "max": int(qs[3])}

    def summary_lines(self) -> list[str]:
        pct = " ".join(f"{k}={v}" for k, v in self.length_percentiles().items())
        lines = [
            f"data: {self.path} (policy {self.policy}, max length {self.max_length or 'none'})",
            f"  rows: {self.rows} read, {self.rows_invalid} invalid (skipped)",
            f"  samples: {self.samples} kept, {self.samples_truncated} truncated (kept), "
            f"{self.samples_dropped} dropped (no supervised token after truncation)",
            f"  tokens: {self.tokens} total, {self.supervised_tokens} supervised "
            f"({100.0 * self.supervised_tokens / max(self.tokens, 1):.1f}%)",
            f"  sample length (tokens): {pct or 'n/a'}",
        ]
        if self.boundary_straddles:
            lines.append(f"  tokens merged across a turn boundary: {self.boundary_straddles}")
        if self.error_fields:
            by_field = ", ".join(f"{k}: {v}" for k, v in self.error_fields.most_common())
            lines.append(f"  invalid by field: {by_field}")
            lines.extend(f"    {e}" for e in self.errors[:5])
        return lines

    _COUNTS = ("rows", "rows_invalid", "samples", "samples_truncated", "samples_dropped", "tokens",
               "supervised_tokens", "boundary_straddles")

    def to_dict(self) -> dict:
        """JSON-able form stored with the tokens (lengths come back from the store's offsets)."""
        out = {name: getattr(self, name) for name in ("path", "policy", "max_length", *self._COUNTS, "errors")}
        out["error_fields"] = dict(self.error_fields)
        return out

    @classmethod
    def from_dict(cls, d: dict, path: str, lengths: np.ndarray | None = None) -> DataReport:
        """The stored report, its messages pointing at ``path`` (the cache is shared by equal content)."""
        old = d["path"]
        errors = [path + e[len(old):] if e.startswith(old) else e for e in d["errors"]]
        report = cls(path=path, policy=d["policy"], max_length=d["max_length"], error_fields=Counter(d["error_fields"]),
                     errors=errors, lengths=lengths)
        for name in cls._COUNTS:
            setattr(report, name, int(d[name]))
        return report

    def validation_error(self, complete: bool, max_errors: int) -> DataValidationError | None:
        """The error that stops a run without ``--skip-invalid-samples`` (None when all rows are good)."""
        bad = self.rows_invalid + self.samples_dropped
        if not bad:
            return None
        more = "" if complete else f" (stopped after {max_errors} errors)"
        return DataValidationError(
            f"{bad} invalid row(s)/sample(s) in {self.path}{more}; fix them or pass --skip-invalid-samples "
            "to skip and count them:\n  " + "\n  ".join(self.errors[:max_errors])
        )


@dataclass
class PreparedData:
    """The samples of one data file: tokens from a `TokenStore`, prompts from the rows.

    ``encoder`` is built on first use only (a cache hit needs no tokenizer to serve samples).
    """

    source: RowSource
    keys: DataKeys
    store: TokenStore
    report: DataReport
    make_encoder: Callable[[], SFTEncoder] | None = None
    content_hash: str = ""  # over every sample's token ids and mask, in order
    _encoder: SFTEncoder | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def encoder(self) -> SFTEncoder:
        if self._encoder is None:
            if self.make_encoder is None:
                raise ValueError("this PreparedData was built without an encoder")
            self._encoder = self.make_encoder()
        return self._encoder

    @property
    def rows(self) -> np.ndarray:
        return self.store["rows"]

    @property
    def turns(self) -> np.ndarray:
        return self.store["turns"]

    @property
    def lengths(self) -> np.ndarray:
        return self.store.lengths()

    def sample(self, k: int, index: int | None = None) -> Sample:
        """Sample ``k``: stored tokens and mask, prompt and metadata from its row."""
        ids, mask = self.store.tokens(k)
        return stored_sample(self.source, self.keys, ids, mask, int(self.store["rows"][k]), int(self.store["turns"][k]),
                             bool(self.store["truncated"][k]), k if index is None else index)

    def summary_lines(self) -> list[str]:
        return self.report.summary_lines()

    def close(self) -> None:
        """Nothing runs in the background (`slime.data.stream.StreamingData.close` stops its preparation)."""

    def fingerprint(self) -> str:
        """Identifies the sample set, so a resumed run can refuse changed data.

        A hash of the token content hash and the row/turn/length arrays (tens of MB at a
        million samples: computed once, then remembered).
        """
        if self._fingerprint is None:
            h = hashlib.sha256(self.content_hash.encode())
            for arr in (self.rows.astype(np.int64), self.turns.astype(np.int32), self.lengths.astype(np.int64)):
                h.update(np.ascontiguousarray(arr).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint
