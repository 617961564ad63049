"""Streamed cold start: training reads samples while the rest of the corpus is still tokenized.

The epoch order depends on the sample count, the seed and the epoch only
(`slime.data.data_source.epoch_order`), never on tokens. Without ``--skip-invalid-samples``
every invalid row and every sample left with no supervised token stops the run, so in a run
that trains at all the samples are exactly the ones the schema pass (`slime.data.scan`)
counts: one per row, or one per trained assistant turn with ``--multi-turn-policy per-turn``.
The first epoch's order is therefore known before any row is tokenized, and rows are
prepared in it:

    scan every row (before step 1; with one sample per row tokenizing already runs meanwhile)
    -> sample count -> order of epoch 0 -> its rows, chunk by
    chunk (small chunks first), encoded by a background thread (worker processes as usual)
    -> spill files -> a sample is served as soon as its row is done -> after the last row,
    the spill is merged in row order by the whole-first path's own code
    (`slime.data.prepare.merge_chunks`): the same store, report and content hash, published
    to the cache as usual -> samples are served from that store from then on.

Later epochs read samples prepared by then. The fingerprint (checkpoints, resume) covers
every sample, so asking for it waits until preparation is done. What only tokenizing finds
(the template failing on a row, a sample with no supervised token after truncation) stops
the run at the next sample asked for, naming file, row and field, and nothing is cached.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import threading
from collections.abc import Callable

import numpy as np

from slime.data import parallel
from slime.data.dataset import DataReport, DataValidationError, EncoderSpec, PreparedData, stored_sample
from slime.data.prepare import DEFAULT_CHUNK_ROWS, Chunk, chunk_events, chunk_ranges, encode_rows, merge_chunks
from slime.data.progress import ProgressLog
from slime.data.readers import RowSource

logger = logging.getLogger(__name__)

__all__ = ["StreamingData", "ramp_ranges", "start_streaming", "whole_first_reason"]

#: Rows of the first chunk; chunks double up to ``chunk_rows`` (the first samples come back fast).
FIRST_CHUNK_ROWS = 16
#: Per-sample facts kept from each chunk until the merge (int32; truncation flags apart).
_PER_SAMPLE = ("lengths", "supervised", "straddles", "turns")
#: A wait for a sample longer than this is logged (training is waiting for tokenization).
WAIT_LOG_S = 30.0


def whole_first_reason(cfg, rows: int) -> str | None:
    """Why ``cfg`` must prepare every row before training (None: it may stream)."""
    if not cfg.streaming:
        return "data streaming is off (--no-data-streaming)"
    if cfg.skip_invalid:
        return ("--skip-invalid-samples: rows that only tokenizing rejects (the template failing, no supervised "
                "token left after truncation) change the sample count, and with it the seeded order")
    if rows == 0:
        return "no rows"
    return None


def ramp_ranges(n: int, chunk_rows: int, first: int = FIRST_CHUNK_ROWS) -> list[tuple[int, int]]:
    """``[0, n)`` in chunks of ``first``, ``2 first``, ... up to ``chunk_rows`` rows."""
    out, a, size = [], 0, max(1, min(first, chunk_rows))
    while a < n:
        out.append((a, min(a + size, n)))
        a, size = out[-1][1], min(2 * size, chunk_rows)
    return out


class StreamingData:
    """`PreparedData`'s interface (``len``, ``sample``, ``fingerprint``, ``report``, ...) over a
    corpus still being prepared; `wait` returns the complete `PreparedData`.

    ``samples_per_row``: from `slime.data.scan.scan_rows`. ``order``: sample indices in the
    order training reads them (epoch 0). ``publish``: called (in the background thread) with
    the complete data, returns what to serve (the loader commits it to the cache).
    ``abandon``: called if preparation fails or is closed before the end.
    """

    def __init__(self, source: RowSource, spec: EncoderSpec, samples_per_row: np.ndarray, order: np.ndarray, *,
                 spill_dir: str, num_workers: int | None = 1, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 min_rows_per_worker: int | None = None, store_dir: str | None = None, store_meta: dict | None = None,
                 publish: Callable[[PreparedData], PreparedData] | None = None,
                 abandon: Callable[[], None] | None = None, max_errors: int = 20, progress: bool = True):
        self.source, self.spec, self.keys = source, spec, spec.keys
        self.chunk_rows, self.max_errors = chunk_rows, max_errors
        self._store_dir, self._store_meta, self._publish, self._abandon = store_dir, store_meta, publish, abandon
        rows = len(source)
        self._first = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(samples_per_row, out=self._first[1:])
        self._spr = np.asarray(samples_per_row, dtype=np.int64)
        n = int(self._first[-1])
        self._row_of = np.repeat(np.arange(rows, dtype=np.int64), self._spr)
        in_order = self._row_of[np.asarray(order, dtype=np.int64)]
        _, seen = np.unique(in_order, return_index=True)
        self._prep_rows = in_order[np.sort(seen)]  # each row once, where training first needs it
        self._ready = np.zeros(n, dtype=bool)
        self._at = np.zeros(n, dtype=np.int64)  # first token in the spill
        self._per_sample = {name: np.zeros(n, dtype=np.int32) for name in _PER_SAMPLE}
        self._truncated = np.zeros(n, dtype=np.uint8)
        self._provisional = DataReport(path=source.path, policy=spec.policy, max_length=spec.max_length, rows=rows,
                                       samples=n)
        self._spill_dir = spill_dir
        os.makedirs(spill_dir, exist_ok=True)
        self._spill_paths = {name: os.path.join(spill_dir, f"{name}.bin") for name in ("token_ids", "loss_mask")}
        self._spill_out = {name: open(path, "wb") for name, path in self._spill_paths.items()}
        self._spill_in = {name: os.open(path, os.O_RDONLY) for name, path in self._spill_paths.items()}
        self._spilled = 0
        self._cond = threading.Condition()
        self._final: PreparedData | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._checked = threading.Event()  # set once every row passed the schema pass (`start_streaming`)
        self._encoder = None
        self.workers = parallel.plan_workers(num_workers, rows, min_rows_per_worker)
        # The tokenizer is loaded here, not in the background thread: transformers' lazy
        # imports are not thread-safe (a first import racing the main thread's fails with
        # "cannot import name 'AutoTokenizer'").
        self._serial_encoder = self.spec.build() if self.workers <= 1 else None
        self._log = ProgressLog(f"preparing {source.path} (streamed, in training order)", total=rows,
                                workers=self.workers, enabled=progress)
        self._thread = threading.Thread(target=self._run, name="slime-data-stream", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ PreparedData's interface
    def __len__(self) -> int:
        return len(self._ready)

    @property
    def done(self) -> bool:
        return self._final is not None

    @property
    def report(self) -> DataReport:
        """The complete report once prepared; until then rows and samples (known from the scan)."""
        return self._final.report if self._final is not None else self._provisional

    def summary_lines(self) -> list[str]:
        if self._final is not None:
            return self._final.summary_lines()
        r = self._provisional
        return [
            f"data: {r.path} (policy {r.policy}, max length {r.max_length or 'none'})",
            f"  rows: {r.rows} read, 0 invalid (every row checked before training)",
            f"  samples: {r.samples}; tokens, truncation and lengths follow when the background preparation "
            "finishes (data streaming: samples are prepared in the order training reads them)",
        ]

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = self.spec.build()
        return self._encoder

    def sample(self, k: int, index: int | None = None):
        """Sample ``k``, waiting for its row if need be; raises the preparation's error if it failed."""
        with self._cond:
            while True:
                self._check()
                if self._final is not None:
                    final = self._final
                    break
                if self._ready[k]:  # read under the lock: the spill is removed under it
                    ids, mask = self._read(k)
                    turn, truncated = int(self._per_sample["turns"][k]), bool(self._truncated[k])
                    final = None
                    break
                if not self._cond.wait(timeout=WAIT_LOG_S):
                    logger.info("training waits for sample %d: its row is not tokenized yet (%s of %s rows done)", k,
                                f"{self._log.rows:,}", f"{self._log.total:,}")
        if final is not None:
            return final.sample(k, index)
        return stored_sample(self.source, self.keys, ids, mask, int(self._row_of[k]), turn, truncated,
                             k if index is None else index)

    def fingerprint(self) -> str:
        return self.wait("the data fingerprint (checkpoint, resume) covers every sample").fingerprint()

    def wait(self, why: str = "asked for the complete data") -> PreparedData:
        """The complete `PreparedData` (blocks until preparation finishes)."""
        with self._cond:
            if self._final is None and self._error is None:
                logger.info("%s: waiting for the data preparation to finish (%s of %s rows done)", why,
                            f"{self._log.rows:,}", f"{self._log.total:,}")
            while self._final is None:
                self._check()
                self._cond.wait(timeout=WAIT_LOG_S)
            return self._final

    @property
    def store(self):
        return self.wait("the token store").store

    @property
    def rows(self) -> np.ndarray:
        return self.wait("the sample rows").rows

    @property
    def turns(self) -> np.ndarray:
        return self.wait("the sample turns").turns

    @property
    def lengths(self) -> np.ndarray:
        return self.wait("the sample lengths").lengths

    def checked(self) -> None:
        """Every row passed the schema pass: from now on an error of a row is a late error."""
        self._checked.set()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the background preparation (if still running); an unfinished build is discarded."""
        self._stop.set()
        self._checked.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the background thread
    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _read(self, k: int) -> tuple[list[int], list[int]]:
        a, n = int(self._at[k]), int(self._per_sample["lengths"][k])
        ids = os.pread(self._spill_in["token_ids"], 4 * n, 4 * a)
        mask = os.pread(self._spill_in["loss_mask"], n, a)
        return np.frombuffer(ids, dtype=np.int32).tolist(), list(mask)

    def _chunks(self):
        ranges = ramp_ranges(len(self._prep_rows), self.chunk_rows)
        if self.workers > 1:
            return parallel.encode_in_processes(self.spec, self.source, ranges, self.workers, order=self._prep_rows)
        encoder = self._serial_encoder
        reader = pickle.loads(pickle.dumps(self.source))  # its own file handle: training reads rows meanwhile
        return (encode_rows(encoder, reader, a, b, self._prep_rows) for a, b in ranges)

    def _run(self) -> None:
        chunks, error = None, None
        try:
            chunks = self._chunks()
            for chunk in chunks:
                if self._stop.is_set():
                    break
                self._add(chunk)
            else:
                self._finish()
        except BaseException as e:  # noqa: BLE001 - handed to the thread that asks for samples
            error = e
            if isinstance(e, DataValidationError):
                logger.error("%s", e)
            else:
                logger.exception("data preparation failed")
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # stops the worker pool
            if self._final is None:
                # Everything discarded before the error is visible: whoever sees it sees no leftovers.
                with self._cond:
                    self._cleanup()
                if self._abandon is not None:
                    self._abandon()
                with self._cond:
                    self._error = error or RuntimeError(
                        f"{self.source.path}: the data preparation was stopped before it finished")
                    self._cond.notify_all()

    def _add(self, c: Chunk) -> None:
        events = chunk_events(c, self.source, self.spec.max_length)
        if events:
            self._checked.wait()  # the schema pass may still run: if it fails, it reports (and closes)
            if self._stop.is_set():
                return
            raise self._late_error([msg for _, _, msg in events])
        rows = self._prep_rows[c.start : c.stop]
        if not np.array_equal(np.repeat(rows, self._spr[rows]), c.rows):
            raise RuntimeError(f"{self.source.path}: rows {rows[:5].tolist()}...: samples differ from the schema pass")
        starts = np.flatnonzero(np.r_[True, c.rows[1:] != c.rows[:-1]])
        within = np.arange(len(c.rows)) - np.repeat(starts, np.diff(np.r_[starts, len(c.rows)]))
        ks = self._first[c.rows] + within
        offsets = self._spilled + np.cumsum(c.lengths) - c.lengths
        self._spill_out["token_ids"].write(memoryview(np.ascontiguousarray(c.token_ids, dtype=np.int32)).cast("B"))
        self._spill_out["loss_mask"].write(memoryview(np.ascontiguousarray(c.loss_mask, dtype=np.uint8)).cast("B"))
        for f in self._spill_out.values():
            f.flush()  # readable by pread before the samples are marked ready
        self._spilled += len(c.token_ids)
        with self._cond:
            self._at[ks] = offsets
            for name in self._per_sample:
                self._per_sample[name][ks] = getattr(c, name)
            self._truncated[ks] = c.truncated
            self._ready[ks] = True
            self._cond.notify_all()
        self._log.update(c.stop - c.start, int(c.lengths.sum()))

    def _late_error(self, messages: list[str]) -> DataValidationError:
        return DataValidationError(
            f"{len(messages)} invalid row(s)/sample(s) in {self.source.path}, found after training started (data "
            "streaming tokenizes rows in the order training reads them; the check before training reads every row "
            "but cannot find these, which need the tokens): fix them, or pass --skip-invalid-samples to skip and "
            "count them (every row is then prepared before training), or --no-data-streaming to find them before "
            "training. Nothing was cached.\n  " + "\n  ".join(messages[: self.max_errors])
        )

    def _row_order_chunks(self):
        """The spill as chunks in row order: what the whole-first path merges. Read by offset,
        not mapped, so memory stays flat (see `slime.data.store`)."""
        fds = {name: os.open(path, os.O_RDONLY) for name, path in self._spill_paths.items()}
        try:
            for a, b in chunk_ranges(len(self.source), self.chunk_rows):
                ka, kb = int(self._first[a]), int(self._first[b])
                per = {name: self._per_sample[name][ka:kb].astype(np.int64) for name in _PER_SAMPLE}
                spans = list(zip(self._at[ka:kb].tolist(), per["lengths"].tolist()))
                ids = b"".join(os.pread(fds["token_ids"], 4 * n, 4 * at) for at, n in spans)
                mask = b"".join(os.pread(fds["loss_mask"], n, at) for at, n in spans)
                if len(mask) != int(per["lengths"].sum()) or len(ids) != 4 * len(mask):
                    raise RuntimeError(f"{self._spill_dir}: the spill is shorter than its index")
                yield Chunk(a, b, [], rows=self._row_of[ka:kb], truncated=self._truncated[ka:kb].astype(np.int64),
                            token_ids=np.frombuffer(ids, dtype=np.int32), loss_mask=np.frombuffer(mask, dtype=np.uint8),
                            **per)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _finish(self) -> None:
        for f in self._spill_out.values():
            f.close()
        self._log.done(self._provisional)
        data = merge_chunks(self.source, self.spec, self._row_order_chunks(), None, skip_invalid=False,
                            max_errors=self.max_errors, store_dir=self._store_dir, store_meta=self._store_meta)
        # Unlinked before publishing (it must not end up in the cache entry); readers keep
        # reading through their open descriptors until the swap below.
        shutil.rmtree(self._spill_dir, ignore_errors=True)
        if self._publish is not None:
            data = self._publish(data)
        with self._cond:
            self._final = data
            self._cleanup()
            self._cond.notify_all()

    def _cleanup(self) -> None:
        """Close and remove the spill (under the lock: samples are read from it under it)."""
        self._ready[:] = False  # nothing is read from it any more: readers wait for the swap or the error
        for f in self._spill_out.values():
            f.close()
        for fd in self._spill_in.values():
            os.close(fd)
        self._spill_in = {}
        shutil.rmtree(self._spill_dir, ignore_errors=True)


def start_streaming(cfg, source: RowSource, *, store_dir: str | None = None, store_meta: dict | None = None,
                    publish=None, abandon=None, max_errors: int = 20, progress: bool = True,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS, min_rows_per_worker: int | None = None) -> StreamingData:
    """Check every row (raises before training, as the whole-first path would) and prepare the
    rows in the order of epoch 0 of ``cfg``'s seed. With one sample per row (every policy but
    per-turn) that order is known before the check, so tokenizing starts while it runs."""
    from slime.data.data_source import epoch_order
    from slime.data.scan import scan_rows

    def stream(counts: np.ndarray) -> StreamingData:
        spill = os.path.join(store_dir, ".spill") if store_dir else tempfile.mkdtemp(prefix="slime-sft-stream-")
        order = epoch_order(int(counts.sum()), cfg.shuffle, cfg.seed, 0)
        return StreamingData(source, cfg.encoder_spec(), counts, order, spill_dir=spill, num_workers=cfg.num_workers,
                             chunk_rows=chunk_rows, min_rows_per_worker=min_rows_per_worker, store_dir=store_dir, store_meta=store_meta,
                             publish=publish, abandon=abandon, max_errors=max_errors, progress=progress)

    def scan() -> np.ndarray:
        return scan_rows(source, cfg.keys, cfg.policy, cfg.max_length, max_errors=max_errors, progress=progress)

    if cfg.policy == "per-turn":  # samples per row come from the check
        data = stream(scan())
    else:
        data = stream(np.ones(len(source), dtype=np.int64))
        try:
            scan()
        except BaseException:
            data.close()
            raise
    data.checked()
    logger.info("data streaming: training starts once its first samples are tokenized; the rest of %s is "
                "tokenized in the background, in the order training reads it (--no-data-streaming: all first)",
                source.path)
    return data
