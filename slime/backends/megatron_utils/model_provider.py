"""Build a megatron-core GPTModel (local layer spec, no Transformer Engine) from `ModelArgs`.

The local spec's core attention is replaced by `PackedCoreAttention` so packed (THD) batches
work on every device. Fusions that need apex/TE kernels are off; on CUDA, bf16 training keeps
fp32 master weights in megatron's optimizer. MoE models (``ModelArgs.num_experts``) get
megatron's MoE layers where ``--moe-layer-freq`` says, through `moe_layers`. GLM4's sandwich
norms (``post_self_attn_layernorm`` / ``post_mlp_layernorm``) get `glm4`'s layer; ``--spec``
(`layer_spec_plugin`) replaces the built-in layer spec with the user's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slime.backends.megatron_utils.model_config import ModelArgs

__all__ = ["ModelBuildArgs", "build_gpt_chunks", "build_gpt_model", "layer_spec", "transformer_config"]


@dataclass(frozen=True)
class ModelBuildArgs:
    """How to instantiate the architecture: parallelism, precision, dropout, recompute.

    bf16: bf16 params/activations (GPU); fp32 otherwise (CPU).
    grad_reduce_in_fp32: gradients accumulated and all-reduced in fp32
        (``--accumulate-allreduce-grads-in-fp32``; Megatron-LM forces it under bf16).
    attention_softmax_in_fp32: attention scores/softmax in fp32 (``--attention-softmax-in-fp32``).
    attention_backend: `attention.BACKENDS` (sdpa reference, flex / varlen fast paths).
    recompute_*: Megatron-LM's activation recomputation flags.
    pipeline_model_parallel_size / virtual_pipeline_model_parallel_size /
    decoder_first_pipeline_num_layers / decoder_last_pipeline_num_layers: pipeline stages
        (``--num-layers-per-virtual-pipeline-stage`` is turned into the virtual size by the parser).
    context_parallel_size, expert_model_parallel_size, expert_tensor_parallel_size: see `layout`.
    deterministic_mode: ``--deterministic-mode``, megatron's deterministic kernels and torch's
        deterministic algorithms (`use_deterministic_algorithms`).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    sequence_parallel: bool = False
    bf16: bool = False
    grad_reduce_in_fp32: bool = True
    attention_softmax_in_fp32: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    attention_backend: str = "sdpa"
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    deterministic_mode: bool = False
    init_method_std: float = 0.02
    use_cpu_initialization: bool = True

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1:
            raise ValueError("--tensor-model-parallel-size must be >= 1")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"--recompute-granularity must be full or selective, got {self.recompute_granularity!r}")
        if self.recompute_granularity == "full" and self.recompute_method not in ("uniform", "block"):
            raise ValueError("--recompute-granularity full needs --recompute-method uniform|block")
        if self.recompute_granularity == "full" and not self.recompute_num_layers:
            raise ValueError("--recompute-granularity full needs --recompute-num-layers")
        self.layout  # noqa: B018 -- validates the parallel sizes

    @property
    def layout(self):
        """The `parallel.ParallelLayout` these sizes describe."""
        from slime.backends.megatron_utils.parallel import ParallelLayout

        return ParallelLayout(
            tensor=self.tensor_model_parallel_size,
            pipeline=self.pipeline_model_parallel_size,
            virtual_pipeline=self.virtual_pipeline_model_parallel_size,
            context=self.context_parallel_size,
            expert=self.expert_model_parallel_size,
            expert_tensor=self.expert_tensor_parallel_size,
        )


def transformer_config(model: ModelArgs, build: ModelBuildArgs):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from slime.backends.megatron_utils.moe_layers import moe_config_kwargs
    from slime.backends.megatron_utils.pipeline import config_kwargs as pipeline_config_kwargs

    dtype = torch.bfloat16 if build.bf16 else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        rotary_interleaved=model.rotary_interleaved,
        tensor_model_parallel_size=build.tensor_model_parallel_size,
        context_parallel_size=build.context_parallel_size,
        # Megatron marks expert params for the expert-data-parallel gradient reduction from these.
        expert_model_parallel_size=build.expert_model_parallel_size,
        expert_tensor_parallel_size=build.expert_tensor_parallel_size,
        sequence_parallel=build.sequence_parallel,
        bf16=build.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        hidden_dropout=build.hidden_dropout,
        attention_dropout=build.attention_dropout,
        attention_softmax_in_fp32=build.attention_softmax_in_fp32,
        recompute_granularity=build.recompute_granularity,
        recompute_method=build.recompute_method,
        recompute_num_layers=build.recompute_num_layers,
        deterministic_mode=build.deterministic_mode,
        init_method_std=build.init_method_std,
        use_cpu_initialization=build.use_cpu_initialization,
        # Kernels from apex / TE are not assumed; these are plain torch ops.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        # DDP then sums gradients over DP ranks and the schedule takes each micro-batch's loss
        # as is: the loss weights already hold the global denominators (see batching).
        calculate_per_token_loss=True,
        # The model's MoE settings win over the pipeline's defaults (a dispatcher for dense models).
        **{**pipeline_config_kwargs(build), **moe_config_kwargs(model)},
    )


def layer_spec(model: ModelArgs, attention_backend: str, config=None, vp_stage: int | None = None):
    """The local layer spec with our core attention; for a MoE model (``config`` needed) the
    block spec of this pipeline stage, dense and MoE layers per ``--moe-layer-freq``; GLM4's
    layer for sandwich norms; ``--spec``'s layer (``config`` needed) when given. ``vp_stage``:
    the model chunk of a virtual pipeline stage a block spec is for."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from slime.backends.megatron_utils.attention import PackedCoreAttention

    core_attention = ModuleSpec(module=PackedCoreAttention, params={"backend": attention_backend})
    sandwich = model.post_self_attn_layernorm or model.post_mlp_layernorm
    if model.spec is not None:
        return _user_spec(model, config, core_attention, vp_stage)
    if model.is_moe:
        from slime.backends.megatron_utils.moe_layers import moe_block_spec

        if config is None:
            raise ValueError("a MoE layer spec needs the TransformerConfig")
        return moe_block_spec(config, model, core_attention, vp_stage)
    if sandwich:
        from slime.backends.megatron_utils.glm4 import glm4_layer_spec

        spec = glm4_layer_spec(
            model.normalization, model.qk_layernorm, model.post_self_attn_layernorm, model.post_mlp_layernorm
        )
    else:
        local = get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization=model.normalization)
        spec = copy.deepcopy(local)
    spec.submodules.self_attention.submodules.core_attention = core_attention
    if config is not None and config.sequence_parallel:  # TP > 1 with --sequence-parallel
        # A layer spec would get megatron's default final norm (WrappedTorchNorm, which refuses
        # sequence parallelism): build this stage's block spec with a norm that takes it.
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

        from slime.backends.megatron_utils.sp_norm import SequenceParallelTorchNorm, use_sequence_parallel_norms

        use_sequence_parallel_norms(spec)
        return TransformerBlockSubmodules(
            layer_specs=[spec] * get_num_layers_to_build(config, vp_stage), layer_norm=SequenceParallelTorchNorm
        )
    return spec


def _user_spec(model: ModelArgs, config, core_attention, vp_stage: int | None = None):
    """``--spec``'s layer (or block) spec. megatron's local ``DotProductAttention`` rejects
    packed (THD) batches and builds its mask on CUDA: where the spec names it (or ours), our
    packed core attention with ``--attention-backend`` takes its place; any other core
    attention (Transformer Engine's, say) is kept as the spec says."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from slime.backends.megatron_utils.attention import PackedCoreAttention
    from slime.backends.megatron_utils.layer_spec_plugin import load_spec

    if config is None:
        raise ValueError("--spec needs the TransformerConfig")
    obj = load_spec(model.spec)
    spec = copy.deepcopy(obj(model, config, vp_stage) if callable(obj) else obj)
    for layer in getattr(spec, "layer_specs", None) or [spec]:
        attention = getattr(getattr(layer, "submodules", None), "self_attention", None)
        sub = getattr(attention, "submodules", None)
        current = getattr(sub, "core_attention", None)
        if getattr(current, "module", current) in (DotProductAttention, PackedCoreAttention):
            sub.core_attention = core_attention
    return spec


def build_gpt_model(model: ModelArgs, build: ModelBuildArgs, output_head: bool = False, vp_stage: int | None = None, config=None):
    """A GPTModel on the current device (parallel state must be initialized). ``output_head``:
    its forward returns an `output_head.OutputHead` instead of logits (memory-lean loss).
    ``vp_stage``: which model chunk of this pipeline rank (virtual stages; None without);
    ``config``: the TransformerConfig to share with the rank's other chunks."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    from slime.backends.megatron_utils.output_head import head_output_gpt_model_class
    from slime.backends.megatron_utils.pipeline import check_pipeline_layout, stage_flags

    check_pipeline_layout(model, build)
    config = config or transformer_config(model, build)
    pre_process, post_process = stage_flags(vp_stage)  # this chunk's part (both without PP)
    gpt = (head_output_gpt_model_class() if output_head else GPTModel)(
        config=config,
        transformer_layer_spec=layer_spec(model, build.attention_backend, config, vp_stage),
        vocab_size=model.padded_vocab_size(build.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=model.rotary_percent,
        rotary_base=int(model.rotary_base) if float(model.rotary_base).is_integer() else model.rotary_base,
        rope_scaling=model.use_rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        gpt = gpt.cuda()
    return gpt


def build_gpt_chunks(model: ModelArgs, build: ModelBuildArgs, output_head: bool = False) -> list:
    """This pipeline rank's model chunks: one GPTModel, or with virtual pipeline stages one per
    stage (chunk i holds the i-th of the rank's layer groups), all sharing one config as
    megatron's interleaved schedule expects."""
    from slime.backends.megatron_utils.pipeline import check_pipeline_layout, chunk_stages, virtual_size

    check_pipeline_layout(model, build)
    config = transformer_config(model, build)
    return [build_gpt_model(model, build, output_head, vp, config) for vp in chunk_stages(virtual_size(build))]
