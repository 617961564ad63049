"""HF <-> megatron-core weights for Qwen3, Qwen2/2.5, Llama-3, GLM4 and Qwen3-/Qwen2-MoE, any TP size.

Megatron's names are those of `model_provider.build_gpt_model` (local layer spec). Layouts:

* ``linear_qkv`` rows are grouped per KV group: ``[q (heads/groups * d), k (d), v (d)]`` for
  each group, so a TP rank's shard is a contiguous block of groups;
* ``linear_fc1`` is ``[gate; up]`` *per rank*: rank r holds ``[gate_r; up_r]``;
* GLM4 stores the dense MLP's gate and up fused, HF ``gate_up_proj = [gate; up]`` (split into
  megatron's per-rank layout like the separate ones), and names its output norms as our
  `glm4` layer does (``post_self_attn_layernorm``, ``post_mlp_layernorm``);
* row-parallel ``linear_proj`` / ``linear_fc2`` split the input dimension;
* embedding and output layer are split by vocabulary, padded to ``padded_vocab_size(tp)``
  with zero rows that are dropped again on export;
* MoE layers: ``mlp.router.weight`` is HF's ``mlp.gate.weight`` (replicated); expert j is
  ``mlp.experts.local_experts.{j}`` (megatron's SequentialMLP), each split like a dense MLP
  (megatron's expert-tensor-parallel size defaults to TP); Qwen2-MoE's ``shared_expert`` is
  ``mlp.shared_experts`` (split like a dense MLP) and its ``shared_expert_gate`` is
  ``mlp.shared_experts.gate_weight`` (replicated). With expert parallelism rank e of E holds
  experts ``e * n/E ...`` as local 0..n/E-1, each split over the expert-tensor-parallel
  ranks (`expert_parallel.ExpertPlacement`); `mcore_to_hf` takes experts under their global
  index (`expert_parallel.gather_shards` renames them), the ETP slices in the first ETP shards.

`hf_to_mcore` gives one rank's shards; `mcore_to_hf` takes every rank's and gives HF tensors
back bit-exactly (only reshapes, splits and concatenations: no arithmetic).
"""

from __future__ import annotations

from typing import Mapping

import torch

from slime.backends.megatron_utils.model_config import ModelArgs

__all__ = ["hf_to_mcore", "load_hf_state_dict", "mcore_to_hf", "save_hf_checkpoint"]

_NORMS = {  # megatron suffix -> HF suffix, per layer, replicated on every rank
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "post_self_attn_layernorm.weight": "post_self_attn_layernorm.weight",  # GLM4
    "post_mlp_layernorm.weight": "post_mlp_layernorm.weight",  # GLM4
}


def _chunk(t: torch.Tensor, tp_rank: int, tp_size: int, dim: int = 0) -> torch.Tensor:
    if t.shape[dim] % tp_size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not divisible by TP {tp_size}")
    return t.chunk(tp_size, dim=dim)[tp_rank].contiguous()


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def _qkv_to_mcore(q, k, v, m: ModelArgs) -> torch.Tensor:
    """HF q/k/v (weight [out, in] or bias [out]) -> megatron's grouped [ng * (q_g + 2) * d, ...]."""
    ng, d = m.num_query_groups, m.kv_channels
    per = m.num_attention_heads // ng
    rest = q.shape[1:]
    q = q.reshape(ng, per * d, *rest)
    k = k.reshape(ng, d, *rest)
    v = v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(ng * (per + 2) * d, *rest)


def _qkv_to_hf(qkv, m: ModelArgs):
    ng, d = m.num_query_groups, m.kv_channels
    per = m.num_attention_heads // ng
    rest = qkv.shape[1:]
    grouped = qkv.reshape(ng, (per + 2) * d, *rest)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return (x.reshape(-1, *rest).contiguous() for x in (q, k, v))


def _fused_gate_up(m: ModelArgs) -> bool:
    """HF stores the dense MLP as one ``gate_up_proj``: GLM4, the one supported family with
    output norms (a later family with output norms and split projections needs its own test)."""
    return m.post_mlp_layernorm


def _mlp_to_mcore(hf, hf_prefix: str, out: dict, mc_prefix: str, tp_rank: int, tp_size: int) -> None:
    """A SwiGLU MLP (``gate_proj``/``up_proj`` or fused ``gate_up_proj``, ``down_proj``) as
    megatron's fc1 ``[gate_r; up_r]`` / fc2."""
    if hf_prefix + "gate_up_proj.weight" in hf:
        gate, up = (_chunk(t, tp_rank, tp_size) for t in hf[hf_prefix + "gate_up_proj.weight"].chunk(2, dim=0))
    else:
        gate = _chunk(hf[hf_prefix + "gate_proj.weight"], tp_rank, tp_size)
        up = _chunk(hf[hf_prefix + "up_proj.weight"], tp_rank, tp_size)
    out[mc_prefix + "linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    out[mc_prefix + "linear_fc2.weight"] = _chunk(hf[hf_prefix + "down_proj.weight"], tp_rank, tp_size, dim=1)


def _mlp_to_hf(shards, mc_prefix: str, hf: dict, hf_prefix: str, fused: bool = False) -> None:
    gates, ups = zip(*(s[mc_prefix + "linear_fc1.weight"].chunk(2, dim=0) for s in shards))
    if fused:
        hf[hf_prefix + "gate_up_proj.weight"] = torch.cat([*gates, *ups], dim=0)
    else:
        hf[hf_prefix + "gate_proj.weight"] = torch.cat(gates, dim=0)
        hf[hf_prefix + "up_proj.weight"] = torch.cat(ups, dim=0)
    hf[hf_prefix + "down_proj.weight"] = torch.cat([s[mc_prefix + "linear_fc2.weight"] for s in shards], dim=1)


def _moe_to_mcore(hf, h: str, out: dict, g: str, m: ModelArgs, tp_rank: int, tp_size: int, experts) -> None:
    out[g + "mlp.router.weight"] = hf[h + "mlp.gate.weight"]
    if m.moe_router_enable_expert_bias:  # megatron's aux-loss-free balancing bias; HF Qwen has none
        out[g + "mlp.router.expert_bias"] = torch.zeros(m.num_experts, dtype=torch.float32)
    for local, expert in experts.expert_ids(m.num_experts):
        mc = f"{g}mlp.experts.local_experts.{local}."
        _mlp_to_mcore(hf, f"{h}mlp.experts.{expert}.", out, mc, experts.etp_rank, experts.etp_size)
    if m.moe_shared_expert_intermediate_size:
        _mlp_to_mcore(hf, h + "mlp.shared_expert.", out, g + "mlp.shared_experts.", tp_rank, tp_size)
        if m.moe_shared_expert_gate:
            out[g + "mlp.shared_experts.gate_weight"] = hf[h + "mlp.shared_expert_gate.weight"]


def _moe_to_hf(shards, g: str, hf: dict, h: str, m: ModelArgs) -> None:
    hf[h + "mlp.gate.weight"] = shards[0][g + "mlp.router.weight"]
    for expert in range(m.num_experts):  # global indices; the ETP slices are the shards holding them
        mc = f"{g}mlp.experts.local_experts.{expert}."
        slices = [s for s in shards if mc + "linear_fc1.weight" in s]
        _mlp_to_hf(slices, mc, hf, f"{h}mlp.experts.{expert}.")
    if g + "mlp.shared_experts.linear_fc1.weight" in shards[0]:
        _mlp_to_hf(shards, g + "mlp.shared_experts.", hf, h + "mlp.shared_expert.")
    if g + "mlp.shared_experts.gate_weight" in shards[0]:
        hf[h + "mlp.shared_expert_gate.weight"] = shards[0][g + "mlp.shared_experts.gate_weight"]


def hf_to_mcore(
    hf: Mapping[str, torch.Tensor], m: ModelArgs, tp_rank: int = 0, tp_size: int = 1, experts=None
) -> dict[str, torch.Tensor]:
    """One rank's megatron state dict from a HF state dict (``model.*``, ``lm_head.weight``):
    TP rank ``tp_rank`` of ``tp_size`` and, for MoE, the experts of ``experts`` (an
    `expert_parallel.ExpertPlacement`; default: every expert, split like the dense MLPs)."""
    from slime.backends.megatron_utils.expert_parallel import ExpertPlacement

    experts = experts or ExpertPlacement(etp_rank=tp_rank, etp_size=tp_size)
    if m.num_query_groups % tp_size:
        raise ValueError(f"--num-query-groups {m.num_query_groups} is not divisible by TP {tp_size}")
    padded = m.padded_vocab_size(tp_size)
    pattern = m.moe_pattern()
    out: dict[str, torch.Tensor] = {}
    out["embedding.word_embeddings.weight"] = _chunk(_pad_vocab(hf["model.embed_tokens.weight"], padded), tp_rank, tp_size)
    for i in range(m.num_layers):
        h, g = f"model.layers.{i}.", f"decoder.layers.{i}."
        for mc, hn in _NORMS.items():
            if h + hn in hf:
                out[g + mc] = hf[h + hn]
        a = h + "self_attn."
        qkv = _qkv_to_mcore(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], m)
        out[g + "self_attention.linear_qkv.weight"] = _chunk(qkv, tp_rank, tp_size)
        if m.add_qkv_bias:
            bias = _qkv_to_mcore(hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"], m)
            out[g + "self_attention.linear_qkv.bias"] = _chunk(bias, tp_rank, tp_size)
        out[g + "self_attention.linear_proj.weight"] = _chunk(hf[a + "o_proj.weight"], tp_rank, tp_size, dim=1)
        if pattern[i]:
            _moe_to_mcore(hf, h, out, g, m, tp_rank, tp_size, experts)
        else:
            _mlp_to_mcore(hf, h + "mlp.", out, g + "mlp.", tp_rank, tp_size)
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if m.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = _chunk(_pad_vocab(hf["lm_head.weight"], padded), tp_rank, tp_size)
    return out


def mcore_to_hf(shards: list[Mapping[str, torch.Tensor]], m: ModelArgs) -> dict[str, torch.Tensor]:
    """HF state dict from every TP rank's megatron state dict (rank order). A layer is MoE when
    its router is there (not from ``m.moe_layer_freq``: weight sync converts one layer at a time
    as a one-layer model)."""
    first = shards[0]

    def cat(name: str, dim: int = 0) -> torch.Tensor:
        return torch.cat([s[name] for s in shards], dim=dim)

    hf: dict[str, torch.Tensor] = {}
    hf["model.embed_tokens.weight"] = cat("embedding.word_embeddings.weight")[: m.vocab_size].contiguous()
    for i in range(m.num_layers):
        h, g = f"model.layers.{i}.", f"decoder.layers.{i}."
        for mc, hn in _NORMS.items():
            if g + mc in first:
                hf[h + hn] = first[g + mc]
        a = h + "self_attn."
        hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"] = _qkv_to_hf(
            cat(g + "self_attention.linear_qkv.weight"), m
        )
        if m.add_qkv_bias:
            hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"] = _qkv_to_hf(
                cat(g + "self_attention.linear_qkv.bias"), m
            )
        hf[a + "o_proj.weight"] = cat(g + "self_attention.linear_proj.weight", dim=1)
        if g + "mlp.router.weight" in first:
            _moe_to_hf(shards, g, hf, h, m)
        else:
            _mlp_to_hf(shards, g + "mlp.", hf, h + "mlp.", fused=_fused_gate_up(m))
    hf["model.norm.weight"] = first["decoder.final_layernorm.weight"]
    if m.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = cat("output_layer.weight")[: m.vocab_size].contiguous()
    return hf


def load_hf_state_dict(hf_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint directory (safetensors, sharded or not; never pickle)."""
    import glob
    import os

    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"--hf-checkpoint {hf_dir!r} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied checkpoints omit it
    return state


def save_hf_checkpoint(hf_state: Mapping[str, torch.Tensor], out_dir: str, origin_hf_dir: str, m: ModelArgs) -> None:
    """safetensors + config.json (+ tokenizer and generation config) copied from ``origin_hf_dir``."""
    import os
    import shutil

    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in hf_state.items()}
    if not m.untie_embeddings_and_output_weights:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(origin_hf_dir):
        if name.endswith(".safetensors") or name.endswith(".bin") or name == "model.safetensors.index.json":
            continue
        src = os.path.join(origin_hf_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out_dir, name))
