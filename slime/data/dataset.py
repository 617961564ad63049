"""The SFT data set: every row validated and measured before training, nothing dropped silently.

`prepare` reads each row once, normalizes it (`schema.parse_row`), encodes it with the chat
template under the multi-turn policy and applies ``max_length``. It keeps only small numpy
arrays (row, turn, length, supervised tokens per sample) and a `DataReport`; token ids are
produced again, by the same `SFTEncoder`, when a rollout asks for the sample.
Bad rows raise `DataValidationError` naming file, row and field, or, with
``skip_invalid``, are skipped and counted.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from slime.data.chat_template import ChatTemplate, Encoded, RowFieldError, TemplateError
from slime.data.readers import RowReadError, RowSource
from slime.data.schema import Conversation, DataKeys, parse_row
from slime.utils.types import Sample

logger = logging.getLogger(__name__)

__all__ = ["DataReport", "DataValidationError", "PreparedData", "SFTEncoder", "prepare"]


class DataValidationError(ValueError):
    """Raised before training when rows are invalid and skipping was not asked for."""


@dataclass
class SFTEncoder:
    """Row -> training samples. The one code path for validation and for rollouts."""

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

    def encode_turn(self, conv: Conversation, turn: int) -> Encoded:
        if turn < 0:
            (enc,) = self.template.encode(conv.messages, conv.train, conv.tools, self.policy, self.max_length)
            return enc
        return self.template.encode_turn(conv.messages, turn, conv.tools, self.max_length)

    def to_sample(self, conv: Conversation, enc: Encoded, index: int, row_index: int) -> Sample:
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


@dataclass
class PreparedData:
    """Per-sample index arrays over a `RowSource` (row, turn (-1 = whole conversation), lengths)."""

    source: RowSource
    encoder: SFTEncoder
    rows: np.ndarray
    turns: np.ndarray
    lengths: np.ndarray
    supervised: np.ndarray
    report: DataReport
    content_hash: str = ""  # over every sample's token ids and mask, in order

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, k: int, index: int | None = None) -> Sample:
        """Build sample ``k`` (tokens and mask) from its row."""
        row_index, turn = int(self.rows[k]), int(self.turns[k])
        conv = parse_row(self.source[row_index], self.encoder.keys)
        enc = self.encoder.encode_turn(conv, turn)
        return self.encoder.to_sample(conv, enc, k if index is None else index, row_index)

    def fingerprint(self) -> str:
        """Identifies the sample set, so a resumed run can refuse changed data."""
        import hashlib

        h = hashlib.sha256(self.content_hash.encode())
        for arr in (self.rows, self.turns, self.lengths):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def _field_kind(name: str) -> str:
    return re.sub(r"\[\d+\]", "[]", name)


def prepare(
    source: RowSource,
    encoder: SFTEncoder,
    skip_invalid: bool = False,
    max_errors: int = 20,
    progress: bool = True,
) -> PreparedData:
    """Validate and measure every row of ``source``; raise or skip (and count) bad ones."""
    report = DataReport(path=source.path, policy=encoder.policy, max_length=encoder.max_length)
    import hashlib

    rows, turns, lengths, supervised = [], [], [], []
    digest = hashlib.blake2b(digest_size=16)
    iterator = range(len(source))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"validating {source.path}", unit="row", leave=False)
    for i in iterator:
        report.rows += 1
        try:
            try:
                _, encs = encoder.encode_row(source[i])
            except RowReadError as e:
                raise RowFieldError("<json>", str(e)) from None
        except TemplateError:
            raise  # a property of the template, not of this row
        except RowFieldError as e:
            report.rows_invalid += 1
            report.error_fields[_field_kind(e.field)] += 1
            msg = f"{source.path}: {source.where(i)}: field '{e.field}': {e.message}"
            if len(report.errors) < max_errors:
                report.errors.append(msg)
            if not skip_invalid and report.rows_invalid >= max_errors:
                break
            continue
        for enc in encs:
            n_sup = enc.num_supervised
            if n_sup == 0:
                report.samples_dropped += 1
                where = "messages" if enc.turn is None else f"messages[{enc.turn}]"
                report.error_fields[f"{where}: truncation"] += 1
                if len(report.errors) < max_errors:
                    report.errors.append(
                        f"{source.path}: {source.where(i)}: field '{where}': no supervised token left after "
                        f"truncation to --rollout-max-context-len {encoder.max_length}"
                    )
                continue
            digest.update(np.asarray(enc.token_ids, dtype=np.int32).tobytes())
            digest.update(np.asarray(enc.loss_mask, dtype=np.int8).tobytes())
            rows.append(i)
            turns.append(-1 if enc.turn is None or encoder.policy != "per-turn" else enc.turn)
            lengths.append(len(enc.token_ids))
            supervised.append(n_sup)
            report.samples += 1
            report.samples_truncated += enc.truncated
            report.tokens += len(enc.token_ids)
            report.supervised_tokens += n_sup
            report.boundary_straddles += enc.boundary_straddles
    bad = report.rows_invalid + report.samples_dropped
    if bad and not skip_invalid:
        more = "" if report.rows == len(source) else f" (stopped after {max_errors} errors)"
        raise DataValidationError(
            f"{bad} invalid row(s)/sample(s) in {source.path}{more}; fix them or pass --skip-invalid-samples "
            "to skip and count them:\n  " + "\n  ".join(report.errors)
        )
    if report.samples == 0:
        raise DataValidationError(f"{source.path}: no usable samples ({report.rows} rows read)")
    report.lengths = np.asarray(lengths, dtype=np.int64)
    for line in report.summary_lines():
        logger.info(line)
    return PreparedData(
        source=source,
        encoder=encoder,
        rows=np.asarray(rows, dtype=np.int64),
        turns=np.asarray(turns, dtype=np.int32),
        lengths=report.lengths,
        supervised=np.asarray(supervised, dtype=np.int64),
        report=report,
        content_hash=digest.hexdigest(),
    )
