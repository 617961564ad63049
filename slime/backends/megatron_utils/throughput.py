"""Training throughput in the units users compare: tokens/s per GPU, model TFLOP/s per GPU, MFU.

Model FLOPs follow Megatron-LM's count (every GEMM of the forward pass, times 3 for the two
backward GEMMs; causal attention counts half the score matrix), per packed sample: the
attention term of a token uses its own sample's length, since packed samples never attend to
each other. For a micro-batch of one sequence it equals Megatron-LM's formula. Recomputation
(activation recompute, the lean cross-entropy's second logits GEMM) is not model FLOPs, so it
lowers MFU rather than inflating it. The formula is written out in docs/benchmarks.md.

Peak FLOP/s: ``--peak-tflops`` if given, else the dense bf16 tensor-core peak of the CUDA
device by name (table below) for --bf16 runs; otherwise MFU is not reported (CPU, fp32).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from slime.backends.megatron_utils.model_config import ModelArgs

__all__ = ["PEAK_BF16_TFLOPS", "ThroughputConfig", "add_throughput_arguments", "device_peak_tflops", "train_flops"]

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, matched in order as
# substrings of torch.cuda.get_device_name(): the PCIe/NVL H100 variants before plain "H100"
# (the SXM part's name is "NVIDIA H100 80GB HBM3").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


def add_throughput_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("throughput metrics")
    g.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s of one device for the MFU metric (default: the bf16 dense peak of a known CUDA GPU "
        "under --bf16; no MFU otherwise)",
    )
    return parser


@dataclass(frozen=True)
class ThroughputConfig:
    """peak_tflops: one device's peak for MFU; None = from the device table (CUDA + bf16) or no MFU."""

    peak_tflops: float | None = None

    def __post_init__(self):
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"--peak-tflops must be > 0, got {self.peak_tflops}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ThroughputConfig:
        return cls(peak_tflops=args.peak_tflops)

    def peak_flops(self, bf16: bool) -> float | None:
        """FLOP/s of one device to divide by, or None when unknown."""
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        tflops = device_peak_tflops() if bf16 else None
        return None if tflops is None else tflops * 1e12


def device_peak_tflops(name: str | None = None) -> float | None:
    """The table's bf16 peak for a CUDA device name (the current device's when None)."""
    if name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def train_flops(model: ModelArgs, sample_lengths: list[int], padded_vocab_size: int) -> float:
    """Model FLOPs of forward + backward over packed samples of these lengths (see module doc)."""
    h, d = model.hidden_size, model.kv_channels
    heads, groups = model.num_attention_heads, model.num_query_groups
    gemms_per_mlp = 3 if model.swiglu else 2  # gate, up, down vs up, down
    attn_proj = 2 * h * d * (2 * heads + 2 * groups)  # q, o: heads*d each; k, v: groups*d each
    dense_mlp = 2 * gemms_per_mlp * h * model.ffn_hidden_size
    per_token_layers = 0.0
    for is_moe in model.moe_pattern():
        mlp = dense_mlp
        if is_moe:
            mlp = 2 * gemms_per_mlp * h * (model.moe_ffn_hidden_size or model.ffn_hidden_size) * model.moe_router_topk
            if model.moe_shared_expert_intermediate_size:
                mlp += 2 * gemms_per_mlp * h * model.moe_shared_expert_intermediate_size
        per_token_layers += attn_proj + mlp
    forward = 0.0
    for n in sample_lengths:
        # causal scores q.k and p.v: 2 GEMMs of n*n/2 dot products of length d per head
        attention = model.num_layers * 2 * 2 * heads * d * n * n / 2
        forward += n * (per_token_layers + 2 * h * padded_vocab_size) + attention
    return 3.0 * forward
