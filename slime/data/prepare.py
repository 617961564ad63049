"""Encode every row once, in chunks, into a `TokenStore`; count everything that is not kept.

`encode_rows` is the unit of work: rows ``[start, stop)`` -> `Chunk` (tokens and masks of
their samples, per-sample facts, row errors). It runs in this process or in worker
processes (`slime.data.parallel`); either way `prepare` merges the chunks in row order with
the same code, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import logging
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from slime.data.chat_template import RowFieldError, TemplateError
from slime.data.dataset import DataReport, DataValidationError, EncoderSpec, PreparedData, SFTEncoder
from slime.data.progress import ProgressLog
from slime.data.readers import RowReadError, RowSource
from slime.data.store import StoreWriter, TokenStore

logger = logging.getLogger(__name__)

__all__ = ["Chunk", "chunk_events", "chunk_ranges", "encode_rows", "field_kind", "merge_chunks", "prepare", "row_error"]

DEFAULT_CHUNK_ROWS = 256


@dataclass
class Chunk:
    """Rows ``[start, stop)`` encoded. Per-sample arrays list every sample in row order,
    including those left with no supervised token (``supervised == 0``, dropped by the merge)."""

    start: int
    stop: int
    errors: list[tuple[int, str, str]]  # (row, field, "file: row ...: field ...: message")
    rows: np.ndarray
    turns: np.ndarray
    lengths: np.ndarray
    supervised: np.ndarray
    truncated: np.ndarray
    straddles: np.ndarray
    token_ids: np.ndarray  # all samples' ids concatenated
    loss_mask: np.ndarray


def row_error(source: RowSource, row: int, fld: str, message: str) -> str:
    """How every row error reads: ``file: row R (line L): field 'F': message``."""
    return f"{source.path}: {source.where(row)}: field '{fld}': {message}"


def encode_rows(encoder: SFTEncoder, source: RowSource, start: int, stop: int,
                order: np.ndarray | None = None) -> Chunk:
    """Encode rows ``[start, stop)``, or with ``order`` the rows ``order[start:stop]`` (a streamed
    epoch prepares rows in the order training reads them). A `TemplateError` (a property of the
    template, not of a row) raises."""
    per_sample = {k: array("q") for k in ("rows", "turns", "lengths", "supervised", "truncated", "straddles")}
    ids, mask = array("i"), bytearray()
    errors = []
    per_turn = encoder.policy == "per-turn"
    for i in (range(start, stop) if order is None else (int(r) for r in order[start:stop])):
        try:
            try:
                _, encs = encoder.encode_row(source[i])
            except RowReadError as e:
                raise RowFieldError("<json>", str(e)) from None
        except TemplateError:
            raise
        except RowFieldError as e:
            errors.append((i, e.field, row_error(source, i, e.field, e.message)))
            continue
        for enc in encs:
            per_sample["rows"].append(i)
            per_sample["turns"].append(enc.turn if per_turn and enc.turn is not None else -1)
            per_sample["lengths"].append(len(enc.token_ids))
            per_sample["supervised"].append(enc.num_supervised)
            per_sample["truncated"].append(enc.truncated)
            per_sample["straddles"].append(enc.boundary_straddles)
            ids.extend(enc.token_ids)
            mask.extend(enc.loss_mask)
    arrays = {k: np.frombuffer(v, dtype=np.int64) if len(v) else np.zeros(0, np.int64) for k, v in per_sample.items()}
    return Chunk(
        start, stop, errors, **arrays,
        token_ids=np.frombuffer(ids, dtype=np.int32) if len(ids) else np.zeros(0, np.int32),
        loss_mask=np.frombuffer(bytes(mask), dtype=np.uint8),
    )


def chunk_ranges(n: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_rows, n)) for a in range(0, n, chunk_rows)]


def field_kind(name: str) -> str:
    return re.sub(r"\[\d+\]", "[]", name)


def chunk_events(c: Chunk, source: RowSource, max_length: int | None) -> list[tuple[int, str, str]]:
    """Row errors and dropped samples of a chunk, in row order: (row, field kind, message); a
    drop's kind ends with ``": truncation"``."""
    events = [(row, field_kind(fld), msg) for row, fld, msg in c.errors]
    for k in np.flatnonzero(c.supervised == 0):
        row, turn = int(c.rows[k]), int(c.turns[k])
        where = "messages" if turn < 0 else f"messages[{turn}]"
        msg = row_error(source, row, where, "no supervised token left after truncation to "
                        f"--rollout-max-context-len {max_length}")
        events.append((row, f"{where}: truncation", msg))
    events.sort(key=lambda e: e[0])  # stable: a row has either an error or samples
    return events


class _Merger:
    """Folds chunks, in row order, into the report, the content hash and the store."""

    def __init__(self, source: RowSource, encoder: SFTEncoder | EncoderSpec, writer: StoreWriter, skip_invalid: bool,
                 max_errors: int):
        self.source, self.encoder, self.writer = source, encoder, writer
        self.skip_invalid, self.max_errors = skip_invalid, max_errors
        self.report = DataReport(path=source.path, policy=encoder.policy, max_length=encoder.max_length)
        self.digest = hashlib.blake2b(digest_size=16)
        self.stopped = False

    def _note(self, kind: str, message: str) -> None:
        self.report.error_fields[kind] += 1
        if len(self.report.errors) < self.max_errors:
            self.report.errors.append(message)

    def add(self, c: Chunk) -> None:
        r = self.report
        dropped = 0
        for row, kind, msg in chunk_events(c, self.source, self.encoder.max_length):
            if kind.endswith(": truncation"):
                dropped += 1
                self._note(kind, msg)
                continue
            r.rows_invalid += 1
            self._note(kind, msg)
            if not self.skip_invalid and r.rows_invalid >= self.max_errors:
                # Same stop as a one-row-at-a-time loop: nothing after this row is counted.
                r.rows += row + 1 - c.start
                r.samples_dropped += dropped
                self.stopped = True
                return
        r.rows += c.stop - c.start
        r.samples_dropped += dropped
        keep = c.supervised > 0
        if self.skip_invalid or not (r.rows_invalid or r.samples_dropped):
            self._write(c, keep)  # a run that will raise writes nothing

    def _write(self, c: Chunk, keep: np.ndarray) -> None:
        r = self.report
        offsets = np.zeros(len(c.lengths) + 1, dtype=np.int64)
        np.cumsum(c.lengths, out=offsets[1:])
        if keep.all():
            ids, mask = c.token_ids, c.loss_mask
        else:
            token_keep = np.repeat(keep, c.lengths)
            ids, mask = c.token_ids[token_keep], c.loss_mask[token_keep]
        id_bytes = memoryview(np.ascontiguousarray(c.token_ids, dtype=np.int32)).cast("B")
        mask_bytes = memoryview(np.ascontiguousarray(c.loss_mask, dtype=np.int8)).cast("B")
        for k in np.flatnonzero(keep):  # same bytes, same order as the one-row-at-a-time hash
            a, b = int(offsets[k]), int(offsets[k + 1])
            self.digest.update(id_bytes[4 * a : 4 * b])
            self.digest.update(mask_bytes[a:b])
        lengths = c.lengths[keep]
        self.writer.append(ids, mask, lengths, c.rows[keep], c.turns[keep], c.truncated[keep])
        r.samples += int(keep.sum())
        r.samples_truncated += int(c.truncated[keep].sum())
        r.tokens += int(lengths.sum())
        r.supervised_tokens += int(c.supervised[keep].sum())
        r.boundary_straddles += int(c.straddles[keep].sum())


def prepare(
    source: RowSource,
    encoder: SFTEncoder | EncoderSpec,
    skip_invalid: bool = False,
    max_errors: int = 20,
    progress: bool = True,
    num_workers: int | None = 1,
    store_dir: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    min_rows_per_worker: int | None = None,
    store_meta: dict | None = None,
) -> PreparedData:
    """Validate, encode and store every row of ``source``; raise or skip (and count) bad ones.

    ``encoder``: an `SFTEncoder`, or an `EncoderSpec` so that only the processes that
    encode load a tokenizer (the returned data builds its encoder on first use).
    ``num_workers`` > 1 (None = every usable core) encodes in that many processes, fewer
    for small data (`slime.data.parallel.plan_workers`). ``store_dir``: where the token
    store is written (default: a private temporary directory, removed with the data).
    """
    from slime.data import parallel

    ranges = chunk_ranges(len(source), chunk_rows)
    workers = parallel.plan_workers(num_workers, len(source), min_rows_per_worker)
    log = ProgressLog(f"preparing {source.path}", total=len(source), workers=workers, enabled=progress)
    if workers > 1:
        chunks: Iterable[Chunk] = parallel.encode_in_processes(encoder, source, ranges, workers)
    else:
        if isinstance(encoder, EncoderSpec):
            encoder = encoder.build()
        chunks = (encode_rows(encoder, source, a, b) for a, b in ranges)
    return merge_chunks(source, encoder, chunks, log, skip_invalid, max_errors, store_dir, store_meta)


def merge_chunks(
    source: RowSource,
    encoder: SFTEncoder | EncoderSpec,
    chunks: Iterable[Chunk],
    log: ProgressLog | None,
    skip_invalid: bool = False,
    max_errors: int = 20,
    store_dir: str | None = None,
    store_meta: dict | None = None,
) -> PreparedData:
    """Fold ``chunks`` (rows in order, whatever computed them) into a complete store; the report,
    the content hash and every array depend on the rows only, never on how they were chunked.
    ``log``: progress of the encoding that produces ``chunks`` (None: none)."""
    log = log or ProgressLog("", total=0, enabled=False)
    owned_tmp = store_dir is None
    if owned_tmp:
        import tempfile

        store_dir = tempfile.mkdtemp(prefix="slime-sft-data-")
    writer = StoreWriter(store_dir)
    merger = _Merger(source, encoder, writer, skip_invalid, max_errors)
    try:
        for chunk in chunks:
            merger.add(chunk)
            log.update(chunk.stop - chunk.start, int(chunk.lengths.sum()))
            if merger.stopped:
                break
    except BaseException:
        _discard(writer, store_dir, owned_tmp)
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # stops the worker pool early on a stop or an error
    report = merger.report
    log.done(report)
    error = None if skip_invalid else report.validation_error(complete=not merger.stopped, max_errors=max_errors)
    if error is None and report.samples == 0:
        error = DataValidationError(f"{source.path}: no usable samples ({report.rows} rows read)")
    if error is not None:
        _discard(writer, store_dir, owned_tmp)
        raise error
    if hasattr(source, "index_arrays"):
        for name, arr in source.index_arrays().items():
            writer.add_array(name, arr)
    content_hash = merger.digest.hexdigest()
    writer.close({**(store_meta or {}), "report": report.to_dict(), "content_hash": content_hash})
    store = TokenStore.open(store_dir)
    if owned_tmp:
        import weakref

        weakref.finalize(store, _remove, store_dir)
    report.lengths = store.lengths()
    for line in report.summary_lines():
        logger.info(line)
    spec = encoder if isinstance(encoder, EncoderSpec) else None
    return PreparedData(source=source, keys=encoder.keys, store=store, report=report,
                        make_encoder=spec.build if spec else None, content_hash=content_hash,
                        _encoder=None if spec else encoder)


def _discard(writer: StoreWriter, store_dir: str, owned: bool) -> None:
    writer.abort()
    if owned:
        _remove(store_dir)


def _remove(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
