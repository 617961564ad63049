"""Benchmark: SFT data preparation at corpus scale (parallel tokenization, token cache, warm start).

Synthesizes OpenHermes-2.5-shaped rows (an optional system prompt, one to three user/assistant
rounds, ~320 tokens median with the Qwen3 tokenizer), writes them as JSONL, then runs each
phase in its own subprocess so peak RSS is per phase:

    floor     HF ``apply_chat_template(messages, tokenize=True)`` one row at a time (no masks)
    serial    our cold prepare in one process (hash, validate, tokenize, masks, write the cache)
    parallel  the same with ``--workers`` processes (default: every usable core)
    warm      a cache hit: time to the first rollout batch, then one pass over every sample
    first-whole     cold start, shuffled, every row prepared first: time to the first rollout batch
    first-streamed  the same with data streaming (rows tokenized in training order in the
                    background): time to the first batch, and until the cache is complete

It checks that the serial and parallel caches are identical, that the streamed cache and
first batch equal the whole-first ones, and prints one table.

    python benchmarks/bench_data_prepare.py [--rows 20000] [--workers N] [--phases floor serial parallel warm ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED_TOKENIZER = os.path.normpath(os.path.join(REPO, "..", "shared", "assets", "qwen3-tokenizer"))
TINY_TOKENIZER = os.path.join(REPO, "slime", "assets", "tiny-qwen3")
PHASES = ("floor", "serial", "parallel", "warm", "first-whole", "first-streamed")

WORDS = ("the a of to and in is that for it as with was on be by this are or from at an which can have one "  # noqa: SIM905
         "you not we all use when their there been if more will would these two first other each some time "
         "model data function value system number example process result following step answer question "
         "python code list return import print error network energy cell equation solution protein market "
         "history language problem algorithm theorem probability matrix variable string integer customer "
         "approximately therefore however additionally significantly respectively").split()
SYMBOLS = ["x = 3", "f(x)", "2^n", "O(n log n)", "def solve():", "`print(x)`", "3.14", "100%", "e.g.", "i.e.",
           "**Note:**", "1.", "2.", "-", "(see above)", "$5", "km/h", "x_i", "Σ", "→"]


def _text(rng: random.Random, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    out, sent = [], []
    for _ in range(n):
        sent.append(rng.choice(SYMBOLS) if rng.random() < 0.06 else rng.choice(WORDS))
        if len(sent) > rng.randint(8, 22):
            out.append(" ".join(sent).capitalize() + ".")
            sent = []
    if sent:
        out.append(" ".join(sent).capitalize() + ".")
    return ("\n\n" if rng.random() < 0.3 else " ").join(out)


def make_row(rng: random.Random) -> dict:
    """One OpenHermes-like conversation in OpenAI messages form."""
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": _text(rng, 8, 30)})
    rounds = rng.choices([1, 2, 3], weights=[85, 10, 5])[0]
    for _ in range(rounds):
        msgs.append({"role": "user", "content": _text(rng, 10, 90 // rounds + 20)})
        msgs.append({"role": "assistant", "content": _text(rng, 40, 280 // rounds + 40)})
    return {"messages": msgs}


def write_rows(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(make_row(rng), ensure_ascii=False) + "\n" for _ in range(n))


class ChildPeaks:
    """Peak RSS (VmHWM) of each child process, sampled: getrusage's RUSAGE_CHILDREN counts the
    parent's size at fork into a spawned child, so workers are read from /proc instead."""

    def __init__(self, every_s: float = 0.2):
        import threading

        self.peaks: dict[int, float] = {}
        self.cpu: dict[int, float] = {}  # last seen CPU seconds of each child
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _children(self) -> list[int]:
        pids = []
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/children", encoding="ascii") as f:
                    pids += [int(p) for p in f.read().split()]
            except OSError:
                pass
        return pids

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for pid in self._children():
                try:
                    with open(f"/proc/{pid}/status", encoding="ascii") as f:
                        hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
                except OSError:
                    continue
                self.peaks[pid] = max(self.peaks.get(pid, 0), hwm / 1024)
                try:
                    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    self.cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                except (OSError, IndexError, ValueError):
                    pass

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peaks.values(), default=0.0)


def _rss_mb() -> dict:
    """Peak RSS of this process and its current anon / file-backed split."""
    out = {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    return out


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _config(a, cache_dir: str, workers: int, data: str | None = None, **kw):
    from slime.data.config import SFTDataConfig

    return SFTDataConfig(prompt_data=data or a.data, hf_checkpoint=a.tokenizer, num_workers=workers, cache_dir=cache_dir,
                         **kw)


def run_phase(a) -> dict:
    """One phase, in this (fresh) process; returns its measurements."""
    t0, cpu0 = time.perf_counter(), _cpu_s()
    res: dict = {}
    children = ChildPeaks()
    if a.phase == "floor":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.tokenizer)
        t_start = time.perf_counter()
        rows = tokens = 0
        with open(a.data, encoding="utf-8") as f:
            for line in f:
                tokens += len(tok.apply_chat_template(json.loads(line)["messages"], tokenize=True))
                rows += 1
        res.update(rows=rows, samples=rows, tokens=tokens, loop_s=time.perf_counter() - t_start)
    elif a.phase in ("serial", "parallel"):
        from slime.data.loader import load_prepared

        workers = 1 if a.phase == "serial" else a.workers
        data = load_prepared(_config(a, a.cache, workers), progress=False)
        res.update(rows=data.report.rows, samples=len(data), tokens=data.report.tokens, entry=data.store.directory,
                   fingerprint=data.fingerprint())
    elif a.phase == "warm":
        from slime.data.data_source import SFTDataSource
        from slime.data.loader import load_prepared

        data = load_prepared(_config(a, a.cache, a.workers), progress=False)
        opened = time.perf_counter() - t0
        source = SFTDataSource(data, shuffle=True, seed=1)
        source.state_dict()  # the RolloutManager records the position (and fingerprint) first
        first = source.get_samples(a.batch)
        res["first_batch_s"] = time.perf_counter() - t0
        res["open_s"] = opened
        res["rss_at_first_batch"] = _rss_mb()
        assert first and first[0].tokens
        t_pass, tokens, n = time.perf_counter(), 0, 0
        limit = min(len(source), a.pass_limit or len(source))
        while n < limit:  # shuffled order: pages of the token file are touched all over
            batch = source.get_samples(min(a.batch * 8, limit - n))
            tokens += sum(len(s.tokens) for s in batch)
            n += len(batch)
        res.update(rows=data.report.rows, samples=len(data), tokens=data.report.tokens, pass_samples=n,
                   pass_tokens=tokens, pass_s=time.perf_counter() - t_pass, fingerprint=data.fingerprint())
    elif a.phase.startswith("first-"):
        import hashlib

        from slime.data.data_source import SFTDataSource
        from slime.data.loader import load_prepared

        streamed = a.phase == "first-streamed"
        data = load_prepared(_config(a, a.cache, a.workers, shuffle=True, seed=1, streaming=streamed), progress=False)
        source = SFTDataSource(data, shuffle=True, seed=1)
        first = source.get_samples(a.batch)
        res["first_batch_s"] = time.perf_counter() - t0
        res["rss_at_first_batch"] = _rss_mb()
        h = hashlib.sha256()
        for sample in first:
            h.update(json.dumps([sample.tokens, sample.loss_mask]).encode())
        done = data.wait() if streamed else data
        res["complete_s"] = time.perf_counter() - t0
        res.update(rows=done.report.rows, samples=len(done), tokens=done.report.tokens, entry=done.store.directory,
                   fingerprint=done.fingerprint(), first_batch=h.hexdigest())
    res["wall_s"] = time.perf_counter() - t0
    res["cpu_s"] = _cpu_s() - cpu0
    res["rss"] = _rss_mb()
    res["rss"]["child_peak_mb"] = children.stop()
    own = resource.getrusage(resource.RUSAGE_SELF)
    res["main_cpu_s"] = own.ru_utime + own.ru_stime - cpu0  # children's CPU is in cpu_s too
    res["worker_cpu_s"] = sorted(children.cpu.values(), reverse=True)
    return res


def _subprocess(a, phase: str, data: str | None = None, cache_dir: str | None = None) -> dict:
    cache_dir = cache_dir or os.path.join(a.work, phase if phase != "warm" else "parallel")
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--data", data or a.data, "--tokenizer", a.tokenizer,
           "--cache", cache_dir, "--workers", str(a.workers),
           "--batch", str(a.batch), "--pass-limit", str(a.pass_limit or 0)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"phase {phase} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tiled_entry(a, base_entry: str, tiles: int) -> tuple[str, str]:
    """(data file, cache root) for the benchmark rows repeated ``tiles`` times, with its cache entry.

    A file whose rows repeat tokenizes to repeated arrays, so the entry assembled here from
    ``base_entry`` is the one a cold build of the bigger file would write (same arrays, report
    counts, row index and content hash; `main` spot-checks samples against the tokenizer). It
    lets the warm path be measured at a million rows without a cold build of ~20 CPU-minutes.
    """
    import hashlib

    import numpy as np

    from slime.data import cache
    from slime.data.readers import JsonlRows
    from slime.data.store import StoreWriter, TokenStore

    big = a.data.replace(".jsonl", f"_x{tiles}.jsonl")
    with open(a.data, "rb") as src:
        block = src.read()
    with open(big, "wb") as f:
        f.writelines(block for _ in range(tiles))
    root = os.path.join(a.work, f"scaled_x{tiles}")
    key, desc = cache.cache_key(_config(a, root, a.workers, data=big), big, root)
    base = TokenStore.open(base_entry)
    report = dict(base.meta["report"])
    for name in ("rows", "rows_invalid", "samples", "samples_truncated", "samples_dropped", "tokens",
                 "supervised_tokens", "boundary_straddles"):
        report[name] *= tiles
    report["error_fields"] = {k: v * tiles for k, v in report["error_fields"].items()}
    tmp = cache.new_tmp_dir(root, key)
    writer = StoreWriter(tmp)
    offsets = base["offsets"]
    ids = memoryview(np.ascontiguousarray(base["token_ids"])).cast("B")
    mask = memoryview(np.ascontiguousarray(base["loss_mask"])).cast("B")
    digest = hashlib.blake2b(digest_size=16)
    for t in range(tiles):
        writer.append(base["token_ids"], base["loss_mask"], base.lengths(), base["rows"] + t * base.meta["report"]["rows"],
                      base["turns"], base["truncated"])
        for k in range(len(base)):
            lo, hi = int(offsets[k]), int(offsets[k + 1])
            digest.update(ids[4 * lo : 4 * hi])
            digest.update(mask[lo:hi])
    for name, arr in JsonlRows(big).index_arrays().items():
        writer.add_array(name, arr)
    writer.close({"key": key, "describe": desc, "report": report, "content_hash": digest.hexdigest()})
    cache.commit(tmp, root, key)
    return big, root


def _spot_check(a, data_path: str, root: str, n: int = 5) -> bool:
    """A few samples of a (tiled) entry equal what the tokenizer makes of their rows now."""
    import random as _random

    from slime.data.loader import load_prepared

    cfg = _config(a, root, 1, data=data_path)
    data = load_prepared(cfg, progress=False)
    encoder = cfg.encoder_spec().build()
    rng = _random.Random(0)
    for k in rng.sample(range(len(data)), n):
        s = data.sample(k)
        _, (enc,) = encoder.encode_row(data.source[s.metadata["row_index"]])
        if enc.token_ids != s.tokens or enc.loss_mask != s.full_loss_mask():
            return False
    return True


def _same_store(a_dir: str, b_dir: str) -> bool:
    import numpy as np

    from slime.data.store import TokenStore

    a, b = TokenStore.open(a_dir), TokenStore.open(b_dir)
    return a.arrays.keys() == b.arrays.keys() and all(np.array_equal(a[k], b[k]) for k in a.arrays)


def _same_files(a_dir: str, b_dir: str) -> bool:
    """Byte-identical directories (every file of a cache entry, meta.json included)."""
    names = sorted(os.listdir(a_dir))
    if names != sorted(os.listdir(b_dir)):
        return False
    for name in names:
        with open(os.path.join(a_dir, name), "rb") as fa, open(os.path.join(b_dir, name), "rb") as fb:
            if fa.read() != fb.read():
                return False
    return True


def _notes(a, phase: str, r: dict, results: dict) -> str:
    if phase == "floor":
        return f"per-row loop alone {r['rows'] / r['loop_s']:,.0f} rows/s"
    if phase == "parallel" and "serial" in results:
        # On a shared machine wall time depends on other jobs; the CPU split says what idle
        # cores would give: at most the parent's work plus the busiest worker's.
        serial = results["serial"]
        bound = r["main_cpu_s"] + (r["worker_cpu_s"] or [0.0])[0]
        return (f"{serial['wall_s'] / r['wall_s']:.2f}x serial wall (target >= {0.8 * a.workers:.1f}x). CPU: parent "
                f"{r['main_cpu_s']:.1f} s, workers {', '.join(f'{c:.1f}' for c in r['worker_cpu_s'])} s: on idle "
                f"cores <= {bound:.1f} s, {serial['cpu_s'] / bound:.2f}x the serial run's {serial['cpu_s']:.1f} CPU s")
    if phase == "first-whole":
        return f"first batch of {a.batch} after {r['first_batch_s']:.2f} s (every row prepared first)"
    if phase == "first-streamed":
        whole = results.get("first-whole")
        ratio = f", {whole['first_batch_s'] / r['first_batch_s']:.1f}x sooner than whole-first" if whole else ""
        return (f"first batch of {a.batch} after {r['first_batch_s']:.2f} s{ratio}; cache complete after "
                f"{r['complete_s']:.2f} s" + (f" ({r['complete_s'] / whole['complete_s']:.2f}x whole-first)" if whole else ""))
    if phase.startswith("warm"):
        at = r["rss_at_first_batch"]
        return (f"{r['samples']:,} samples: first batch of {a.batch} after {r['first_batch_s']:.2f} s (cache opened in "
                f"{r['open_s']:.2f} s, peak RSS then {at['peak_mb']:.0f} MB); then {r['pass_samples']:,} samples in "
                f"shuffled order in {r['pass_s']:.1f} s; RSS after: anon {r['rss'].get('RssAnon', 0):.0f} MB + "
                f"file-backed {r['rss'].get('RssFile', 0):.0f} MB")
    return ""


def table(a, results: dict) -> list[str]:
    lines = ["| phase | wall s | rows/s | tokens/s | CPU s | peak RSS MB (main / largest worker) | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for phase, r in results.items():
        rps, tps = r["rows"] / r["wall_s"], r["tokens"] / r["wall_s"]
        if phase.startswith("warm"):  # the rate that matters: samples served once open
            rps, tps = r["pass_samples"] / r["pass_s"], r["pass_tokens"] / r["pass_s"]
        child = f" / {r['rss']['child_peak_mb']:.0f}" if phase == "parallel" else ""
        lines.append(f"| {phase} | {r['wall_s']:.2f} | {rps:,.0f} | {tps:,.0f} | {r['cpu_s']:.1f} | "
                     f"{r['rss']['peak_mb']:.0f}{child} | {_notes(a, phase, r, results)} |")
    return lines


def verdicts(a, results: dict) -> list[str]:
    out = []
    if "serial" in results and "parallel" in results:
        same = results["serial"]["fingerprint"] == results["parallel"]["fingerprint"] and _same_store(
            results["serial"]["entry"], results["parallel"]["entry"])
        out.append("serial == parallel cache (every array, fingerprint): " + ("OK" if same else "FAIL"))
    if "warm" in results and "parallel" in results:
        ok = results["warm"]["fingerprint"] == results["parallel"]["fingerprint"]
        out.append("warm fingerprint == cold: " + ("OK" if ok else "FAIL"))
    if "first-whole" in results and "first-streamed" in results:
        w, st = results["first-whole"], results["first-streamed"]
        same = (w["first_batch"] == st["first_batch"] and w["fingerprint"] == st["fingerprint"]
                and _same_files(w["entry"], st["entry"]))
        out.append("streamed == whole-first (first batch, fingerprint, every cache file byte for byte): "
                   + ("OK" if same else "FAIL"))
    for phase, r in results.items():
        if phase.startswith("warm x"):
            out.append(f"{phase}: tiled entry samples == tokenizer on their rows (spot check): "
                       + ("OK" if r["spot_check"] else "FAIL"))
            out.append(f"{phase}: first batch {r['first_batch_s']:.2f} s (target < 10 s), peak RSS "
                       f"{r['rss_at_first_batch']['peak_mb']:.0f} MB at first batch (target < 1536 MB)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--tokenizer", default=None, help="default: ../shared Qwen3 tokenizer, else the embedded tiny-qwen3")
    ap.add_argument("--workers", type=int, default=None, help="parallel phase processes (default: usable cores)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--batch", type=int, default=128, help="rollout batch size of the warm phase")
    ap.add_argument("--pass-limit", type=int, default=0, help="warm phase: samples served after the first batch (0 = all)")
    ap.add_argument("--scale-warm", type=int, default=0, metavar="N",
                    help="also measure the warm start on the rows repeated N times (entry assembled, see tiled_entry)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each phase, interleaved; the fastest is reported")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--markdown-out", default=None)
    # internal: one phase in this process
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        print(json.dumps(run_phase(a)))
        return 0

    from slime.data.parallel import usable_cpus

    note = ""
    if a.tokenizer is None:
        a.tokenizer = SHARED_TOKENIZER if os.path.isdir(SHARED_TOKENIZER) else TINY_TOKENIZER
        note = "" if a.tokenizer == SHARED_TOKENIZER else " (shared Qwen3 tokenizer absent: embedded tiny-qwen3)"
    a.workers = a.workers or usable_cpus()
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        a.work = tmp.name
    os.makedirs(a.work, exist_ok=True)
    a.data = os.path.join(a.work, f"openhermes_like_{a.rows}.jsonl")
    if not os.path.exists(a.data):
        write_rows(a.data, a.rows)
    size_mb = os.path.getsize(a.data) / 2**20
    header = (f"rows={a.rows} ({size_mb:.0f} MB JSONL) | tokenizer `{a.tokenizer}`{note} | workers={a.workers} | "
              f"usable cores={usable_cpus()} | repeats={a.repeats} (best wall) | load average before: "
              f"{os.getloadavg()[0]:.1f} | python {sys.version.split()[0]}")
    print(header, flush=True)
    results: dict[str, dict] = {}
    for rep in range(a.repeats):  # interleaved, so load from other jobs hits every phase alike; best wall kept
        for phase in a.phases:
            if phase in ("serial", "parallel", "first-whole", "first-streamed"):
                shutil.rmtree(os.path.join(a.work, phase), ignore_errors=True)  # cold means cold
            r = _subprocess(a, phase)
            print(f"  run {rep + 1}/{a.repeats} {phase}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU", flush=True)
            if phase not in results or r["wall_s"] < results[phase]["wall_s"]:
                results[phase] = r

    if a.scale_warm > 1:
        base = (results.get("parallel") or results.get("serial") or {}).get("entry")
        if base is None:
            raise SystemExit("--scale-warm needs the serial or parallel phase")
        big, root = tiled_entry(a, base, a.scale_warm)
        r = _subprocess(a, "warm", data=big, cache_dir=root)
        r["spot_check"] = _spot_check(a, big, root)
        results[f"warm x{a.scale_warm}"] = r
        print(f"  warm x{a.scale_warm}: {r['wall_s']:.1f} s wall", flush=True)
    lines = table(a, results)
    verdict = verdicts(a, results)
    print("\n".join(lines + [""] + verdict))
    if a.markdown_out:
        with open(a.markdown_out, "w", encoding="utf-8") as f:
            f.write(header + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(verdict) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all("FAIL" not in v for v in verdict) else 1


if __name__ == "__main__":
    sys.exit(main())
