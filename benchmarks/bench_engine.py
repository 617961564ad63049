"""Benchmark: generated tokens/s of the CPU engine against plain ``transformers.generate``.

    # the embedded tiny Qwen3 (default): 32 prompts x 64 new tokens, greedy
    python benchmarks/bench_engine.py

    # Qwen3-0.6B's shape with random weights (needs ../shared/assets for config and tokenizer)
    python benchmarks/bench_engine.py --hf-config ../shared/assets/qwen3-configs/Qwen3-0.6B.json \
        --tokenizer ../shared/assets/qwen3-tokenizer --prompts 16 --new-tokens 32

The same seeded prompts (token ids of varied length) go through (a) ``model.generate`` one
prompt at a time, (b) ``model.generate`` on the whole batch with left padding, (c) our engine
with every prompt sent concurrently over HTTP, and (d) the same engine called in-process (to
show the HTTP share). All runs are greedy with exactly ``--new-tokens`` tokens per prompt
(EOS ignored), so every method produces the same amount of work; the table also says how
many outputs equal the one-at-a-time run's (greedy decoding is deterministic, so all should).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slime", "assets", "tiny-qwen3")


def make_model_dir(hf_config: str | None, tokenizer: str, out: str) -> str:
    """``TINY`` itself, or ``out`` with random weights of ``hf_config``'s shape plus ``tokenizer``'s files."""
    if hf_config is None:
        return TINY
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copy(hf_config, os.path.join(out, "config.json"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32).save_pretrained(out)
    for name in os.listdir(tokenizer):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(os.path.join(tokenizer, name), out)
    return out


def make_prompts(n: int, vocab: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def run_sequential(model, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    import torch

    outs = []
    t = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            outs.append(g[0, len(p) :].tolist())
    return time.perf_counter() - t, outs


def run_batched(model, prompts, new_tokens: int, pad_id: int = 0) -> tuple[float, list[list[int]]]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        g = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
    return time.perf_counter() - t, [row[width:].tolist() for row in g]


async def _post_all(url: str, prompts, new_tokens: int) -> list[dict]:
    import aiohttp

    sp = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:

        async def one(p):
            async with session.post(url + "/generate", json={"input_ids": p, "sampling_params": sp}) as r:
                r.raise_for_status()
                return await r.json()

        return await asyncio.gather(*(one(p) for p in prompts))


def run_engine_http(url: str, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    t = time.perf_counter()
    results = asyncio.run(_post_all(url, prompts, new_tokens))
    return time.perf_counter() - t, [r["output_ids"] for r in results]


def run_engine_inprocess(engine, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    sp = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    t = time.perf_counter()
    futures = [engine.submit(input_ids=p, sampling_params=sp) for p in prompts]
    outs = [f.result()["output_ids"] for f in futures]
    return time.perf_counter() - t, outs


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


class Table:
    """Prints each row as soon as it is measured; ratios and output equality against the first row."""

    def __init__(self, total_tokens: int, new_tokens: int):
        self.total, self.new_tokens, self.ref = total_tokens, new_tokens, None

    def add(self, name: str, seconds: float, outs: list[list[int]]) -> None:
        assert all(len(o) == self.new_tokens for o in outs), f"{name}: wrong output lengths"
        if self.ref is None:
            self.ref = (name[:3], seconds, outs)
            print(f"\n| method | wall s | generated tokens | tokens/s | vs {name[:3]} | outputs equal to {name[:3]} |")
            print("|---|---:|---:|---:|---:|---:|")
        ref_name, ref_time, ref_out = self.ref
        same = sum(o == r for o, r in zip(outs, ref_out))
        print(f"| {name} | {seconds:.2f} | {self.total} | {_rate(self.total / seconds)} | {ref_time / seconds:.2f}x | {same}/{len(outs)} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-config", default=None, help="a HF config.json: random weights of that shape (default: the tiny checkpoint)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir for --hf-config (default: the tiny one)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-prompt-len", type=int, default=16)
    ap.add_argument("--max-prompt-len", type=int, default=96)
    ap.add_argument("--max-running-requests", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-sequential", action="store_true", help="skip (a) for big models")
    ap.add_argument("--skip-inprocess", action="store_true", help="skip (d)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from slime.engines.config import EngineConfig
    from slime.engines.http_server import get_server, launch_server, shutdown_server

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir(args.hf_config, args.tokenizer or TINY, tmp)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        vocab = model.config.vocab_size
        prompts = make_prompts(args.prompts, vocab, args.min_prompt_len, args.max_prompt_len, args.seed)
        print(
            f"model {args.hf_config or TINY} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | fp32 | "
            f"torch {torch.__version__} | {torch.get_num_threads()} threads | {args.prompts} prompts "
            f"({args.min_prompt_len}-{args.max_prompt_len} tokens) x {args.new_tokens} new tokens, greedy",
            flush=True,
        )
        run_batched(model, prompts[:2], 2)  # warm-up

        table = Table(args.prompts * args.new_tokens, args.new_tokens)
        if not args.skip_sequential:
            table.add("(a) transformers.generate, one prompt at a time", *run_sequential(model, prompts, args.new_tokens))
        table.add("(b) transformers.generate, batched, left padding", *run_batched(model, prompts, args.new_tokens))
        del model  # the engine loads its own copy
        url = launch_server(EngineConfig(model_path=path, max_running_requests=args.max_running_requests, max_prefill_per_step=args.max_running_requests))
        try:
            engine = get_server(url).engine
            engine.generate(input_ids=prompts[0], sampling_params={"max_new_tokens": 2})  # warm-up
            engine.flush_cache()
            table.add("(c) CPU engine, all prompts concurrent over HTTP", *run_engine_http(url, prompts, args.new_tokens))
            if not args.skip_inprocess:
                engine.flush_cache()
                table.add("(d) CPU engine, in-process submit (no HTTP)", *run_engine_inprocess(engine, prompts, args.new_tokens))
            stats = engine.load()
        finally:
            shutdown_server(url)
    print(f"\nengine: {stats['decode_steps']} decode steps, mean batch {stats['decode_rows'] / max(1, stats['decode_steps']):.1f} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
