"""The megatron-core CPU workarounds: one module, applied explicitly, reversible."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only compatibility layer")


def test_cpu_mode_is_explicit_and_reversible():
    import numpy as np
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.transformer.moe import token_dispatcher

    from slime.backends.megatron_utils import cpu_compat

    assert not cpu_compat.cpu_mode_enabled()  # importing patches nothing
    original_device, original_clip = torch.cuda.current_device, mcore_optimizer.clip_grad_by_total_norm_fp32
    original_to_host = token_dispatcher.maybe_move_tensor_to_cpu
    with cpu_compat.cpu_mode():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.cuda.current_device() == torch.device("cpu")
        t = torch.ones(3)
        assert t.cuda() is t and t.to("cuda").device.type == "cpu"
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.full((4,), 3.0)
        mcore_optimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
        torch.testing.assert_close(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
        mcore_optimizer.clip_grad_by_total_norm_fp32([p], max_norm=100.0, total_norm=6.0)  # no clip below max
        torch.testing.assert_close(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
        # The MoE all-to-all dispatcher's split sizes reach gloo as host (numpy) counts.
        counts = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
        assert isinstance(counts, np.ndarray) and counts.tolist() == [3, 1]
        kept = torch.tensor([2])
        assert token_dispatcher.maybe_move_tensor_to_cpu(kept) is kept
    assert torch.cuda.current_device is original_device
    assert mcore_optimizer.clip_grad_by_total_norm_fp32 is original_clip
    assert token_dispatcher.maybe_move_tensor_to_cpu is original_to_host
    assert not isinstance(original_to_host(torch.tensor([1]), as_numpy=True), np.ndarray)  # why it is needed
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
