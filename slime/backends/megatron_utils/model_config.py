"""Model architecture from Megatron-LM flags and/or a HF config.json, checked against each other.

`ModelArgs` is the typed architecture group. `resolve_model_args` fills every field not given
on the command line from ``--hf-checkpoint``'s config.json (Qwen3, Qwen2/2.5, Llama-3, GLM4 dense;
Qwen3-MoE and Qwen2-MoE, see `moe_config`), and stops with an error naming the flag and both
values where a given flag disagrees with the HF config (a wrong ``--rotary-base``, say): a
silently different architecture would load the weights and train a broken model.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields

from slime.backends.megatron_utils.moe_config import (
    ModelConfigError,
    add_moe_arguments,
    check_moe_fields,
    hf_moe_args,
    moe_layer_pattern,
)

__all__ = ["ModelArgs", "ModelConfigError", "add_model_arguments", "hf_model_args", "resolve_model_args"]

SUPPORTED_HF = ("qwen3", "qwen2", "llama", "glm4", "qwen3_moe", "qwen2_moe")


@dataclass(frozen=True)
class ModelArgs:
    """A GPT architecture (dense or MoE), in Megatron-LM's terms.

    ``vocab_size`` is the tokenizer's (HF config's) size; the embedding is padded to
    ``padded_vocab_size(tp)`` for tensor parallelism and the padding is never a prediction.
    ``num_experts`` None means dense. The ``moe_*`` fields up to ``moe_layer_freq`` are
    architecture (checked against config.json); the rest are routing/training settings that
    config.json does not hold. ``moe_layer_freq`` is an int N or an explicit 0/1 tuple per
    layer (HF-derived and resolved values are always the tuple).

    GLM4: ``post_self_attn_layernorm`` / ``post_mlp_layernorm`` are its norms on the attention
    and MLP outputs (`glm4`), ``rotary_interleaved`` its GPT-J-style RoPE pairs. ``spec`` is
    ``--spec MODULE NAME`` after `layer_spec_plugin.SPEC_ALIASES` (None: the built-in layers).
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
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    post_self_attn_layernorm: bool = False
    post_mlp_layernorm: bool = False
    spec: tuple[str, str] | None = None
    # MoE architecture
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int = 2
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: float | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_layer_freq: int | tuple[int, ...] = 1
    # MoE routing / training
    moe_router_load_balancing_type: str = "aux_loss"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_router_dtype: str | None = None
    moe_token_dispatcher_type: str = "allgather"
    moe_grouped_gemm: bool = False
    moe_permute_fusion: bool = False
    moe_token_drop_policy: str = "probs"
    moe_expert_capacity_factor: float | None = None
    moe_pad_expert_input_to_capacity: bool = False
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3

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
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ModelConfigError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        rotary_dim = int(self.kv_channels * self.rotary_percent)
        if rotary_dim < 2 or rotary_dim % 2:
            raise ModelConfigError(
                f"--rotary-percent {self.rotary_percent} of --kv-channels {self.kv_channels} "
                f"rotates {rotary_dim} dims; RoPE needs an even number >= 2"
            )
        if (self.post_self_attn_layernorm or self.post_mlp_layernorm) and self.num_experts is not None:
            raise ModelConfigError("--post-self-attn-layernorm / --post-mlp-layernorm: not built for MoE layers yet")
        check_moe_fields(self)

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def moe_pattern(self) -> tuple[int, ...]:
        """1 for each MoE decoder layer, 0 for each dense one (all 0 for a dense model)."""
        if not self.is_moe:
            return (0,) * self.num_layers
        return moe_layer_pattern(self.moe_layer_freq, self.num_layers)

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


def hf_model_args(hf_dir: str) -> dict:
    """The ModelArgs fields implied by a HF config.json (Qwen3, Qwen2, Llama, GLM4; Qwen3-/Qwen2-MoE).

    GLM4 keys absent from a config.json take `transformers.Glm4Config`'s defaults
    (``partial_rotary_factor`` 0.5, ``attention_bias`` true, ``rms_norm_eps`` 1.5625e-7)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ModelConfigError(f"--hf-checkpoint {hf_dir!r} has no config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_HF:
        raise ModelConfigError(f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_HF)})")
    glm4 = model_type == "glm4"
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
        norm_epsilon=cfg.get("rms_norm_eps", 1.5625e-7 if glm4 else 1e-6),
        rotary_base=float(cfg.get("rope_theta", 10000.0)),
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        add_bias_linear=bool(cfg.get("mlp_bias", False)),
        add_qkv_bias=model_type == "qwen2"
        or (model_type == "qwen2_moe" and bool(cfg.get("qkv_bias", True)))
        or bool(cfg.get("attention_bias", glm4)),
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        rotary_percent=float(cfg.get("partial_rotary_factor", 0.5 if glm4 else 1.0)),
        rotary_interleaved=glm4,
        post_self_attn_layernorm=glm4,
        post_mlp_layernorm=glm4,
        **hf_moe_args(cfg, path),
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
    ):
        g.add_argument(flag, type=typ, default=None)
    g.add_argument(
        "--rope-scaling-factor",
        "--rotary-scaling-factor",  # slime's Llama 3.x scripts' spelling
        dest="rope_scaling_factor",
        type=float,
        default=None,
        help="llama3 RoPE scaling factor (with --use-rope-scaling); checked against config.json's rope_scaling.factor",
    )
    g.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="accepted for slime's scripts (Megatron-LM's fixed sample length): micro-batches here are packed "
        "to --max-tokens-per-gpu or --micro-batch-size, and RoPE covers --max-position-embeddings",
    )
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
    g.add_argument("--rotary-percent", type=float, default=None, help="fraction of each head's dims rotated (default 1.0)")
    g.add_argument(
        "--rotary-interleaved",
        action="store_true",
        default=None,
        help="RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... (GLM4) instead of the two halves",
    )
    g.add_argument(
        "--no-rope-fusion",
        action="store_true",
        help="accepted for slime's scripts: RoPE is never fused here (plain torch ops)",
    )
    g.add_argument(
        "--post-self-attn-layernorm", action="store_true", default=None, help="a norm on the attention output (GLM4)"
    )
    g.add_argument("--post-mlp-layernorm", action="store_true", default=None, help="a norm on the MLP output (GLM4)")
    g.add_argument(
        "--spec",
        nargs=2,
        metavar=("MODULE", "NAME"),
        default=None,
        help="decoder layer spec: NAME in MODULE, a ModuleSpec or fn(args, config, vp_stage) returning one; "
        "slime's 'slime_plugins.models.glm4 get_glm_spec' is our GLM4 layer",
    )
    add_moe_arguments(parser)
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
    if "spec" in given:
        from slime.backends.megatron_utils.layer_spec_plugin import resolve_spec_path

        given["spec"] = resolve_spec_path(given["spec"])
    return given


def _normalize_layer_freq(values: dict, num_layers: int | None) -> None:
    """An integer --moe-layer-freq as the explicit per-layer tuple (comparable with HF's)."""
    freq = values.get("moe_layer_freq")
    if freq is not None and num_layers is not None:
        values["moe_layer_freq"] = moe_layer_pattern(freq, num_layers)


def resolve_model_args(args: argparse.Namespace) -> ModelArgs:
    """Flags first, HF config for the rest; a flag that contradicts the HF config is an error."""
    given = _flag_values(args)
    hf_dir = getattr(args, "hf_checkpoint", None)
    derived = hf_model_args(hf_dir) if hf_dir and os.path.exists(os.path.join(hf_dir, "config.json")) else {}
    _normalize_layer_freq(given, given.get("num_layers", derived.get("num_layers")))
    for name, value in given.items():
        if name not in derived or name == "make_vocab_size_divisible_by":
            continue
        ref = derived[name]
        numeric = isinstance(ref, (int, float)) and not isinstance(ref, bool) and not isinstance(value, bool)
        same = float(value) == float(ref) if numeric else value == ref
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
        if given.get("num_experts") is not None:  # Megatron-LM: experts default to the dense FFN size
            given.setdefault("moe_ffn_hidden_size", given.get("ffn_hidden_size"))
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
    _normalize_layer_freq(merged, merged["num_layers"])
    return ModelArgs(**merged)
