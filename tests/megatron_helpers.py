"""Tiny HF checkpoints of each supported family, written on demand (random init)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen3", "qwen2", "llama")


def make_hf_checkpoint(family: str, out: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    if family == "qwen3":
        cfg, cls = Qwen3Config(**common, head_dim=24, rope_theta=1e6, tie_word_embeddings=True), Qwen3ForCausalLM
    elif family == "qwen2":
        cfg, cls = Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=False), Qwen2ForCausalLM
    elif family == "llama":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
        cfg = LlamaConfig(**common, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=False)
        cls = LlamaForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    with torch.no_grad():  # non-trivial norms so a swapped norm weight cannot go unnoticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return out
