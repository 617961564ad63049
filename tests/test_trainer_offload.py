"""--offload-train: the actor's whole training state leaves its device between rollouts (every
storage released) and comes back bit-exactly, so a run with offload equals one without."""

from __future__ import annotations

import pytest
import torch

from test_rl_actor_step import KL, rl_actor, rollout


@pytest.fixture(scope="module")
def actors():
    from slime.backends.megatron_utils.cpu_compat import disable_cpu_mode
    from slime.backends.megatron_utils.parallel import destroy_parallel

    yield rl_actor(**KL), rl_actor(**KL)
    destroy_parallel()
    disable_cpu_mode()


def _state(actor) -> list[torch.Tensor]:
    from slime.backends.megatron_utils.offload import actor_tensors

    return list(actor_tensors([actor.model], actor.optimizer))


def _steps(r):
    return [r[:4], r[4:]]


def test_offload_releases_every_storage_and_onload_restores_it_bit_exactly(actors):
    plain, offloaded = actors
    first, second = rollout(seed=1), rollout(seed=2)
    m_plain = plain.train_rollout(_steps(first))
    m_off = offloaded.train_rollout(_steps(first))
    # After a step the state includes Adam's moments and the grad buffers.
    state = _state(offloaded)
    assert any("exp_avg" in k for st in offloaded.optimizer.optimizer.state.values() for k in st)
    before = [t.detach().clone() for t in state]
    released = offloaded.offload()
    assert released >= sum(p.numel() * p.element_size() for p in offloaded.model.module.parameters())
    assert all(t.untyped_storage().nbytes() == 0 for t in state)
    with pytest.raises(RuntimeError, match="offloaded"):
        offloaded.compute_log_probs(second)
    with pytest.raises(RuntimeError, match="offloaded"):
        offloaded.megatron_state()
    assert offloaded.onload() == released
    for t, b in zip(_state(offloaded), before):
        assert torch.equal(t, b)
    # The next rollout (old / reference log-probs, two optimizer steps) is the same as without.
    m_plain += plain.train_rollout(_steps(second))
    m_off += offloaded.train_rollout(_steps(second))
    for a, b in zip(m_plain, m_off):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]
    for (name, a), b in zip(plain.model.module.named_parameters(), offloaded.model.module.parameters()):
        assert torch.equal(a, b), name


def test_offload_twice_is_an_error_and_onload_when_resident_is_a_no_op(actors):
    _, actor = actors
    assert actor.onload() == 0
    actor.offload()
    with pytest.raises(RuntimeError, match="already offloaded"):
        actor.offload()
    actor.onload()


def test_offload_in_two_stages_keeps_the_weights_for_a_sync(actors):
    """The colocate order: all but the weights first (a weight sync still reads them), then the
    weights; onload brings everything back bit-exactly."""
    from slime.backends.megatron_utils.offload import weight_tensors

    _, actor = actors
    weights = {t.untyped_storage().data_ptr() for t in weight_tensors([actor.model])}
    before = [t.detach().clone() for t in _state(actor)]
    is_weight = [t.untyped_storage().data_ptr() in weights for t in _state(actor)]
    assert not all(is_weight)  # grads and Adam moments are storages of their own
    expected = dict(actor.megatron_state())
    rest = actor.offload(keep_weights=True)
    assert rest > 0
    assert [t.untyped_storage().nbytes() > 0 for t in _state(actor)] == is_weight
    got = actor.megatron_state()  # what a weight sync reads is still there
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    with pytest.raises(RuntimeError, match="offloaded"):
        actor.compute_log_probs(rollout(seed=3))  # training state is not
    with pytest.raises(RuntimeError, match="already offloaded"):
        actor.offload(keep_weights=True)
    rest_of_it = actor.offload()
    assert all(t.untyped_storage().nbytes() == 0 for t in _state(actor))
    with pytest.raises(RuntimeError, match="offloaded"):
        actor.megatron_state()
    assert actor.onload() == rest + rest_of_it
    for t, b in zip(_state(actor), before):
        assert torch.equal(t, b)
