"""Data order: seeded shuffle reshuffled per epoch, epochs seen whole, state resumes exactly."""

from __future__ import annotations

import pytest

from conftest import TINY, TINY_DATA
from slime.data.config import SFTDataConfig, build_data_source


@pytest.fixture(scope="module")
def prepared():
    return build_data_source(SFTDataConfig(prompt_data=str(TINY_DATA), hf_checkpoint=str(TINY)), progress=False).data


def make(prepared, shuffle=True, seed=7):
    from slime.data.data_source import SFTDataSource

    return SFTDataSource(prepared, shuffle=shuffle, seed=seed)


def test_epochs_are_permutations_and_reshuffled(prepared):
    src = make(prepared)
    n = len(src)
    e0, e1 = src.next_indices(n), src.next_indices(n)
    assert sorted(e0) == sorted(e1) == list(range(n))
    assert e0 != e1 and e0 != list(range(n))
    assert make(prepared).next_indices(n) == e0  # same seed, same order
    assert make(prepared, seed=8).next_indices(n) != e0


def test_no_shuffle_is_file_order_and_batches_cross_epochs(prepared):
    src = make(prepared, shuffle=False)
    n = len(src)
    first = src.next_indices(n - 3)
    crossing = src.next_indices(6)
    assert first == list(range(n - 3))
    assert crossing == [n - 3, n - 2, n - 1, 0, 1, 2]
    assert (src.epoch, src.offset) == (1, 3)


def test_resume_continues_with_the_next_sample(prepared):
    ref = make(prepared)
    batches = [[s.tokens for s in ref.get_samples(7)] for _ in range(30)]  # crosses epochs
    run = make(prepared)
    for _ in range(13):
        run.get_samples(7)
    state = run.state_dict()
    resumed = make(prepared)
    resumed.load_state_dict(state)
    assert [[s.tokens for s in resumed.get_samples(7)] for _ in range(17)] == batches[13:]


def test_resume_refuses_other_data_or_seed(prepared):
    state = make(prepared).state_dict()
    with pytest.raises(ValueError, match="saved seed=7"):
        make(prepared, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        make(prepared).load_state_dict({**state, "fingerprint": "0" * 16})


def test_num_rollouts_follows_slime(prepared):
    src = make(prepared)
    assert src.num_rollouts(num_epoch=3, rollout_batch_size=16) == 3 * len(src) // 16
    with pytest.raises(ValueError):
        src.num_rollouts(1, 0)


def test_sample_indices_are_global_positions(prepared):
    src = make(prepared)
    a = src.get_samples(5)
    b = src.get_samples(5)
    assert [s.index for s in a + b] == list(range(10))
