"""Write a tiny random Qwen3-MoE (or Qwen2-MoE) HF checkpoint, for tests and CPU smoke runs.

    python tools/make_tiny_qwen3_moe.py OUT_DIR [--family qwen3_moe|qwen2_moe] [--seed 0]

The shape is Qwen3-30B-A3B's scaled down (2 layers, 8 experts, top-2, ``norm_topk_prob``,
GQA with q/k norms, untied output layer); ``qwen2_moe`` adds Qwen2-MoE's gated shared expert,
q/k/v biases, no top-k renormalization and a dense first layer (``mlp_only_layers``). The
tokenizer is the embedded tiny Qwen3 one (``slime/assets/tiny-qwen3``), so the checkpoint
trains on ``slime/assets/tiny_sft.jsonl`` as is. Nothing is committed: tests write it into a
temporary directory (under a second, about 0.3M parameters).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = ROOT / "slime" / "assets" / "tiny-qwen3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
FAMILIES = ("qwen3_moe", "qwen2_moe")


def tiny_moe_config(family: str, vocab_size: int, **overrides):
    """A transformers config of the family, Qwen3-30B-A3B's layout at toy size."""
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,  # dense layers (mlp_only_layers)
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "qwen3_moe":
        cfg = dict(common, head_dim=16, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        return Qwen3MoeConfig(**{**cfg, **overrides})
    if family == "qwen2_moe":
        cfg = dict(
            common, shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[0], num_hidden_layers=3
        )
        return Qwen2MoeConfig(**{**cfg, **overrides})
    raise ValueError(f"--family must be one of {FAMILIES}, got {family!r}")


def make_tiny_moe(
    out: Path, family: str = "qwen3_moe", seed: int = 0, tokenizer_dir: Path = TINY_TOKENIZER, **overrides
) -> Path:
    """Write the checkpoint (safetensors, config.json, tokenizer) to ``out``; returns ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    config = tiny_moe_config(family, vocab, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial norms, so a swapped norm weight cannot go unnoticed
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith("mlp.gate.weight"):
                # Router logits well apart: a top-k choice must not hinge on float rounding
                # between two implementations.
                p.normal_(0, 1.0)
            elif name.endswith("shared_expert_gate.weight"):
                p.normal_(0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, out / name)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--family", choices=FAMILIES, default="qwen3_moe")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    make_tiny_moe(args.out, args.family, args.seed)
    print(f"wrote a tiny random {args.family} checkpoint to {args.out}")


if __name__ == "__main__":
    main()
