"""Benchmark: peak memory of the output-layer loss, plain vs memory-lean, on CPU.

    python benchmarks/bench_memory.py                      # 8k tokens x 151,936 vocab, hidden 2048
    python benchmarks/bench_memory.py --tokens 1024        # quick look

Each path runs forward + backward of sft_loss's token loss (``-(log p(labels) * weights).sum()``)
from the final hidden states ``[tokens, hidden]`` and the output weight ``[vocab, hidden]``,
fp32, TP=1, through `log_probs.token_stats`: the plain path materialises the logits with the
output projection and runs megatron's vocab-parallel cross-entropy; the lean path gives an
`OutputHead` to `lean_ce` (chunks of ``--chunk-tokens``).

How memory is measured: each path runs in its own fresh process (nothing cached from the other).
After the inputs exist, the kernel's peak-RSS counter (VmHWM) is reset to the current RSS by
writing 5 to /proc/self/clear_refs; after the backward, peak = VmHWM - RSS at the reset. This
is exact (the kernel tracks every resident page, no sampling that could miss a short peak) and
counts everything the loss costs the machine: tensors, allocator slack, library scratch. It
includes the output weight's gradient (vocab x hidden fp32, 1.16 GiB here), which both paths
must produce. tracemalloc would see none of torch's tensors (it tracks Python's allocator
only) and polling psutil can miss the peak between samples.

Each child also writes the loss and gradients; the parent checks they agree (the hidden
states' gradient in full; the weight gradient's norm and the rows of the labels and of a
random sample of the vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(path: str, tokens: int, vocab: int, hidden: int, chunk: int, out: str) -> None:
    """One path in this process; writes peak bytes, time, loss and gradient samples to ``out``."""
    import torch

    from slime.backends.megatron_utils.log_probs import token_stats
    from slime.backends.megatron_utils.output_head import OutputHead
    from slime.backends.megatron_utils.parallel import destroy_parallel, init_parallel

    init_parallel()  # megatron's CE asks for the (size 1) TP group
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(vocab, hidden, generator=gen) * 0.02)
    h = (torch.randn(tokens, 1, hidden, generator=gen)).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    weights = (torch.rand(1, tokens, generator=gen) < 0.6).double() / tokens  # sft_loss-style per-token weights

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    if path == "plain":
        output = torch.matmul(h, layer.weight.t()).transpose(0, 1)  # what the model's output layer returns
    else:
        output = OutputHead(hidden=h, layer=layer)
    logp, _ = token_stats(output, labels, vocab, 0, chunk_tokens=chunk)
    loss = -(logp * weights.to(logp.dtype)).sum()
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - base) * 1024
    rows = torch.cat([labels[0, :256], torch.randint(0, vocab, (256,), generator=gen)])
    torch.save(
        {
            "peak_bytes": peak,
            "seconds": elapsed,
            "loss": loss.detach().item(),
            "grad_hidden": h.grad.clone(),
            "grad_weight_rows": layer.weight.grad[rows].clone(),
            "grad_weight_norm": float(layer.weight.grad.double().norm()),
            "grad_weight_bytes": layer.weight.grad.numel() * layer.weight.grad.element_size(),
        },
        out,
    )
    destroy_parallel()


def run_child(path: str, args, out: Path) -> dict:
    import torch

    cmd = [sys.executable, __file__, "--measure", path, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--chunk-tokens", str(args.chunk_tokens), "--out", str(out)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return torch.load(out, weights_only=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--chunk-tokens", type=int, default=None, help="lean chunk size (default: the flag's default)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--measure", choices=("plain", "lean"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chunk_tokens is None:
        from slime.backends.megatron_utils.lean_ce import DEFAULT_CHUNK_TOKENS

        args.chunk_tokens = DEFAULT_CHUNK_TOKENS
    if args.measure:
        measure(args.measure, args.tokens, args.vocab, args.hidden, args.chunk_tokens, args.out)
        return 0

    import torch

    print(
        f"output-layer loss, fp32 CPU, TP=1: {args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}, "
        f"lean chunk {args.chunk_tokens} tokens | torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as d:
        res = {p: run_child(p, args, Path(d) / f"{p}.pt") for p in ("plain", "lean")}
    plain, lean = res["plain"], res["lean"]
    logits_bytes = args.tokens * args.vocab * 4
    ratio = lean["peak_bytes"] / plain["peak_bytes"]
    rows = [
        ("plain", plain),
        ("lean", lean),
    ]
    print("| path | peak above inputs (GiB) | of which weight grad (GiB) | fwd+bwd (s) | loss |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r['peak_bytes'] / GIB:.2f} | {r['grad_weight_bytes'] / GIB:.2f} | {r['seconds']:.1f} | {r['loss']:.6f} |"
        )
    print(f"full fp32 logits of the micro-batch: {logits_bytes / GIB:.2f} GiB")
    print(f"lean / plain peak: {ratio:.3f} (target <= 0.25: {'MET' if ratio <= 0.25 else 'NOT MET'})")
    dh = (lean["grad_hidden"] - plain["grad_hidden"]).abs().max().item()
    dw = (lean["grad_weight_rows"] - plain["grad_weight_rows"]).abs().max().item()
    scale_h, scale_w = plain["grad_hidden"].abs().max().item(), plain["grad_weight_rows"].abs().max().item()
    dl = abs(lean["loss"] - plain["loss"])
    dn = abs(lean["grad_weight_norm"] - plain["grad_weight_norm"]) / plain["grad_weight_norm"]
    same = dl <= 1e-5 * abs(plain["loss"]) and dh <= 1e-4 * scale_h and dw <= 1e-4 * scale_w and dn <= 1e-5
    print(
        f"loss |diff| {dl:.2e}; grad hidden max |diff| {dh:.2e} (max |g| {scale_h:.2e}); grad weight rows max |diff| "
        f"{dw:.2e} (max |g| {scale_w:.2e}); grad weight norm rel diff {dn:.2e}: {'SAME' if same else 'DIFFERENT'}"
    )
    if args.json_out:
        summary = {
            k: {f: v for f, v in r.items() if not f.startswith("grad_") or f.endswith(("norm", "bytes"))}
            for k, r in res.items()
        }
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "ratio": ratio, "same": same, **summary}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
