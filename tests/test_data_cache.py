"""The token cache: a hit serves the same samples, report and fingerprint without a tokenizer;
any change to data, tokenizer or sample-changing flags misses; a killed build is never used."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY, TINY_DATA, load_tool, write_jsonl

from slime.data import cache
from slime.data.config import SFTDataConfig, build_data_source
from slime.data.dataset import DataValidationError, EncoderSpec
from slime.data.loader import load_prepared
from slime.utils.arguments import parse_args

ROWS = [json.loads(line) for line in TINY_DATA.read_text(encoding="utf-8").splitlines()][:24]
BAD = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", ROWS)


def config(path, root, **kw):
    return SFTDataConfig(prompt_data=str(path), hf_checkpoint=str(kw.pop("hf", TINY)), cache_dir=str(root), **kw)


def entries(root) -> list[str]:
    parent = os.path.join(root, f"v{cache.CACHE_VERSION}")
    return sorted(n for n in os.listdir(parent) if not n.startswith(".")) if os.path.isdir(parent) else []


def everything(source) -> list:
    return [(s.tokens, s.loss_mask, s.prompt, s.metadata, s.status, s.response_length)
            for s in (source.data.sample(k) for k in range(len(source)))]


def no_tokenizer(monkeypatch):
    def refuse(self):
        raise AssertionError("a cache hit loaded a tokenizer")

    monkeypatch.setattr(EncoderSpec, "build", refuse)


def test_hit_serves_the_same_samples_report_and_position(data, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    cold = build_data_source(config(data, root, shuffle=True), progress=False)
    assert len(entries(root)) == 1
    ref = everything(cold)
    cold.get_samples(10)
    state = cold.state_dict()
    no_tokenizer(monkeypatch)
    warm = build_data_source(config(data, root, shuffle=True), progress=False)
    assert everything(warm) == ref
    assert warm.data.report.summary_lines() == cold.data.report.summary_lines()
    assert warm.data.fingerprint() == cold.data.fingerprint()
    warm.load_state_dict(state)  # a restart resumes from the cached data
    assert [s.tokens for s in warm.get_samples(5)] == [s.tokens for s in cold.get_samples(5)]
    assert warm.data.store.directory == os.path.join(root, "v1", entries(root)[0])


def test_fingerprint_keeps_its_per_sample_definition(data, tmp_path):
    """Checkpoints written before the cache existed still resume: same hash over ids and masks."""
    source = build_data_source(config(data, tmp_path / "cache", policy="per-turn"), progress=False)
    d = source.data
    digest = hashlib.blake2b(digest_size=16)
    for k in range(len(d)):
        s = d.sample(k)
        digest.update(np.asarray(s.tokens, dtype=np.int32).tobytes())
        digest.update(np.asarray(s.full_loss_mask(), dtype=np.int8).tobytes())
    h = hashlib.sha256(digest.hexdigest().encode())
    lengths = [len(d.sample(k).tokens) for k in range(len(d))]
    for arr in (np.asarray(d.rows, np.int64), np.asarray(d.turns, np.int32), np.asarray(lengths, np.int64)):
        h.update(arr.tobytes())
    assert d.fingerprint() == h.hexdigest()[:16]


def test_sample_changing_inputs_miss_and_the_rest_hit(data, tmp_path):
    root = tmp_path / "cache"
    build_data_source(config(data, root), progress=False)
    # Order, skipping and worker flags do not change the samples: same entry.
    for kw in ({"shuffle": True, "seed": 3}, {"skip_invalid": True}, {"num_workers": 1}):
        build_data_source(config(data, root, **kw), progress=False)
    assert len(entries(root)) == 1
    changes = [{"policy": "per-turn"}, {"max_length": 300}, {"chat_template_kwargs": {"enable_thinking": False}}]
    for n, kw in enumerate(changes, start=2):
        build_data_source(config(data, root, **kw), progress=False)
        assert len(entries(root)) == n, kw
    tok = shutil.copytree(TINY, tmp_path / "tok")
    (tok / "chat_template.jinja").write_text((tok / "chat_template.jinja").read_text() + "\n")
    build_data_source(config(data, root, hf=tok), progress=False)
    assert len(entries(root)) == len(changes) + 2
    write_jsonl(data, ROWS + ROWS[:1])
    assert len(build_data_source(config(data, root), progress=False)) == len(ROWS) + 1
    assert len(entries(root)) == len(changes) + 3


def test_content_not_stat_decides(data, tmp_path):
    """Same size and mtime but new bytes: a miss. New mtime, same bytes: a hit."""
    root = tmp_path / "cache"
    first = everything(build_data_source(config(data, root), progress=False))
    st = os.stat(data)
    swapped = ROWS[1:2] + ROWS[:1] + ROWS[2:]
    write_jsonl(data, swapped)
    assert os.path.getsize(data) == st.st_size
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = everything(build_data_source(config(data, root), progress=False))
    assert len(entries(root)) == 2 and second[0][:3] == first[1][:3]  # rows 0 and 1 swapped
    os.utime(data, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    assert everything(build_data_source(config(data, root), progress=False)) == second
    assert len(entries(root)) == 2


def test_stored_report_still_stops_a_run_without_skipping(tmp_path):
    """Nothing silent through the cache: skipped rows stay counted, and stop a run that does not skip."""
    root = tmp_path / "cache"
    path = write_jsonl(tmp_path / "a.jsonl", ROWS[:5] + [BAD] + ROWS[5:8])
    kept = build_data_source(config(path, root, skip_invalid=True), progress=False)
    assert (kept.data.report.rows, kept.data.report.rows_invalid) == (9, 1)
    copy = shutil.copy(path, tmp_path / "b.jsonl")  # equal content shares the entry...
    with pytest.raises(DataValidationError) as e:
        build_data_source(config(copy, root), progress=False)
    assert f"{copy}: row 5 (line 6): field 'messages[1].role'" in str(e.value)  # ...but names its own file
    again = build_data_source(config(copy, root, skip_invalid=True), progress=False)
    assert len(entries(root)) == 1 and again.data.report.rows_invalid == 1
    assert any("1 invalid" in line for line in again.data.report.summary_lines())


CRASH = """
import os, signal, sys
from slime.data import store
from slime.data.config import SFTDataConfig, build_data_source

append = store.StoreWriter.append
def append_then_die(self, *args, **kwargs):
    append(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write, as an OOM kill or a preemption would
store.StoreWriter.append = append_then_die
build_data_source(SFTDataConfig(prompt_data=sys.argv[1], hf_checkpoint=sys.argv[2], cache_dir=sys.argv[3],
                                num_workers=1), progress=False)
"""


@pytest.mark.timeout(120)
def test_killed_build_is_never_used(data, tmp_path):
    root = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", USE_TORCH="0", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    proc = subprocess.run([sys.executable, "-c", CRASH, str(data), str(TINY), str(root)], env=env, check=False,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    parent = root / "v1"
    leftovers = [n for n in os.listdir(parent) if n.startswith(".tmp-")]
    assert len(leftovers) == 1 and (parent / leftovers[0] / "token_ids.bin").exists()
    assert entries(root) == []
    rebuilt = build_data_source(config(data, root), progress=False)
    fresh = build_data_source(SFTDataConfig(prompt_data=str(data), hf_checkpoint=str(TINY)), progress=False)
    assert everything(rebuilt) == everything(fresh)
    assert len(entries(root)) == 1
    assert not (parent / leftovers[0]).exists()  # the dead build's directory was swept


def test_damaged_entry_is_rebuilt(data, tmp_path, caplog):
    root = tmp_path / "cache"
    ref = everything(build_data_source(config(data, root), progress=False))
    entry = root / "v1" / entries(root)[0]
    with open(entry / "token_ids.bin", "r+b") as f:
        f.truncate(100)
    with caplog.at_level("WARNING"):
        again = build_data_source(config(data, root), progress=False)
    assert "unusable" in caplog.text and "token_ids.bin" in caplog.text
    assert everything(again) == ref


def test_overwrite_rebuilds(data, tmp_path):
    root = tmp_path / "cache"
    build_data_source(config(data, root), progress=False)
    marker = root / "v1" / entries(root)[0] / "marker"
    marker.write_text("old entry")
    build_data_source(config(data, root, overwrite_cache=True), progress=False)
    assert len(entries(root)) == 1 and not marker.exists()


def test_flags_and_default_location(tmp_path, monkeypatch):
    base = ["--hf-checkpoint", str(TINY), "--prompt-data", str(TINY_DATA)]
    cfg = SFTDataConfig.from_args(parse_args(base + ["--data-cache-dir", str(tmp_path), "--data-num-workers", "3"]))
    assert (cfg.cache_dir, cfg.num_workers, cfg.overwrite_cache) == (str(tmp_path), 3, False)
    assert SFTDataConfig.from_args(parse_args(base + ["--no-data-cache"])).cache_dir is None
    monkeypatch.setenv("SLIME_DATA_CACHE_DIR", str(tmp_path / "env"))
    assert SFTDataConfig.from_args(parse_args(base)).cache_dir == str(tmp_path / "env")
    monkeypatch.delenv("SLIME_DATA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == str(tmp_path / "xdg" / "slime" / "sft-data")
    with pytest.raises(SystemExit):
        parse_args(base + ["--data-num-workers", "0"])


def test_prepare_tool_builds_what_training_and_inspect_use(data, tmp_path, capsys, monkeypatch):
    root = tmp_path / "cache"
    flags = ["--hf-checkpoint", str(TINY), "--prompt-data", str(data), "--data-cache-dir", str(root),
             "--multi-turn-policy", "per-turn"]
    assert load_tool("prepare_sft_data").main(flags + ["--eval-prompt-data", "dev", str(TINY_DATA)]) == 0
    out = capsys.readouterr().out
    assert "train: " in out and "dev: " in out and f"-> {root}" in out
    assert len(entries(root)) == 2
    no_tokenizer(monkeypatch)
    args = parse_args(flags + ["--rollout-batch-size", "4"])
    data_source = build_data_source(SFTDataConfig.from_args(args), progress=False)  # what the RolloutManager does
    assert len(data_source) == len(load_prepared(config(data, root, policy="per-turn"), progress=False))
    assert len(entries(root)) == 2
