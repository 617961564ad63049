"""The MoE part of the model provider: megatron-core MoE layers on the local (non-TE) spec.

Imports megatron-core at import time: import it lazily (the model provider does).

* `moe_config_kwargs`: TransformerConfig fields of `ModelArgs`' MoE settings.
* `moe_block_spec`: megatron's own decoder block spec (dense and MoE layers per
  ``moe_layer_freq``, sliced per pipeline stage) with our packed core attention and
  `SlimeTopKRouter` put in.
* `SlimeTopKRouter`: megatron's top-k router, plus per-layer counts of routed tokens per expert
  (router statistics) and one place that decides the load-balancing loss weight (below).
* `moe_step_metrics`: aux losses and router statistics of the last step, reduced over ranks.

Experts are `SequentialMLP` (one expert after another): ``--moe-grouped-gemm`` and
``--moe-permute-fusion`` need Transformer Engine / grouped_gemm kernels that the local spec
does not use, so they are accepted and logged as off. The HF<->Megatron mapping
(`hf_weights`) names SequentialMLP's parameters.

Aux-loss weight. megatron-core attaches each MoE layer's load-balancing loss to the router
output and scales its gradient by the schedule's loss scale (1 when
``calculate_per_token_loss``, which our config sets) times, in per-token mode, the micro-batch's
token count, expecting ``finalize_model_grads`` to divide by the global token count. Our loss
weights already hold the global denominators and nothing divides afterwards, so the token
factor would inflate the aux gradient by thousands. `SlimeTopKRouter` drops that factor and
multiplies by `aux_loss_weight` instead (default 1: each micro-batch's aux loss counts with
``--moe-aux-loss-coeff``, summed over micro-batches and DP ranks). A trainer that wants
Megatron-LM's mean over micro-batches calls ``set_aux_loss_weight(1 / (micro_batches * dp))``
before the step. The router z-loss (``--moe-z-loss-coeff``) is weighted the same way
(`SlimeTopKRouter.apply_z_loss`).
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler, TopKRouter

if TYPE_CHECKING:
    from slime.backends.megatron_utils.model_config import ModelArgs

logger = logging.getLogger(__name__)

__all__ = [
    "SlimeTopKRouter",
    "reset_moe_stats",
    "define_missing_te_gemm",
    "moe_block_spec",
    "moe_config_kwargs",
    "moe_step_metrics",
    "set_aux_loss_weight",
    "stage_padding_mask",
]


def _te_installed() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def define_missing_te_gemm() -> None:
    """megatron-core 0.16.1's router gating tests ``te_general_gemm is not None`` but defines the
    name only when Transformer Engine imports: without TE every MoE forward raises NameError.
    Define it as None (its "no TE" value) there; a no-op when TE is installed or a later
    megatron-core defines it."""
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def moe_config_kwargs(m: ModelArgs) -> dict:
    """TransformerConfig keyword arguments of the MoE settings ({} for a dense model)."""
    if not m.is_moe:
        return {}
    te = _te_installed()
    if m.moe_grouped_gemm:
        logger.info("--moe-grouped-gemm: the local layer spec runs the experts sequentially (SequentialMLP)")
    if m.moe_permute_fusion and not te:
        logger.info("--moe-permute-fusion: needs Transformer Engine, not installed; using the unfused permutation")
    return dict(
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
        moe_router_topk=m.moe_router_topk,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=m.moe_shared_expert_gate,
        moe_layer_freq=list(m.moe_pattern()),
        moe_router_load_balancing_type=m.moe_router_load_balancing_type,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_z_loss_coeff=m.moe_z_loss_coeff,
        moe_router_dtype=m.moe_router_dtype,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        moe_grouped_gemm=False,
        moe_permute_fusion=m.moe_permute_fusion and te,
        moe_token_drop_policy=m.moe_token_drop_policy,
        moe_expert_capacity_factor=m.moe_expert_capacity_factor,
        moe_pad_expert_input_to_capacity=m.moe_pad_expert_input_to_capacity,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=m.moe_router_bias_update_rate,
    )


class SlimeTopKRouter(TopKRouter):
    """megatron's TopKRouter + routed-token counts per expert + our aux-loss gradient weight."""

    aux_loss_weight = 1.0  # class-wide: every MoE layer of the process uses the same weight

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        # Summed over the training forwards of a step; non-persistent: statistics, not weights.
        self.register_buffer(
            "routed_tokens", torch.zeros(config.num_moe_experts, dtype=torch.float64), persistent=False
        )

    def routing(self, logits, padding_mask=None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.training and torch.is_grad_enabled():
            counted = routing_map if padding_mask is None else routing_map & ~padding_mask.reshape(-1, 1)
            self.routed_tokens += counted.sum(dim=0).to(self.routed_tokens.device, torch.float64)
        return probs, routing_map

    def attach_and_log_load_balancing_loss(
        self,
        activation,
        aux_loss_coeff,
        aux_loss,
        aux_loss_name,
        reduce_group,
        reduce_group_has_dp=False,
        valid_token_count=None,
    ):
        if torch.is_tensor(valid_token_count) and int(valid_token_count) == 0:
            # No real token here (a padding-only micro-batch, see expert_parallel): the masked
            # loss is exactly 0 but megatron's formula divides 0 by 0, a NaN in the router grads.
            # The count is a tensor only when a padding mask was given: one host sync per MoE
            # layer of a padded micro-batch.
            aux_loss = torch.zeros_like(aux_loss).detach()
        self._track(aux_loss_name, aux_loss / aux_loss_coeff, reduce_group, reduce_group_has_dp)
        return MoEAuxLossAutoScaler.apply(activation, aux_loss * SlimeTopKRouter.aux_loss_weight)

    def apply_z_loss(self, logits, padding_mask=None):
        """The router z-loss (``--moe-z-loss-coeff``): coeff x the micro-batch's mean over its
        real tokens of logsumexp(router logits)^2, weighted like the load-balancing loss.

        Replaces megatron's, which scales the gradient by the local token count (see the module
        docstring: thousands too large here) and, under TP x CP, takes each rank's own mean
        divided by the group size (not the micro-batch mean when ranks hold different counts).
        Here each rank adds its tokens' sum over the group's real-token count: the partial
        losses of the TP x CP ranks add up to the micro-batch's exactly. Costs one scalar
        all-reduce per MoE layer under TP x CP."""
        coeff = self.config.moe_z_loss_coeff
        if coeff is None or not (self.training and torch.is_grad_enabled()):
            return logits
        z = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).square()
        if padding_mask is not None:
            z = z * (~padding_mask.reshape(-1)).to(z.dtype)
            count = (~padding_mask).sum().to(torch.float32)
        else:
            count = torch.tensor(float(z.numel()), device=z.device)
        group = self.tp_cp_group
        if group.size() > 1:
            dist.all_reduce(count, group=group)
        z_loss = z.sum() / count.clamp(min=1.0) * coeff  # 0 on a padding-only micro-batch
        self._track("z_loss", z_loss.detach() / coeff, group)
        return MoEAuxLossAutoScaler.apply(logits, z_loss * SlimeTopKRouter.aux_loss_weight)

    def _track(self, name: str, value: torch.Tensor, reduce_group, reduce_group_has_dp: bool = False) -> None:
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        # megatron's tracker is process-global and sized by the first model that logs: a later
        # model of another depth in the same process (tests, converters) starts its own.
        entry = get_moe_layer_wise_logging_tracker().get(name)
        if entry is not None and entry["values"].numel() != num_layers:
            del get_moe_layer_wise_logging_tracker()[name]
        save_to_aux_losses_tracker(
            name, value, self.layer_number, num_layers, reduce_group=reduce_group, reduce_group_has_dp=reduce_group_has_dp
        )


def set_aux_loss_weight(weight: float) -> None:
    """Gradient weight of each micro-batch's load-balancing loss (times --moe-aux-loss-coeff)."""
    if weight < 0:
        raise ValueError(f"aux loss weight must be >= 0, got {weight}")
    SlimeTopKRouter.aux_loss_weight = float(weight)


def moe_block_spec(config, m: ModelArgs, core_attention_spec, vp_stage: int | None = None):
    """megatron's local decoder block spec for ``config`` (dense/MoE per layer, this pipeline
    stage's layers: model chunk ``vp_stage``'s with virtual stages), with
    ``core_attention_spec`` and `SlimeTopKRouter` in every layer."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    define_missing_te_gemm()
    block = copy.deepcopy(
        get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization=m.normalization, vp_stage=vp_stage
        )
    )
    for spec in block.layer_specs:
        spec.submodules.self_attention.submodules.core_attention = core_attention_spec
        mlp = spec.submodules.mlp
        if hasattr(mlp.submodules, "router"):  # MoESubmodules (dense layers hold MLPSubmodules)
            mlp.submodules.router = SlimeTopKRouter
    if config.sequence_parallel:  # MoE at TP > 1 (megatron trains it with sequence parallelism only)
        from slime.backends.megatron_utils.sp_norm import use_sequence_parallel_norms

        use_sequence_parallel_norms(block)
    return block


def stage_padding_mask(chunk, mask: torch.Tensor) -> torch.Tensor:
    """The MoE padding mask ``[1, T]`` to give model ``chunk``'s forward. megatron-core 0.16.1
    cuts it into the sequence-parallel slices in the embedding step only, so a chunk without
    the embedding (a later pipeline stage) would route [T / TP] tokens against a [T] mask:
    such a chunk gets this TP rank's slice here (scatter_to_sequence_parallel_region's split)."""
    from megatron.core.utils import unwrap_model

    module = unwrap_model(chunk)  # under megatron's DDP wrapper, as the checkpoints unwrap it
    if module.pre_process or not module.config.sequence_parallel:
        return mask
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    n = mask.shape[1] // tp
    return mask[:, rank * n : (rank + 1) * n]


def _routers(model) -> list:
    return [mod for mod in model.modules() if isinstance(mod, SlimeTopKRouter)]


def _reduce_tracked(values: torch.Tensor, entry: dict) -> None:
    """megatron's reduce_aux_losses_tracker_across_ranks for one entry, with the DP average as a
    sum and a division (its ReduceOp.AVG is NCCL-only: gloo refuses it). The per-layer values
    are summed over pipeline stages and the entry's reduce group (TP x CP: each rank holds part
    of a micro-batch's tokens), then averaged over DP ranks."""
    dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
    group = entry.get("reduce_group")
    if group is not None:
        dist.all_reduce(values, group=group)
        if not entry.get("reduce_group_has_dp", False):
            dp = ps.get_data_parallel_group(with_context_parallel=False)
            dist.all_reduce(values, group=dp)
            values /= dist.get_world_size(dp)
    avg = entry.get("avg_group")
    if avg is not None:
        dist.all_reduce(values, group=avg)
        values /= dist.get_world_size(avg)


def reset_moe_stats(model) -> None:
    """Forget what forwards before this step logged: megatron's aux-loss tracker (process-global:
    forward-only passes, old / reference log-probs, and earlier models in the same process
    write to it too) and the routers' token counts."""
    _reset(_routers(model))


def _reset(routers: list) -> None:
    if routers:
        clear_aux_losses_tracker()
    for r in routers:
        r.routed_tokens.zero_()


def moe_step_metrics(model, num_micro_batches: int) -> dict[str, float]:
    """The last step's MoE metrics, then reset: ``moe/<aux loss name>`` (each aux loss, mean
    over MoE layers and micro-batches, averaged over DP ranks as megatron logs it, unweighted
    by its coefficient) and router statistics of the routed tokens summed over the step and
    the DP group: ``moe/expert_load_max`` (busiest expert's share / uniform share, mean over
    layers; 1 = balanced) and ``moe/experts_unused`` (fraction of (layer, expert) pairs that
    got no token; summed over the CP ranks' shares and, under sequence parallelism, the TP
    ranks' token slices; padding excluded). Every rank must call it (collectives of its DP,
    CP, TP and PP groups); {} for a dense model."""
    routers = _routers(model)
    if not routers:
        return {}
    out: dict[str, float] = {}
    tracker = get_moe_layer_wise_logging_tracker()
    distributed = dist.is_initialized() and ps.model_parallel_is_initialized()
    counts = torch.stack([r.routed_tokens.to(torch.float64) for r in routers])
    if distributed:
        # Each CP rank routes its own share of the samples' tokens, each DP rank its samples.
        dist.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=True))
        if routers[0].config.sequence_parallel:  # each TP rank routed its own slice of the tokens
            dist.all_reduce(counts, group=ps.get_tensor_model_parallel_group())
    # Per-layer sums, then over pipeline stages (each holds its own MoE layers): [MoE layers,
    # sum of busiest-expert loads, layers with tokens, unused (layer, expert) pairs, pairs].
    total = counts.sum(dim=1, keepdim=True)
    routed = total[:, 0] > 0
    share = counts / total.clamp(min=1.0)
    load_max = (share.max(dim=1).values * counts.shape[1])[routed]
    seen = counts[routed]
    stats = torch.tensor(
        [len(routers), float(load_max.sum()), float(routed.sum()), float((seen == 0).sum()), float(seen.numel())],
        dtype=torch.float64,
    )
    if distributed:
        dist.all_reduce(stats, group=ps.get_pipeline_model_parallel_group())
    layers, load_sum, layers_routed, unused, pairs = stats.tolist()
    if tracker:
        for name, entry in tracker.items():
            values = entry["values"]
            if distributed:
                _reduce_tracked(values, entry)  # summed over stages too: every MoE layer's value
            out[f"moe/{name}"] = float(values.sum()) / layers / max(num_micro_batches, 1)
    if layers_routed > 0:
        out["moe/expert_load_max"] = load_sum / layers_routed
        out["moe/experts_unused"] = unused / pairs
    _reset(routers)
    return out
