"""Mixture-of-experts flags (Megatron-LM names) and their values in a Qwen2-/Qwen3-MoE config.json.

`model_config.ModelArgs` holds the MoE fields next to the dense ones, so one resolution and
one mismatch check cover both. This module owns what is MoE-specific:

* `add_moe_arguments`: the ``--num-experts`` / ``--moe-*`` flags slime's scripts pass;
* `hf_moe_args`: the architecture a HF MoE config implies. HF routes with a softmax over all
  experts, takes the top k and, with ``norm_topk_prob``, renormalizes them: megatron-core's
  softmax router gives the same weights with ``moe_router_pre_softmax=False`` (softmax over
  the top-k logits) and, without ``norm_topk_prob``, with ``moe_router_pre_softmax=True``;
* `moe_layer_pattern` / `parse_moe_layer_freq`: which decoder layers are MoE. HF marks layer
  i sparse when ``(i + 1) % decoder_sparse_step == 0`` and i is not in ``mlp_only_layers``;
  Megatron's integer ``--moe-layer-freq N`` means ``i % N == 0``. The two disagree for N > 1,
  so both are turned into the explicit 0/1 list before they are compared.

Routing/training flags (aux-loss type and coefficient, dispatcher, router dtype, capacity)
are not architecture: config.json does not hold them and they are never checked against it.
"""

from __future__ import annotations

import argparse
import ast

__all__ = [
    "DISPATCHERS",
    "LOAD_BALANCING_TYPES",
    "ModelConfigError",
    "add_moe_arguments",
    "check_moe_fields",
    "hf_moe_args",
    "moe_layer_pattern",
    "parse_moe_layer_freq",
]

HF_MOE_TYPES = ("qwen3_moe", "qwen2_moe")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
# megatron-core's "flex" dispatcher needs DeepEP/HybridEP kernels (CUDA, extra packages).
DISPATCHERS = ("allgather", "alltoall")
SCORE_FUNCTIONS = ("softmax", "sigmoid")


class ModelConfigError(ValueError):
    """A model flag or config.json value that cannot build the model (re-exported by model_config)."""


def parse_moe_layer_freq(text: str) -> int | tuple[int, ...]:
    """``--moe-layer-freq``: an integer N, or a list expression such as ``[0,1,1]`` or
    ``([0]*1+[1]*47)`` (what Megatron-LM accepts). Evaluated without ``eval``: only list/tuple
    literals of integers, ``+`` and ``*`` are allowed."""
    text = str(text).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a shell-quoted pattern ("'([1]*48)'")
        text = text[1:-1].strip()
    try:
        return int(text)
    except ValueError:
        pass

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(ast.dump(node))

    try:
        value = ev(ast.parse(text, mode="eval"))
    except (SyntaxError, ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"--moe-layer-freq {text!r}: not an integer or a list of 0/1 ({e})") from None
    if not isinstance(value, list) or any(v not in (0, 1) for v in value):
        raise argparse.ArgumentTypeError(f"--moe-layer-freq {text!r}: a list must hold only 0 (dense) and 1 (MoE)")
    return tuple(value)


def moe_layer_pattern(freq: int | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """The explicit 0/1 pattern (1 = MoE layer) of ``--moe-layer-freq`` for ``num_layers`` layers."""
    if isinstance(freq, int):
        if freq < 1:
            raise ModelConfigError(f"--moe-layer-freq must be >= 1, got {freq}")
        return tuple(1 if i % freq == 0 else 0 for i in range(num_layers))
    pattern = tuple(int(v) for v in freq)
    if len(pattern) != num_layers:
        raise ModelConfigError(
            f"--moe-layer-freq lists {len(pattern)} layers but the model has --num-layers {num_layers}"
        )
    return pattern


def add_moe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's MoE flags. Architecture ones left unset (None) come from config.json."""
    g = parser.add_argument_group("MoE (Megatron-LM names; architecture from --hf-checkpoint's config.json)")
    g.add_argument("--num-experts", type=int, default=None, help="routed experts per MoE layer (unset: dense)")
    g.add_argument(
        "--moe-ffn-hidden-size", type=int, default=None, help="each expert's FFN size (default --ffn-hidden-size)"
    )
    g.add_argument("--moe-router-topk", type=int, default=None, help="experts per token (default 2)")
    g.add_argument("--moe-router-score-function", choices=SCORE_FUNCTIONS, default=None)
    g.add_argument(
        "--moe-router-pre-softmax",
        action="store_true",
        default=None,
        help="softmax over all experts before top-k (HF: norm_topk_prob false); else softmax over the top-k",
    )
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None, help="shared expert FFN size")
    g.add_argument(
        "--moe-shared-expert-gate",
        action="store_true",
        default=None,
        help="sigmoid gate on the shared expert (Qwen2-MoE)",
    )
    g.add_argument(
        "--moe-layer-freq",
        type=parse_moe_layer_freq,
        default=None,
        help="N (layer i is MoE when i %% N == 0) or a 0/1 list per layer, e.g. '[0,1,1]' or '([0]*1+[1]*47)'",
    )
    g.add_argument("--moe-router-load-balancing-type", choices=LOAD_BALANCING_TYPES, default="aux_loss")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="load-balancing loss weight (0: off)")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None, help="router z-loss weight")
    g.add_argument("--moe-router-dtype", choices=("fp32", "fp64"), default=None, help="router logits/softmax precision")
    g.add_argument("--moe-token-dispatcher-type", choices=DISPATCHERS, default="allgather")
    g.add_argument(
        "--moe-grouped-gemm",
        action="store_true",
        help="accepted; the local (non-Transformer-Engine) layer spec runs the experts one by one (SequentialMLP)",
    )
    g.add_argument(
        "--moe-permute-fusion", action="store_true", help="accepted; needs Transformer Engine, off without it"
    )
    g.add_argument("--moe-token-drop-policy", choices=("probs", "position"), default="probs")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None, help="unset: no token dropping")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    g.add_argument(
        "--moe-router-enable-expert-bias", action="store_true", help="aux-loss-free balancing bias (sigmoid router)"
    )
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    return parser


def hf_moe_args(cfg: dict, path: str) -> dict:
    """The MoE ModelArgs fields of a HF config.json (dense families: no experts)."""
    model_type = cfg.get("model_type")
    if model_type not in HF_MOE_TYPES:
        return {"num_experts": None}
    layers = cfg["num_hidden_layers"]
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense_only = set(cfg.get("mlp_only_layers") or [])
    num_experts = cfg["num_experts"]
    pattern = tuple(
        1 if (i not in dense_only and num_experts > 0 and (i + 1) % step == 0) else 0 for i in range(layers)
    )
    if not any(pattern):
        raise ModelConfigError(f"{path}: model_type {model_type} without any MoE layer (num_experts/mlp_only_layers)")
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    return dict(
        num_experts=num_experts,
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_router_topk=cfg["num_experts_per_tok"],
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not cfg.get("norm_topk_prob", False),
        moe_shared_expert_intermediate_size=shared or None,
        moe_shared_expert_gate=bool(shared),  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x)
        moe_layer_freq=pattern,
    )


def check_moe_fields(m) -> None:
    """``ModelArgs.__post_init__``'s MoE part (the pattern length is checked where the model is
    built: one-layer views of a model, as weight sync makes, keep the full pattern)."""
    if m.num_experts is None:
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            if getattr(m, name) is not None:
                raise ModelConfigError(f"--{name.replace('_', '-')} needs --num-experts")
        return
    if m.num_experts < 1:
        raise ModelConfigError(f"--num-experts must be positive, got {m.num_experts}")
    if not 1 <= m.moe_router_topk <= m.num_experts:
        raise ModelConfigError(f"--moe-router-topk {m.moe_router_topk} must be in [1, --num-experts {m.num_experts}]")
    if m.moe_ffn_hidden_size is not None and m.moe_ffn_hidden_size <= 0:
        raise ModelConfigError(f"--moe-ffn-hidden-size must be positive, got {m.moe_ffn_hidden_size}")
    if m.moe_router_score_function not in SCORE_FUNCTIONS:
        raise ModelConfigError(f"--moe-router-score-function must be one of {SCORE_FUNCTIONS}")
    if m.moe_router_load_balancing_type not in LOAD_BALANCING_TYPES:
        raise ModelConfigError(f"--moe-router-load-balancing-type must be one of {LOAD_BALANCING_TYPES}")
    if m.moe_token_dispatcher_type not in DISPATCHERS:
        raise ModelConfigError(f"--moe-token-dispatcher-type must be one of {DISPATCHERS}")
    if m.moe_aux_loss_coeff < 0:
        raise ModelConfigError(f"--moe-aux-loss-coeff must be >= 0, got {m.moe_aux_loss_coeff}")
    shared = m.moe_shared_expert_intermediate_size
    if shared is not None and shared <= 0:
        raise ModelConfigError(f"--moe-shared-expert-intermediate-size must be positive, got {shared}")
    if m.moe_shared_expert_gate and shared is None:
        raise ModelConfigError("--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
    if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
        raise ModelConfigError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid")
    if isinstance(m.moe_layer_freq, int) and m.moe_layer_freq < 1:
        raise ModelConfigError(f"--moe-layer-freq must be >= 1, got {m.moe_layer_freq}")
