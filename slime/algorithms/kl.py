"""Per-token KL estimators between the current policy and a reference (Schulman's k1/k2/k3).

With r = log p(x) - log p_ref(x) for a token x sampled from p:

* k1 = r                     unbiased for KL(p || ref), high variance, can be negative;
* k2 = r**2 / 2              biased, low variance, always >= 0;
* k3 = exp(-r) - 1 + r       unbiased and always >= 0 (ref/p - 1 - log(ref/p));
* low_var_kl = clamp(k3, -10, 10), k3 with its tail cut for stability.
"""

from __future__ import annotations

import torch

from slime.algorithms.config import KL_TYPES

__all__ = ["approx_kl"]

LOW_VAR_KL_BOUND = 10.0


def approx_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Elementwise KL estimate of ``kl_type`` (float32 or wider, same shape as the inputs)."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"unknown KL type {kl_type!r}; choose from {KL_TYPES}")
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    r = log_probs.to(dtype) - ref_log_probs.to(dtype)
    if kl_type == "k1":
        return r
    if kl_type == "k2":
        return 0.5 * r * r
    k3 = torch.expm1(-r) + r
    if kl_type == "low_var_kl":
        return k3.clamp(-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND)
    return k3
