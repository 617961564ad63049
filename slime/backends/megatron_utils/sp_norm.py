"""Torch norms that run under sequence parallelism (megatron's local layer spec without apex).

megatron-core's ``WrappedTorchNorm`` (its norm without apex or Transformer Engine) asserts
``not config.sequence_parallel``. A norm is per token, so the forward is the same on a
sequence slice; what sequence parallelism changes is the weight gradient: each TP rank sees
only its slice of the tokens, so the gradients must be summed over the TP group. megatron's
``finalize_model_grads`` does exactly that for parameters marked ``sequence_parallel`` (apex's
``FusedLayerNorm`` marks its weights the same way). `SequenceParallelTorchNorm` is the torch
norm plus that mark; `use_sequence_parallel_norms` puts it into a layer or block spec.

Without sequence parallelism it builds the same module as ``WrappedTorchNorm``.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["SequenceParallelTorchNorm", "use_sequence_parallel_norms"]


class SequenceParallelTorchNorm:
    """``WrappedTorchNorm`` (same arguments), allowed under sequence parallelism."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError(
                "zero-centered gamma / persistent / memory-efficient norms need apex or Transformer Engine"
            )
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"--normalization {config.normalization}: only LayerNorm and RMSNorm are built with torch")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel  # finalize_model_grads sums these over TP
        return norm


def use_sequence_parallel_norms(spec):
    """``spec`` (a ModuleSpec, submodules dataclass or block spec) with every
    ``WrappedTorchNorm`` replaced by `SequenceParallelTorchNorm`, in place; returns it."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def walk(node):
        if isinstance(node, ModuleSpec):
            if node.module is WrappedTorchNorm:
                node.module = SequenceParallelTorchNorm
            if node.submodules is not None:
                walk(node.submodules)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                value = getattr(node, f.name)
                if value is WrappedTorchNorm:
                    setattr(node, f.name, SequenceParallelTorchNorm)
                elif isinstance(value, list):
                    for item in value:
                        walk(item)
                else:
                    walk(value)

    walk(spec)
    return spec
