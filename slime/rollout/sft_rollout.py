"""The SFT rollout function: the next batch of rendered samples, no inference engine.

Signature shared by every rollout plugin (``--rollout-function-path``)::

    generate_rollout(args, rollout_id: int, data_buffer, evaluation: bool = False) -> list[Sample]

``data_buffer`` is the `slime.data.data_source.SFTDataSource` built at start-up; it owns the
tokenizer, chat template and validated index, so the function keeps no global state.
Each returned `Sample` has ``tokens``, ``response_length`` and ``loss_mask`` (slime's
convention: the mask covers the last ``response_length`` tokens) and ``reward`` 0.
"""

from __future__ import annotations

import logging

from slime.utils.types import Sample

__all__ = ["generate_rollout"]

logger = logging.getLogger(__name__)


def generate_rollout(args, rollout_id: int, data_buffer, evaluation: bool = False) -> list[Sample]:
    """Return the next ``args.rollout_batch_size`` SFT samples from ``data_buffer``."""
    if evaluation:
        raise ValueError("sft_rollout.generate_rollout does not generate evaluation rollouts; eval uses the SFT loss")
    if not args.rollout_batch_size:
        raise ValueError("--rollout-batch-size is required for SFT rollouts")
    samples = data_buffer.get_samples(args.rollout_batch_size)
    for sample in samples:
        if len(sample.loss_mask) != sample.response_length or sample.response_length > len(sample.tokens):
            raise AssertionError(f"sample {sample.index}: loss_mask/response_length/tokens disagree")
    if rollout_id == 0 and samples:
        s = samples[0]
        logger.debug("first SFT sample: %d tokens, %d supervised", len(s.tokens), s.effective_response_length)
    return samples
