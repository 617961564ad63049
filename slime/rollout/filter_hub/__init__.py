"""Filters of the rollout (slime's ``slime.rollout.filter_hub``).

* dynamic sampling filters (``--dynamic-sampling-filter-path``): ``fn(args, samples, **kwargs)``
  judges one finished group; returns `DynamicFilterOutput` (or a bool, the older form);
* buffer filters (``--buffer-filter-path``): ``fn(args, rollout_id, buffer, num_samples)``
  picks (and removes) up to ``num_samples`` groups from the partial-rollout buffer.
"""

from slime.rollout.filter_hub.base_types import DynamicFilterOutput, call_dynamic_filter

__all__ = ["DynamicFilterOutput", "call_dynamic_filter"]
