"""A GPTModel whose last stage returns the output layer's input instead of its logits.

With the memory-lean cross-entropy (`lean_ce`) the loss applies the output projection itself,
chunk by chunk, so the model must stop before it: `OutputHead` carries the final hidden states
(after the final norm) and the output layer with its weight (the embedding's when tied). The
module tree and state dict are those of megatron's GPTModel, so checkpoints, weight sync and
HF conversion do not change; ``OutputHead.logits()`` gives exactly what the model would have
returned, for custom losses and parity checks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["OutputHead", "head_output_gpt_model_class"]


@dataclass
class OutputHead:
    """The output layer's input on this rank.

    hidden: ``[s, b, h]`` in megatron's layout (the sequence split over TP under sequence
        parallelism); layer: the column-parallel output layer; weight: the tied embedding
        weight, or None for the layer's own.
    """

    hidden: torch.Tensor
    layer: torch.nn.Module
    weight: torch.Tensor | None = None

    @property
    def output_weight(self) -> torch.Tensor:
        """This TP rank's ``[V/tp, h]`` slice of the output projection."""
        return self.weight if self.weight is not None else self.layer.weight

    def tp_hidden(self) -> torch.Tensor:
        """``[b, s, h]`` hidden states as every TP rank's output projection sees them: gathered
        over the sequence under sequence parallelism, and with a backward that sums the
        ranks' partial input gradients (what the column-parallel layer does on its input)."""
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        if getattr(self.layer, "sequence_parallel", False):
            full = gather_from_sequence_parallel_region(self.hidden, tensor_parallel_output_grad=True)
        else:
            full = copy_to_tensor_model_parallel_region(self.hidden)
        return full.transpose(0, 1)

    def logits(self) -> torch.Tensor:
        """This TP rank's vocabulary slice of the logits, ``[b, s, V/tp]`` (the plain model's output)."""
        out, _ = self.layer(self.hidden, weight=self.weight)
        return out.transpose(0, 1).contiguous()


@functools.cache
def head_output_gpt_model_class():
    """megatron's GPTModel, returning an `OutputHead` where it would return logits (training and
    scoring forwards without labels, MTP or inference contexts: those keep megatron's path)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    class HeadOutputGPTModel(GPTModel):
        def _postprocess(self, hidden_states, **kwargs):
            plain = (
                not self.post_process
                or self.mtp_process
                or self.config.mtp_num_layers is not None
                or kwargs.get("labels") is not None
                or kwargs.get("inference_context") is not None
            )
            if plain:
                return super()._postprocess(hidden_states, **kwargs)
            weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
            return OutputHead(hidden=hidden_states, layer=self.output_layer, weight=weight)

    return HeadOutputGPTModel
