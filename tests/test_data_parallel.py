"""Parallel preparation gives exactly the serial result; progress is visible, also from a Ray actor."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, TINY, TINY_DATA, write_jsonl

from slime.data import parallel
from slime.data.config import SFTDataConfig
from slime.data.dataset import DataValidationError
from slime.data.prepare import prepare
from slime.data.progress import ProgressLog
from slime.data.readers import open_rows

ROWS = [json.loads(line) for line in TINY_DATA.read_text(encoding="utf-8").splitlines()]
BAD = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}
ARRAYS = ("token_ids", "loss_mask", "offsets", "rows", "turns", "truncated", "row_offsets", "row_lines")


def _mixed_rows():
    """Good rows, bad rows (skipped), and, with a max length, truncated and dropped samples."""
    rows = []
    for i, row in enumerate(ROWS[:40]):
        rows.append(row)
        if i % 9 == 4:
            rows.append(BAD)
    return rows


def _prepare(path, workers, **cfg):
    spec = SFTDataConfig(prompt_data=str(path), hf_checkpoint=str(TINY), **cfg).encoder_spec()
    return prepare(open_rows(str(path)), spec, skip_invalid=True, progress=False, num_workers=workers,
                   chunk_rows=5, min_rows_per_worker=1)


@pytest.mark.timeout(120)
def test_parallel_equals_serial(tmp_path):
    # per-turn has every per-sample case: several samples a row, turns, truncated and dropped
    # samples; with bad rows on top. The merge does not look at the policy.
    policy, max_length = "per-turn", 250
    path = write_jsonl(tmp_path / "data.jsonl", _mixed_rows())
    serial = _prepare(path, 1, policy=policy, max_length=max_length)
    par = _prepare(path, 2, policy=policy, max_length=max_length)
    for name in ARRAYS:
        assert np.array_equal(serial.store[name], par.store[name]), name
    assert serial.report.to_dict() == par.report.to_dict()
    assert serial.report.rows_invalid == 4
    assert serial.report.samples_truncated > 0 and serial.report.samples_dropped > 0
    assert serial.content_hash == par.content_hash and serial.fingerprint() == par.fingerprint()
    k = len(serial) // 2
    a, b = serial.sample(k), par.sample(k)
    assert (a.tokens, a.loss_mask, a.prompt, a.metadata) == (b.tokens, b.loss_mask, b.prompt, b.metadata)
    # The parallel result never loaded a tokenizer in this process; asking for it builds one.
    assert par._encoder is None and par.encoder.policy == policy


@pytest.mark.timeout(120)
def test_parallel_stops_with_the_serial_error(tmp_path):
    """Without skipping, both stop at the 20th bad row with the same message."""
    rows = [ROWS[0]] + [BAD] * 25 + ROWS[1:5]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    spec = SFTDataConfig(prompt_data=str(path), hf_checkpoint=str(TINY)).encoder_spec()
    errors = []
    for workers in (1, 2):
        with pytest.raises(DataValidationError) as e:
            prepare(open_rows(str(path)), spec, progress=False, num_workers=workers, chunk_rows=3, min_rows_per_worker=1)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert "20 invalid row(s)/sample(s)" in errors[0] and "stopped after 20 errors" in errors[0]
    assert f"{path}: row 1 (line 2): field 'messages[1].role'" in errors[0]


def test_worker_count_plan(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(parallel, "_cgroup_cpu_limit", lambda: None)
    assert parallel.usable_cpus() == 6
    monkeypatch.setattr(parallel, "_cgroup_cpu_limit", lambda: 3)
    assert parallel.usable_cpus() == 3
    assert parallel.plan_workers(None, 1_000_000) == 3
    assert parallel.plan_workers(8, 1_000_000) == 8
    assert parallel.plan_workers(8, 5000) == 2  # too few rows to pay for eight process starts
    assert parallel.plan_workers(4, 100) == 1
    with pytest.raises(ValueError, match="--data-num-workers"):
        parallel.plan_workers(0, 10)


def test_progress_lines_have_rate_eta_and_summary(caplog):
    now = [0.0]
    log = ProgressLog("preparing d.jsonl", total=2000, interval_s=10, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="slime.data.progress"):
        for t, rows in ((30, 100), (35, 500), (40, 500), (45, 900)):  # a slow start (workers starting), then fast
            now[0] = t
            log.update(rows, rows * 300)
        log.done()
    lines = [r.getMessage() for r in caplog.records]
    periodic = [line for line in lines if "ETA" in line]
    assert len(periodic) == 2  # at most one line per 10 s, none once everything is read
    assert "100/2,000 rows (5%), 3 rows/s, 1,000 tokens/s, elapsed 30s, ETA 9m30s" in periodic[0]
    # The rate is over the last interval, so the start-up does not inflate the ETA.
    assert "1,100/2,000 rows (55%), 100 rows/s, 30,000 tokens/s, elapsed 40s, ETA 9s" in periodic[1]
    assert "done, 2,000 rows in 45s (44 rows/s, 13,333 tokens/s)" in lines[-1]


DRIVER = """
import logging, sys
import ray

@ray.remote(num_cpus=0)
class Preparer:
    def run(self, path, hf):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from slime.data import progress
        from slime.data.config import SFTDataConfig
        from slime.data.prepare import prepare
        from slime.data.readers import open_rows

        progress.DEFAULT_INTERVAL_S = 0.0  # a line per chunk, so even tiny data shows rates
        spec = SFTDataConfig(prompt_data=path, hf_checkpoint=hf).encoder_spec()
        data = prepare(open_rows(path), spec, num_workers=2, chunk_rows=10, min_rows_per_worker=1)
        return len(data)

ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
         logging_level=logging.WARNING)
try:
    print("SAMPLES", ray.get(Preparer.remote().run.remote(sys.argv[1], sys.argv[2]), timeout=150), flush=True)
    sys.stdin.readline()  # Ray forwards actor output asynchronously: stay up until the test has read it
finally:
    ray.shutdown()
"""


@pytest.mark.timeout(200)
def test_progress_reaches_the_ray_driver(tmp_path):
    """Inside a Ray actor (spawned workers and all) the progress and summary land in the driver's output."""
    pytest.importorskip("ray")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(script), str(TINY_DATA), str(TINY)], env=env, cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    out, deadline = "", time.monotonic() + 170
    try:
        wanted = ("SAMPLES 80", "samples: 80 kept, 0 truncated")  # in either order
        while not all(w in out for w in wanted) and time.monotonic() < deadline and proc.poll() is None:
            try:
                out += lines.get(timeout=1)
            except queue.Empty:
                pass
    finally:
        proc.stdin.close()  # lets the driver shut Ray down
        proc.wait(timeout=60)
    assert "SAMPLES 80" in out, out[-3000:]
    assert "2 worker processes" in out
    assert "rows/s" in out and "ETA" in out
    assert "samples: 80 kept, 0 truncated" in out
    assert proc.returncode == 0
