"""GLM4 (HF ``Glm4ForCausalLM``: GLM-4-0414, GLM-Z1) decoder layers on megatron-core's local spec.

A GLM4 layer is a pre-norm layer with two more RMSNorms, on the branch outputs ("sandwich"):

    h = x + post_self_attn_layernorm(attention(input_layernorm(x)))
    y = h + post_mlp_layernorm(mlp(pre_mlp_layernorm(h)))

megatron-core 0.16's `TransformerLayer` has no slot for the two output norms (THUDM/slime adds
them in its Megatron-LM fork). `Glm4TransformerLayer` adds them as submodules named as there
(``decoder.layers.{i}.post_self_attn_layernorm.weight``, ``...post_mlp_layernorm.weight``)
and applies each inside the bias-dropout-add that follows its branch: the layer's own forward
(recompute, offloading, packed sequences) stays megatron's, and the residual add is the one
place the branch output passes through. The cost is one RMSNorm per branch, as in HF.

The rest of GLM4 is configuration, not code: partial rotary over half the head dim
(``--rotary-percent 0.5``), GPT-J-style interleaved pairs (``--rotary-interleaved``: megatron
rotates (x0, x1), (x2, x3), ... exactly as HF's GLM4 ``rotate_half``), QKV bias with no other
linear bias, untied output layer. RoPE is never fused here (megatron's fused THD kernel would
ignore the interleaving; slime's script passes ``--no-rope-fusion`` for that reason).

`get_glm_spec` has the signature of THUDM/slime's ``slime_plugins.models.glm4.get_glm_spec``,
which ``--spec slime_plugins.models.glm4 get_glm_spec`` resolves to (`layer_spec_plugin`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

if TYPE_CHECKING:
    from slime.backends.megatron_utils.model_config import ModelArgs

__all__ = ["Glm4LayerSubmodules", "Glm4TransformerLayer", "get_glm_spec", "glm4_layer_spec"]


@dataclass
class Glm4LayerSubmodules(TransformerLayerSubmodules):
    """megatron's layer submodules plus the norms on the attention and MLP outputs."""

    post_self_attn_layernorm: ModuleSpec | type = IdentityOp
    post_mlp_layernorm: ModuleSpec | type = IdentityOp


def _normed_bda(norm, bda):
    """``bda(training, fused)`` whose branch output is ``norm(out + bias)`` before dropout and
    the residual add (megatron's bda then sees no bias)."""

    def factory(training, fused):
        inner = bda(training, fused)

        def apply(out_with_bias, residual, prob):
            out, bias = out_with_bias
            if bias is not None:
                out = out + bias
            return inner((norm(out), None), residual, prob)

        return apply

    return factory


class Glm4TransformerLayer(TransformerLayer):
    """megatron's `TransformerLayer` with GLM4's post-attention and post-MLP norms."""

    def __init__(self, config, submodules: Glm4LayerSubmodules, *args, **kwargs):
        if config.inference_fuse_tp_communication:
            # That path adds the residual inside linear_proj / linear_fc2, before any output norm.
            raise ValueError("GLM4 sandwich norms do not support inference_fuse_tp_communication")
        super().__init__(config, submodules, *args, **kwargs)
        norm_kwargs = {
            "config": self.config,
            "hidden_size": self.config.hidden_size,
            "eps": self.config.layernorm_epsilon,
        }
        self.post_self_attn_layernorm = build_module(submodules.post_self_attn_layernorm, **norm_kwargs)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm_kwargs)
        if not isinstance(self.post_self_attn_layernorm, IdentityOp):
            self.self_attn_bda = _normed_bda(self.post_self_attn_layernorm, self.self_attn_bda)
        if not isinstance(self.post_mlp_layernorm, IdentityOp):
            self.mlp_bda = _normed_bda(self.post_mlp_layernorm, self.mlp_bda)


def glm4_layer_spec(normalization: str, qk_layernorm: bool, post_self_attn: bool, post_mlp: bool) -> ModuleSpec:
    """megatron's local layer spec as a `Glm4TransformerLayer` with the norms asked for (the
    norms are of ``normalization``'s kind, as the layer's other norms)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    base = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization))
    norm = base.submodules.input_layernorm
    fields = {f.name: getattr(base.submodules, f.name) for f in dataclasses.fields(TransformerLayerSubmodules)}
    submodules = Glm4LayerSubmodules(
        **fields,
        post_self_attn_layernorm=norm if post_self_attn else IdentityOp,
        post_mlp_layernorm=norm if post_mlp else IdentityOp,
    )
    return ModuleSpec(module=Glm4TransformerLayer, params=dict(base.params), submodules=submodules)


def get_glm_spec(args: ModelArgs, config, vp_stage=None) -> ModuleSpec:
    """The GLM4 layer spec (slime's ``get_glm_spec(args, config, vp_stage)``); ``args`` is the
    model's `ModelArgs`. The model provider puts its packed core attention in."""
    if args.num_experts is not None:
        raise ValueError("--spec slime_plugins.models.glm4 get_glm_spec builds dense GLM4 layers; --num-experts is set")
    return glm4_layer_spec(
        args.normalization, args.qk_layernorm, args.post_self_attn_layernorm, args.post_mlp_layernorm
    )
