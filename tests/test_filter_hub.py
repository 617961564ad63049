"""Dynamic-sampling filters and buffer filters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from slime.rollout.data_source import pop_first as pop_first_from_data_source
from slime.rollout.filter_hub import DynamicFilterOutput, call_dynamic_filter
from slime.rollout.filter_hub.buffer_filters import pop_first
from slime.rollout.filter_hub.dynamic_sampling_filters import (
    check_reward_nonzero_std,
    check_reward_nonzero_std_with_fallback,
)
from slime.utils.types import Sample


def group(*rewards):
    return [Sample(index=i, reward=r) for i, r in enumerate(rewards)]


ARGS = SimpleNamespace(reward_key=None)


def test_nonzero_std_keeps_mixed_groups_and_names_the_reason():
    assert check_reward_nonzero_std(ARGS, group(1, 0, 1, 1)).keep is True
    out = check_reward_nonzero_std(ARGS, group(1, 1, 1, 1))
    assert out.keep is False and out.reason == "zero_std_1"
    assert check_reward_nonzero_std(ARGS, group(0.0, 0.0)).reason == "zero_std_0.0"
    assert check_reward_nonzero_std(ARGS, group(1)).keep is False  # one sample: no spread


def test_nonzero_std_uses_reward_key():
    args = SimpleNamespace(reward_key="score")
    samples = [Sample(index=0, reward={"score": 1.0}), Sample(index=1, reward={"score": -1.0})]
    assert check_reward_nonzero_std(args, samples).keep is True


def test_fallback_variant_marks_keep_when_insufficient():
    out = check_reward_nonzero_std_with_fallback(ARGS, group(0, 0))
    assert out.keep is False and out.keep_when_insufficient is True


def test_call_dynamic_filter_accepts_legacy_bool_and_rejects_other_types():
    assert call_dynamic_filter(None, ARGS, group(1)).keep is True
    assert call_dynamic_filter(lambda args, samples: False, ARGS, group(1)) == DynamicFilterOutput(keep=False)

    def broken(args, samples):
        return "yes"

    with pytest.raises(TypeError, match="broken returned str"):
        call_dynamic_filter(broken, ARGS, group(1))


def test_pop_first_is_fifo_and_removes_what_it_returns():
    buffer = [[Sample(index=i)] for i in range(5)]
    taken = pop_first(None, 0, buffer, 3)
    assert [g[0].index for g in taken] == [0, 1, 2] and [g[0].index for g in buffer] == [3, 4]
    assert [g[0].index for g in pop_first(None, 0, buffer, 10)] == [3, 4] and buffer == []
    assert pop_first_from_data_source is pop_first  # slime's import path
