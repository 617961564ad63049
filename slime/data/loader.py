"""Prepared data for a config: a cache hit opens a stored entry, a miss prepares and publishes one
(streamed in training order when the flags allow it, see `slime.data.stream`).

A hit costs a stat of the data and tokenizer files (their content hashes are remembered,
see `slime.data.cache`), mapping the arrays, and rebuilding the report; no tokenizer is
loaded and no row is read until a sample is asked for. The stored report keeps the
"nothing silent" rule: it is logged on every start, and a run without
``--skip-invalid-samples`` still stops on data that has invalid rows.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time

from slime.data import cache
from slime.data.config import SFTDataConfig
from slime.data.dataset import DataReport, PreparedData
from slime.data.prepare import prepare
from slime.data.readers import open_rows
from slime.data.store import StoreError, TokenStore
from slime.data.stream import StreamingData, start_streaming, whole_first_reason

logger = logging.getLogger(__name__)

__all__ = ["load_prepared", "open_entry"]

MAX_ERRORS = 20
_INDEX_ARRAYS = ("row_offsets", "row_lines")


def open_entry(entry: str, cfg: SFTDataConfig) -> PreparedData:
    """The samples stored in cache entry ``entry`` for ``cfg.prompt_data``."""
    store = TokenStore.open(entry)
    meta = store.meta
    report = DataReport.from_dict(meta["report"], path=cfg.prompt_data, lengths=store.lengths())
    if not cfg.skip_invalid:
        error = report.validation_error(complete=True, max_errors=MAX_ERRORS)
        if error is not None:
            raise error
    index = {name: store[name] for name in _INDEX_ARRAYS if name in store.arrays}
    source = open_rows(cfg.prompt_data, index=index or None)
    if len(source) != report.rows:
        raise StoreError(f"{entry}: the stored report has {report.rows} rows, {cfg.prompt_data} has {len(source)}")
    return PreparedData(source=source, keys=cfg.keys, store=store, report=report,
                        make_encoder=cfg.encoder_spec().build, content_hash=meta["content_hash"])


def _stat(path: str) -> list:
    paths = [path] if not os.path.isdir(path) else sorted(os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns)
    return [(p, cache.stat_signature(os.stat(p))) for p in paths]


def load_prepared(cfg: SFTDataConfig, progress: bool = True) -> PreparedData | StreamingData:
    """`PreparedData` for ``cfg``: from the token cache when possible, else prepared (and cached).

    On a miss with ``cfg.streaming`` (and nothing that needs every row first, see
    `slime.data.stream.whole_first_reason`) a `StreamingData` is returned as soon as every row
    passed the schema check; it is published to the cache when its preparation finishes.
    """
    path = cfg.prompt_data
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if cfg.cache_dir is None:
        return _prepare(cfg, open_rows(path), progress, store_dir=None, store_meta=None, publish=None)
    t0 = time.perf_counter()
    root = cfg.cache_dir
    key, desc = cache.cache_key(cfg, path, root)
    entry = cache.entry_dir(root, key)
    if os.path.isdir(entry):
        if cfg.overwrite_cache:
            logger.info("--overwrite-data-cache: rebuilding %s", entry)
            cache.discard(entry)
        else:
            try:
                data = open_entry(entry, cfg)
            except StoreError as e:
                logger.warning("data cache entry unusable, rebuilding it: %s", e)
                cache.discard(entry)
            else:
                r = data.report
                logger.info("data cache hit for %s: %s (%d samples, %d tokens) opened in %.2f s",
                            path, entry, r.samples, r.tokens, time.perf_counter() - t0)
                for line in r.summary_lines():
                    logger.info(line)
                return data
    logger.info("data cache miss for %s: preparing it into %s", path, entry)
    before = _stat(path)
    source = open_rows(path)
    tmp = cache.new_tmp_dir(root, key)
    try:
        return _prepare(cfg, source, progress, store_dir=tmp, store_meta={"key": key, "describe": desc},
                        publish=functools.partial(_publish, path=path, before=before, tmp=tmp, root=root, key=key))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prepare(cfg: SFTDataConfig, source, progress: bool, store_dir: str | None, store_meta: dict | None,
             publish) -> PreparedData | StreamingData:
    reason = whole_first_reason(cfg, len(source))
    if reason is None:
        abandon = functools.partial(shutil.rmtree, store_dir, True) if store_dir else None
        return start_streaming(cfg, source, store_dir=store_dir, store_meta=store_meta, publish=publish,
                               abandon=abandon, max_errors=MAX_ERRORS, progress=progress)
    if cfg.streaming:
        logger.info("preparing every row of %s before training: %s", source.path, reason)
    data = prepare(source, cfg.encoder_spec(), skip_invalid=cfg.skip_invalid, max_errors=MAX_ERRORS, progress=progress,
                   num_workers=cfg.num_workers, store_dir=store_dir, store_meta=store_meta)
    return publish(data) if publish is not None else data


def _publish(data: PreparedData, path: str, before: list, tmp: str, root: str, key: str) -> PreparedData:
    """Move a complete build into the cache (unless the file changed while it was read)."""
    if _stat(path) != before:
        # The rows may mix two versions of the file: use them for this run (the order of
        # events is the user's), but never publish them under the first version's key.
        logger.warning("%s changed while it was prepared; the result is not cached", path)
        import weakref

        weakref.finalize(data.store, shutil.rmtree, tmp, True)
        return data
    final = cache.commit(tmp, root, key)
    data.store = TokenStore.open(final)
    logger.info("data cache: wrote %s", final)
    return data
