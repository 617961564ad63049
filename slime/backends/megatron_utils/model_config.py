"""Model architecture from Megatron-LM flags and/or a HF config.json, checked against each other.

`ModelArgs` is the typed architecture group. `resolve_model_args` fills every field not given
on the command line from ``--hf-checkpoint``'s config.json (Qwen3, Qwen2/2.5, Llama-3 dense),
and stops with an error naming the flag and both values where a given flag disagrees with the
HF config (a wrong ``--rotary-base``, say): a silently different architecture would load the
weights and train a broken model.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields

__all__ = ["ModelArgs", "ModelConfigError", "add_model_arguments", "hf_model_args", "resolve_model_args"]

SUPPORTED_HF = ("qwen3", "qwen2", "llama")


class ModelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelArgs:
    """A dense GPT architecture, in Megatron-LM's terms.

    ``vocab_size`` is the tokenizer's (HF config's) size; the embedding is padded to
    ``padded_vocab_size(tp)`` for tensor parallelism and the padding is never a prediction.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int = 4096
    swiglu: bool = True
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-6
    rotary_base: float = 10000.0
    qk_layernorm: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    untie_embeddings_and_output_weights: bool = True
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ModelConfigError(
                f"--num-attention-heads {self.num_attention_heads} is not a multiple of --num-query-groups {self.num_query_groups}"
            )
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ModelConfigError(f"--normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


def hf_model_args(hf_dir: str) -> dict:
    """The ModelArgs fields implied by a HF config.json (Qwen3, Qwen2, Llama)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ModelConfigError(f"--hf-checkpoint {hf_dir!r} has no config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_HF:
        raise ModelConfigError(f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_HF)})")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{path}: hidden_act {cfg.get('hidden_act')!r} is not supported (silu/SwiGLU only)")
    out = dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        swiglu=True,
        normalization="RMSNorm",
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        rotary_base=float(cfg.get("rope_theta", 10000.0)),
        qk_layernorm=model_type == "qwen3",
        add_bias_linear=bool(cfg.get("mlp_bias", False)),
        add_qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
    )
    scaling = cfg.get("rope_scaling") or {}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ModelConfigError(f"{path}: rope_scaling type {kind!r} is not supported (llama3 only)")
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in expected.items():
            if float(scaling.get(key, value)) != float(value):
                raise ModelConfigError(f"{path}: rope_scaling.{key}={scaling[key]} differs from megatron-core's {value}")
        out.update(use_rope_scaling=True, rope_scaling_factor=float(scaling.get("factor", 8.0)))
    return out


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's architecture flags. Unset ones (None) come from --hf-checkpoint."""
    g = parser.add_argument_group("model (Megatron-LM names; defaults from --hf-checkpoint's config.json)")
    for flag, typ in (
        ("--num-layers", int),
        ("--hidden-size", int),
        ("--ffn-hidden-size", int),
        ("--num-attention-heads", int),
        ("--num-query-groups", int),
        ("--kv-channels", int),
        ("--vocab-size", int),
        ("--max-position-embeddings", int),
        ("--norm-epsilon", float),
        ("--rotary-base", float),
        ("--rope-scaling-factor", float),
    ):
        g.add_argument(flag, type=typ, default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), default=None)
    g.add_argument("--group-query-attention", action="store_true", default=None)
    g.add_argument("--swiglu", action="store_true", default=None)
    g.add_argument("--qk-layernorm", action="store_true", default=None)
    g.add_argument("--disable-bias-linear", action="store_true", default=None)
    g.add_argument("--add-qkv-bias", action="store_true", default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--use-rope-scaling", action="store_true", default=None)
    g.add_argument("--position-embedding-type", choices=("rope",), default="rope")
    g.add_argument("--use-rotary-position-embeddings", action="store_true", help="accepted for slime scripts; RoPE is the only choice")
    return parser


def _flag_values(args: argparse.Namespace) -> dict:
    """ModelArgs fields given on the command line (store_true flags only when present)."""
    given = {}
    for f in fields(ModelArgs):
        value = getattr(args, f.name, None)
        if value is not None:
            given[f.name] = value
    if getattr(args, "disable_bias_linear", None):
        given["add_bias_linear"] = False
    return given


def resolve_model_args(args: argparse.Namespace) -> ModelArgs:
    """Flags first, HF config for the rest; a flag that contradicts the HF config is an error."""
    given = _flag_values(args)
    hf_dir = getattr(args, "hf_checkpoint", None)
    derived = hf_model_args(hf_dir) if hf_dir and os.path.exists(os.path.join(hf_dir, "config.json")) else {}
    for name, value in given.items():
        if name not in derived or name == "make_vocab_size_divisible_by":
            continue
        ref = derived[name]
        same = float(value) == float(ref) if isinstance(ref, (int, float)) and not isinstance(ref, bool) else value == ref
        if not same:
            raise ModelConfigError(
                f"--{name.replace('_', '-')} is {value!r} but {hf_dir}/config.json implies {ref!r}; "
                "fix the flag (or drop it to take the HF value)"
            )
    if not derived:
        # Megatron-LM semantics for a bare command line: a store_true flag absent means off,
        # and linear layers have biases unless --disable-bias-linear.
        for name in ("swiglu", "qk_layernorm", "add_qkv_bias", "untie_embeddings_and_output_weights", "use_rope_scaling"):
            given.setdefault(name, False)
        given.setdefault("add_bias_linear", True)
    merged = {**derived, **given}
    required = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size")
    missing = [n for n in required if n not in merged]
    if missing:
        raise ModelConfigError(
            "model flags missing and no --hf-checkpoint config.json to derive them from: "
            + ", ".join("--" + n.replace("_", "-") for n in missing)
        )
    merged.setdefault("num_query_groups", merged["num_attention_heads"])
    merged.setdefault("kv_channels", merged["hidden_size"] // merged["num_attention_heads"])
    return ModelArgs(**merged)
