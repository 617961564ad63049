"""Benchmark: tokens/s, peak memory and MFU of the Megatron SFT step, per attention backend.

    # GPU (the issue's check): Qwen3-0.6B architecture, random weights, bf16
    python benchmarks/bench_train_step.py --hf-config ../shared/assets/qwen3-configs/Qwen3-0.6B.json \
        --bf16 --backends sdpa flex varlen --seq-lens 512 1024 2048 4096 --max-tokens-per-gpu 16384

    # CPU smoke run on the embedded tiny model
    python benchmarks/bench_train_step.py --hf-config slime/assets/tiny-qwen3/config.json --steps 2

Synthetic packed batches (lengths drawn around each --seq-lens value, 60% of each sample
supervised) go through the real actor step (DDP, optimizer, scheduler, megatron schedule), for
each attention backend x output-layer loss (plain logits, or the memory-lean chunked
cross-entropy). MFU = achieved FLOP/s / --peak-tflops with the actor's own FLOPs formula
(`slime.backends.megatron_utils.throughput.train_flops`, documented in docs/benchmarks.md).
Ratios are against sdpa with the plain loss, run in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time


def make_samples(rng: random.Random, vocab: int, mean_len: int, budget: int) -> list[dict]:
    out, used = [], 0
    while used < budget:
        n = max(16, int(rng.gauss(mean_len, mean_len / 4)))
        n = min(n, budget - used) if out else n
        if n < 16:
            break
        prompt = int(n * 0.4)
        out.append({"tokens": [rng.randrange(vocab) for _ in range(n)], "loss_mask": [1] * (n - prompt), "response_length": n - prompt})
        used += n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-config", required=True, help="a HF config.json (random weights of that shape)")
    ap.add_argument("--backends", nargs="+", default=["sdpa", "flex"])
    ap.add_argument("--losses", nargs="+", choices=("plain", "lean"), default=["plain", "lean"], help="output-layer loss paths")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256])
    ap.add_argument("--max-tokens-per-gpu", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting (after 2 warm-up steps)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak (H100 SXM dense bf16: 989)")
    ap.add_argument("--markdown-out", default=None)
    args = ap.parse_args()

    import torch

    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.loss_config import CrossEntropyConfig
    from slime.backends.megatron_utils.throughput import ThroughputConfig, train_flops
    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs

    with tempfile.TemporaryDirectory() as d:
        with open(args.hf_config) as f, open(os.path.join(d, "config.json"), "w") as g:
            g.write(f.read())
        model = ModelArgs(**hf_model_args(d))
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    header = f"model {args.hf_config} | {device} | {'bf16' if args.bf16 else 'fp32'} | torch {torch.__version__} | max tokens/micro-batch {args.max_tokens_per_gpu}"
    print(header)
    lines = ["| backend | loss | mean len | tokens/step | tokens/s | vs sdpa plain | peak mem GiB | MFU |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    base: dict[int, float] = {}
    settings = [(b, loss) for b in args.backends for loss in args.losses]
    for backend, loss in settings:
        if backend in ("flex", "varlen") and not cuda:
            print(f"(skipping {backend}: it trains on CUDA only)")
            continue
        actor = MegatronActor(
            model,
            ModelBuildArgs(bf16=args.bf16, attention_backend=backend),
            BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=args.max_tokens_per_gpu, calculate_per_token_loss=True),
            OptimizerArgs(lr=1e-5),
            TrainArgs(global_batch_size=1, total_steps=10_000),
            cross_entropy=CrossEntropyConfig(chunk_tokens=0 if loss == "plain" else CrossEntropyConfig().chunk_tokens),
            throughput=ThroughputConfig(peak_tflops=args.peak_tflops),
        )
        padded_vocab = model.padded_vocab_size(1)
        for mean_len in args.seq_lens:
            rng = random.Random(mean_len)
            batches = [make_samples(rng, model.vocab_size, mean_len, 4 * args.max_tokens_per_gpu) for _ in range(args.steps + 2)]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for b in batches[:2]:
                actor.train_step(b)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            flops = tokens = 0
            for b in batches[2:]:
                actor.train_step(b)
                lengths = [len(s["tokens"]) for s in b]
                flops += train_flops(model, lengths, padded_vocab)  # the actor's own MFU formula
                tokens += sum(lengths)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tps = tokens / dt
            base.setdefault(mean_len, tps) if (backend, loss) == ("sdpa", "plain") else None
            ratio = f"{tps / base[mean_len]:.2f}x" if mean_len in base else "n/a"
            mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "n/a"
            mfu = f"{100 * flops / dt / (args.peak_tflops * 1e12):.1f}%" if cuda else "n/a"
            row = f"| {backend} | {loss} | {mean_len} | {tokens // args.steps} | {tps:,.0f} | {ratio} | {mem} | {mfu} |"
            lines.append(row)
            print(row, flush=True)
        del actor
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(header + "\n\n" + "\n".join(lines) + "\n")
    print(json.dumps({"done": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
