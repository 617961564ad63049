"""From rewards to per-token advantages.

Two stages, as in slime:

1. ``post_process_rewards`` (rollout side, once per rollout): per prompt group of
   ``n_samples_per_prompt`` samples, subtract the group mean (grpo, gspo,
   reinforce_plus_plus_baseline) and divide by the group std (grpo, gspo; off with
   --disable-grpo-std-normalization = Dr. GRPO). --disable-rewards-normalization keeps raw rewards.
2. ``compute_advantages`` (train side, after old/reference log-probs exist): the estimator
   turns each sample's reward into one advantage per response token, then
   --normalize-advantages whitens them over every supervised token of the rollout on all DP
   ranks (pass the DP process group).

Estimators (R = the sample's processed reward, kl_t = per-token KL(actor || ref)):

* grpo, gspo: A_t = R for every response token (gspo differs in the loss, not here);
* reinforce_plus_plus: token rewards r_t = -kl_coef * kl_t * mask_t, plus R on the last
  supervised token; A_t = sum_{s >= t} gamma^(s - t) r_s (discounted return);
* reinforce_plus_plus_baseline: A_t = R - kl_coef * kl_t (R is already group-mean-centred).

Samples are the train dicts of the actor: ``tokens``, ``response_length``, ``loss_mask`` and
``reward``, plus ``log_probs`` / ``rollout_log_probs`` / ``ref_log_probs`` (one value per
response token) when KL shaping needs them. Results are written as float32 tensors of
``response_length`` values under ``advantages`` and ``returns``.
"""

from __future__ import annotations

import logging

import torch

from slime.algorithms.config import GROUP_MEAN_ESTIMATORS, GROUP_STD_ESTIMATORS, AlgorithmConfig
from slime.algorithms.kl import approx_kl

logger = logging.getLogger(__name__)

__all__ = [
    "compute_advantages",
    "discounted_returns",
    "masked_moments",
    "masked_whiten",
    "normalize_group_rewards",
    "post_process_rewards",
]

GROUP_STD_EPS = 1e-6
WHITEN_EPS = 1e-8


def normalize_group_rewards(rewards: list[float], group_size: int, divide_std: bool) -> list[float]:
    """Subtract each group's mean (and divide by its unbiased std + 1e-6); groups are consecutive."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not form whole groups of --n-samples-per-prompt {group_size}")
    if not rewards:
        return []
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group_size)
    r = r - r.mean(dim=1, keepdim=True)
    if divide_std and group_size > 1:
        r = r / (r.std(dim=1, keepdim=True) + GROUP_STD_EPS)
    return r.flatten().tolist()


def post_process_rewards(cfg: AlgorithmConfig, rewards: list[float], n_samples_per_prompt: int) -> list[float]:
    """The rewards the estimator sees (see the module docstring); raw ones pass through unchanged."""
    if not cfg.rewards_normalization or cfg.advantage_estimator not in GROUP_MEAN_ESTIMATORS:
        return [float(r) for r in rewards]
    divide_std = cfg.grpo_std_normalization and cfg.advantage_estimator in GROUP_STD_ESTIMATORS
    return normalize_group_rewards(rewards, n_samples_per_prompt, divide_std)


def discounted_returns(token_rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over a 1-D sequence (G after the end is 0)."""
    out = torch.empty_like(token_rewards)
    running = token_rewards.new_zeros(())
    for t in range(token_rewards.numel() - 1, -1, -1):
        running = token_rewards[t] + gamma * running
        out[t] = running
    return out


def masked_moments(
    values: list[torch.Tensor], masks: list[torch.Tensor], process_group=None, device=None
) -> tuple[float, float, float]:
    """(mean, unbiased variance, count) of the masked entries of every tensor here and, with
    ``process_group``, on every rank of it (all ranks must call; ``device`` is where the
    collective runs, e.g. the GPU for NCCL)."""
    flat_v = torch.cat([v.double().flatten() for v in values]) if values else torch.zeros(0, dtype=torch.float64)
    flat_m = torch.cat([m.double().flatten() for m in masks]) if masks else torch.zeros(0, dtype=torch.float64)
    stats = torch.stack([(flat_v * flat_m).sum(), (flat_v * flat_v * flat_m).sum(), flat_m.sum()])
    if process_group is not None:
        import torch.distributed as dist

        stats = stats.to(device) if device is not None else stats
        dist.all_reduce(stats, group=process_group)
    total, total_sq, count = stats.tolist()
    if count == 0:
        return 0.0, 0.0, 0.0
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    if count >= 2:
        var *= count / (count - 1)
    return mean, var, count


def masked_whiten(
    values: list[torch.Tensor], masks: list[torch.Tensor], process_group=None, device=None
) -> list[torch.Tensor]:
    """(x - mean) / sqrt(var + 1e-8) with the `masked_moments` of all ranks of ``process_group``."""
    mean, var, count = masked_moments(values, masks, process_group, device)
    if count == 0:
        raise ValueError("--normalize-advantages: the rollout has no supervised token to whiten over")
    scale = 1.0 / (var + WHITEN_EPS) ** 0.5
    return [((v.double() - mean) * scale).to(v.dtype) for v in values]


def _token_field(sample: dict, key: str, index: int) -> torch.Tensor:
    value = sample.get(key)
    if value is None:
        raise ValueError(f"sample {index} has no {key!r} (needed by the advantage estimator)")
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() != sample["response_length"]:
        resp = sample["response_length"]
        raise ValueError(f"sample {index}: {key!r} has {t.numel()} values, response_length is {resp}")
    return t


def _rollout_data(cfg: AlgorithmConfig, samples: list[dict]) -> dict:
    """slime's rollout_data shape (lists over samples), which custom advantage functions expect."""
    masks, rewards = [], []
    for i, s in enumerate(samples):
        if "reward" not in s:
            raise ValueError(f"sample {i} has no 'reward'")
        mask = torch.as_tensor(s["loss_mask"], dtype=torch.float32)
        if mask.numel() != s["response_length"]:
            resp = s["response_length"]
            raise ValueError(f"sample {i}: loss_mask has {mask.numel()} values, response_length is {resp}")
        masks.append(mask)
        rewards.append(float(s["reward"]))
    data = {
        "rewards": rewards,
        "loss_masks": masks,
        "response_lengths": [s["response_length"] for s in samples],
        "total_lengths": [len(s["tokens"]) for s in samples],
    }
    for key in ("log_probs", "rollout_log_probs", "ref_log_probs"):
        present = [s.get(key) is not None for s in samples]
        data[key] = [_token_field(s, key, i) for i, s in enumerate(samples)] if samples and all(present) else None
    if cfg.kl_coef:
        policy_key = "rollout_log_probs" if cfg.use_rollout_logprobs else "log_probs"
        if data[policy_key] is None or data["ref_log_probs"] is None:
            raise ValueError(f"--kl-coef needs {policy_key!r} and 'ref_log_probs' on every sample")
        data["kl"] = [approx_kl(p, r, cfg.kl_loss_type) for p, r in zip(data[policy_key], data["ref_log_probs"])]
    else:
        data["kl"] = [torch.zeros_like(m) for m in masks]
    return data


def _estimate(cfg: AlgorithmConfig, data: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    rewards, kls, masks = data["rewards"], data["kl"], data["loss_masks"]
    if cfg.advantage_estimator in ("grpo", "gspo"):
        adv = [torch.full_like(m, r) for r, m in zip(rewards, masks)]
        return adv, adv
    if cfg.advantage_estimator == "reinforce_plus_plus_baseline":
        adv = [r - cfg.kl_coef * kl for r, kl in zip(rewards, kls)]
        return adv, adv
    returns = []
    for i, (r, kl, m) in enumerate(zip(rewards, kls, masks)):
        supervised = m.nonzero()
        if supervised.numel() == 0:
            raise ValueError(f"sample {i} has no supervised token: reinforce_plus_plus has nowhere to put its reward")
        token_rewards = -cfg.kl_coef * kl * m
        token_rewards[supervised[-1, 0]] += r
        returns.append(discounted_returns(token_rewards, cfg.gamma))
    return returns, returns


def compute_advantages(cfg: AlgorithmConfig, samples: list[dict], process_group=None, device=None) -> dict[str, float]:
    """Write ``advantages`` and ``returns`` into every sample (see the module docstring).

    ``process_group`` / ``device``: the data-parallel group (and the device its collectives
    need), so that --normalize-advantages and the returned statistics cover the whole rollout.
    Returns ``advantages_mean`` / ``advantages_std`` over the supervised tokens (after
    normalization) and ``returns_mean``.
    """
    data = _rollout_data(cfg, samples)
    if cfg.custom_advantage_function_path:
        from slime.utils.plugins import load_function

        flag = "--custom-advantage-function-path"
        fn = load_function(cfg.custom_advantage_function_path, flag, ("args", "rollout_data"))
        fn(cfg, data)
        if "advantages" not in data:
            raise ValueError("--custom-advantage-function-path: the function did not set rollout_data['advantages']")
        advantages = [torch.as_tensor(a, dtype=torch.float32).flatten() for a in data["advantages"]]
        returns = [torch.as_tensor(r, dtype=torch.float32).flatten() for r in data.get("returns", advantages)]
        for i, (a, s) in enumerate(zip(advantages, samples)):
            if a.numel() != s["response_length"]:
                resp = s["response_length"]
                raise ValueError(f"{flag}: sample {i} got {a.numel()} advantages, response_length is {resp}")
    else:
        advantages, returns = _estimate(cfg, data)
    if len(advantages) != len(samples):
        raise ValueError(f"{len(advantages)} advantage lists for {len(samples)} samples")
    if cfg.normalize_advantages:
        advantages = masked_whiten(advantages, data["loss_masks"], process_group, device)
    for s, a, r in zip(samples, advantages, returns):
        s["advantages"] = a.float()
        s["returns"] = r.float()
    adv_mean, adv_var, _ = masked_moments(advantages, data["loss_masks"], process_group, device)
    ret_mean, _, _ = masked_moments(returns, data["loss_masks"], process_group, device)
    return {"advantages_mean": adv_mean, "advantages_std": adv_var**0.5, "returns_mean": ret_mean}
