"""Streamed cold start: training reads samples while the rest is tokenized in the background,
with exactly the whole-first result (samples per rollout, cache files, report, resume state)."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import replace

import numpy as np
import pytest
from conftest import TINY, TINY_DATA, write_jsonl

from slime.data import cache
from slime.data.config import SFTDataConfig, build_data_source
from slime.data.dataset import DataValidationError, EncoderSpec, PreparedData, SFTEncoder
from slime.data.readers import open_rows
from slime.data.stream import StreamingData, ramp_ranges, start_streaming
from slime.utils.arguments import parse_args

ROWS = [json.loads(line) for line in TINY_DATA.read_text(encoding="utf-8").splitlines()]
BAD = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}
BATCH = 12


def config(path, root, **kw):
    return SFTDataConfig(prompt_data=str(path), hf_checkpoint=str(TINY), cache_dir=str(root), num_workers=1, **kw)


def cache_files(root) -> dict[str, bytes]:
    """Every file under the cache's entries, by path relative to its entry (no leftovers allowed)."""
    parent = os.path.join(root, f"v{cache.CACHE_VERSION}")
    out = {}
    for name in sorted(os.listdir(parent)):
        for d, _, files in os.walk(os.path.join(parent, name)):
            for f in files:
                full = os.path.join(d, f)
                with open(full, "rb") as fh:
                    out[os.path.relpath(full, parent)] = fh.read()
    return out


def leftovers(root) -> list[str]:
    parent = os.path.join(root, f"v{cache.CACHE_VERSION}")
    return sorted(os.listdir(parent)) if os.path.isdir(parent) else []


def rollouts(source, n: int) -> list:
    fields = ("index", "tokens", "loss_mask", "response_length", "metadata", "status")
    return [[tuple(getattr(s, f) for f in fields) for s in source.get_samples(BATCH)] for _ in range(n)]


class Gate:
    """Holds the background encoder after its first ``free`` rows until `open` (or a timeout)."""

    def __init__(self, monkeypatch, free: int):
        self.free, self.calls, self.event = free, 0, threading.Event()
        original = SFTEncoder.encode_row

        def encode_row(encoder, row):
            self.calls += 1
            if self.calls > self.free:
                assert self.event.wait(timeout=20), "the gate was never opened"
            return original(encoder, row)

        monkeypatch.setattr(SFTEncoder, "encode_row", encode_row)

    def open(self):
        self.event.set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("policy", "max_length"), [("per-turn", None), ("full", 300)])
def test_streamed_equals_whole_first(tmp_path, monkeypatch, policy, max_length):
    """Same samples in the same order for every rollout (over epochs), same cache files, report
    and resume state; the first rollout is served while most rows are not tokenized yet."""
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    cfg = config(path, tmp_path / "whole", policy=policy, max_length=max_length, shuffle=True, seed=3)
    whole = build_data_source(cfg, progress=False)
    assert isinstance(whole.data, PreparedData)
    num = 2 * len(whole) // BATCH + 1  # crosses two epoch ends
    ref = rollouts(whole, num)

    gate = Gate(monkeypatch, free=16)  # the first chunk only (`ramp_ranges`)
    streamed = build_data_source(replace(cfg, cache_dir=str(tmp_path / "streamed"), streaming=True), progress=False)
    assert isinstance(streamed.data, StreamingData) and len(streamed) == len(whole)
    position = streamed.position()
    first = rollouts(streamed, 1)
    assert not streamed.data.done and leftovers(tmp_path / "streamed")[0].startswith(".tmp-")  # nothing published yet
    assert streamed.data.summary_lines()[1].endswith("0 invalid (every row checked before training)")
    gate.open()
    got = first + rollouts(streamed, num - 1)
    assert got == ref
    assert streamed.state_dict(position) == replace_state(whole.state_dict(), epoch=0, offset=0)
    assert streamed.state_dict() == whole.state_dict()
    assert streamed.data.done and streamed.data.summary_lines() == whole.data.summary_lines()
    files = cache_files(tmp_path / "streamed")
    assert files == cache_files(tmp_path / "whole") and any(f.endswith("token_ids.bin") for f in files)

    def refuse(self):
        raise AssertionError("a cache hit loaded a tokenizer")

    monkeypatch.setattr(EncoderSpec, "build", refuse)  # the streamed build is a cache hit for the next start
    warm = build_data_source(replace(cfg, cache_dir=str(tmp_path / "streamed"), streaming=True), progress=False)
    assert isinstance(warm.data, PreparedData) and rollouts(warm, num) == ref


def replace_state(state: dict, **kw) -> dict:
    return {**state, **kw}


@pytest.mark.timeout(90)
def test_streamed_in_worker_processes(tmp_path):
    """Two spawned workers encode the rows in training order; the store equals the whole-first one."""
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    cfg = replace(config(path, tmp_path, policy="per-turn", shuffle=True), num_workers=2, cache_dir=None)
    whole = build_data_source(cfg, progress=False)
    data = start_streaming(cfg, open_rows(str(path)), chunk_rows=8, min_rows_per_worker=1, progress=False)
    try:
        assert data.workers == 2
        order = whole.next_indices(len(whole))
        assert [data.sample(k).tokens for k in order[:BATCH]] == [whole.data.sample(k).tokens for k in order[:BATCH]]
        done = data.wait()
        for name in ("token_ids", "loss_mask", "offsets", "rows", "turns", "truncated", "row_offsets", "row_lines"):
            assert np.array_equal(done.store[name], whole.data.store[name]), name
        assert done.content_hash == whole.data.content_hash and done.report.to_dict() == whole.data.report.to_dict()
    finally:
        data.close()


@pytest.mark.timeout(30)
def test_schema_errors_stop_before_training(tmp_path):
    """A row the schema rejects stops the start with file/row/field, as whole-first does; nothing starts."""
    rows = ROWS[:30] + [BAD] + ROWS[30:40]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = config(path, tmp_path / "cache", streaming=True)
    threads = threading.active_count()
    with pytest.raises(DataValidationError) as streamed:
        build_data_source(cfg, progress=False)
    assert "row 30 (line 31): field 'messages[1].role': unknown role 'bot'" in str(streamed.value)
    assert threading.active_count() == threads and leftovers(tmp_path / "cache") == []
    with pytest.raises(DataValidationError) as whole:
        build_data_source(replace(cfg, streaming=False), progress=False)
    assert str(streamed.value) == str(whole.value)


@pytest.mark.timeout(30)
def test_schema_error_seen_first_by_the_background_encoder(tmp_path, monkeypatch, caplog):
    """One sample per row: tokenizing starts while the schema pass runs. When the encoder meets
    the bad row first, the schema pass still reports it, and nothing is logged as a late error."""
    import time

    from slime.data import scan, stream

    path = write_jsonl(tmp_path / "data.jsonl", [BAD] + ROWS[:20])
    seen = threading.Event()
    original_events, original_parse = stream.chunk_events, scan.parse_row

    def chunk_events(*a):
        events = original_events(*a)
        if events:
            seen.set()  # the background thread holds the bad row's chunk
        return events

    def parse_row(row, keys):
        if row == BAD:
            assert seen.wait(timeout=20), "the background encoder never reached the bad row"
            time.sleep(0.3)  # time enough for a background thread that would not wait to report it
        return original_parse(row, keys)

    monkeypatch.setattr(stream, "chunk_events", chunk_events)
    monkeypatch.setattr(scan, "parse_row", parse_row)
    with caplog.at_level(logging.INFO), pytest.raises(DataValidationError) as err:
        build_data_source(config(path, tmp_path / "cache", streaming=True), progress=False)
    assert seen.is_set() and "row 0 (line 1): field 'messages[1].role'" in str(err.value)
    assert "found after training started" not in caplog.text and "found after training started" not in str(err.value)
    assert leftovers(tmp_path / "cache") == []
    assert not [t for t in threading.enumerate() if t.name == "slime-data-stream"]


@pytest.mark.timeout(60)
def test_rows_only_tokenizing_rejects_stop_the_run_loudly(tmp_path):
    """Samples left with no supervised token after truncation: whole-first stops before training;
    streamed stops at the next sample asked for (even one already prepared), naming the rows, and
    caches nothing."""
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    cfg = config(path, tmp_path / "cache", max_length=200, shuffle=True)
    with pytest.raises(DataValidationError) as whole:
        build_data_source(cfg, progress=False)
    expected = [line.strip() for line in str(whole.value).splitlines()[1:]]
    assert len(expected) == 16 and all("no supervised token left after truncation" in m for m in expected)

    source = build_data_source(replace(cfg, streaming=True), progress=False)  # the schema is fine: it starts
    k = source.next_indices(1)[0]
    with pytest.raises(DataValidationError) as late:
        source.data.wait()
    message = str(late.value)
    assert "found after training started" in message and "--skip-invalid-samples" in message
    named = [line.strip() for line in message.splitlines()[1:]]
    assert named and set(named) <= set(expected)  # the rows of the chunk where it was found, same messages
    with pytest.raises(DataValidationError):
        source.data.sample(k)
    assert leftovers(tmp_path / "cache") == []  # neither an entry nor a temporary directory


@pytest.mark.timeout(30)
def test_close_stops_and_discards_an_unfinished_build(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    gate = Gate(monkeypatch, free=16)
    source = build_data_source(config(path, tmp_path / "cache", streaming=True), progress=False)
    assert len(source.get_samples(4)) == 4
    gate.open()  # the running chunk finishes, then the thread sees the stop
    source.close()
    assert not source.data._thread.is_alive()
    with pytest.raises(RuntimeError, match="stopped before it finished"):
        source.data.sample(len(source) - 1)
    assert leftovers(tmp_path / "cache") == []


def test_fallbacks_and_flag(tmp_path, caplog):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS[:20] + [BAD])
    cfg = config(path, tmp_path / "cache", streaming=True, skip_invalid=True)
    with caplog.at_level(logging.INFO, logger="slime.data.loader"):
        source = build_data_source(cfg, progress=False)
    assert isinstance(source.data, PreparedData) and source.data.report.rows_invalid == 1
    assert "before training: --skip-invalid-samples" in caplog.text
    base = ["--prompt-data", str(path), "--hf-checkpoint", str(TINY)]
    assert SFTDataConfig.from_args(parse_args(base)).streaming is True
    assert SFTDataConfig.from_args(parse_args([*base, "--no-data-streaming"])).streaming is False


def test_ramp_ranges():
    assert ramp_ranges(100, 32) == [(0, 16), (16, 48), (48, 80), (80, 100)]
    assert ramp_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert ramp_ranges(0, 256) == []
