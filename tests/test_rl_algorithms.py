"""slime/algorithms against values computed by hand: reward normalization, each advantage
estimator, each KL type, the clipped surrogate (both clip sides and dual clip), GSPO's
sequence ratio, entropy, TIS, the combined objective and its gradient, and the flags."""

from __future__ import annotations

import math

import pytest
import torch

from slime.algorithms.advantages import compute_advantages, masked_whiten, normalize_group_rewards, post_process_rewards
from slime.algorithms.config import AlgorithmConfig, add_algorithm_arguments, derive_global_batch_size
from slime.algorithms.kl import approx_kl
from slime.algorithms.policy import clipped_surrogate, entropy_from_logits, policy_objective, sequence_mean, tis_weights

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
LN = math.log


def approx(x, rel=1e-6):
    return pytest.approx(x, rel=rel, abs=1e-9)


# ------------------------------------------------------------------ rewards
def test_group_normalization_grpo_and_dr_grpo():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    # group 1: mean 1/3, deviations (2/3, -1/3, -1/3), unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = 1/sqrt(3)
    s = 1 / math.sqrt(3) + 1e-6
    assert normalize_group_rewards(rewards, 3, divide_std=True) == approx([2 / 3 / s, -1 / 3 / s, -1 / 3 / s, 0, 0, 0])
    assert normalize_group_rewards(rewards, 3, divide_std=False) == approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    with pytest.raises(ValueError, match="whole groups of --n-samples-per-prompt 4"):
        normalize_group_rewards(rewards, 4, divide_std=True)


def test_post_process_rewards_per_estimator_and_flags():
    rewards = [3.0, 1.0]  # one group of 2: mean 2, deviations (1, -1), unbiased std sqrt(2)
    s = math.sqrt(2) + 1e-6
    assert post_process_rewards(AlgorithmConfig(), rewards, 2) == approx([1 / s, -1 / s])
    assert post_process_rewards(AlgorithmConfig(advantage_estimator="gspo"), rewards, 2) == approx([1 / s, -1 / s])
    assert post_process_rewards(AlgorithmConfig(grpo_std_normalization=False), rewards, 2) == approx([1.0, -1.0])
    assert post_process_rewards(AlgorithmConfig(rewards_normalization=False), rewards, 2) == [3.0, 1.0]
    rpp_base = AlgorithmConfig(advantage_estimator="reinforce_plus_plus_baseline", normalize_advantages=True)
    assert post_process_rewards(rpp_base, rewards, 2) == approx([1.0, -1.0])  # mean only, never the std
    rpp = AlgorithmConfig(advantage_estimator="reinforce_plus_plus", normalize_advantages=True)
    assert post_process_rewards(rpp, rewards, 2) == [3.0, 1.0]  # raw: no group baseline


# ------------------------------------------------------------------ advantage estimators
def _sample(reward, mask, **fields):
    return {"tokens": list(range(2 + len(mask))), "response_length": len(mask), "loss_mask": mask, "reward": reward, **fields}


def test_grpo_and_gspo_broadcast_the_reward():
    for est in ("grpo", "gspo"):
        samples = [_sample(0.5, [1, 1, 0]), _sample(-2.0, [1])]
        compute_advantages(AlgorithmConfig(advantage_estimator=est), samples)
        assert samples[0]["advantages"].tolist() == [0.5, 0.5, 0.5]
        assert samples[1]["advantages"].tolist() == [-2.0]
        assert samples[0]["returns"].tolist() == [0.5, 0.5, 0.5]


KL_FIELDS = dict(log_probs=[-1.0, -2.0, -0.5], ref_log_probs=[-1.5, -2.0, -1.0])  # k1 = (0.5, 0, 0.5)


def test_reinforce_plus_plus_discounted_returns_with_kl_shaping():
    cfg = AlgorithmConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.1, gamma=0.5, normalize_advantages=True)
    s = _sample(1.0, [1, 1, 0], **KL_FIELDS)
    compute_advantages(cfg, [s])
    # token rewards: -0.1 * kl * mask = (-0.05, 0, 0), +1 on the last supervised token (index 1)
    # returns: G2 = 0, G1 = 1 + 0.5 * 0 = 1, G0 = -0.05 + 0.5 * 1 = 0.45
    assert s["returns"].tolist() == approx([0.45, 1.0, 0.0])
    # whitened over the supervised tokens (0.45, 1): mean 0.725, unbiased var 2 * 0.275^2 = 0.15125
    scale = 1 / math.sqrt(0.15125 + 1e-8)
    assert s["advantages"].tolist() == approx([-0.275 * scale, 0.275 * scale, -0.725 * scale], rel=1e-5)


def test_reinforce_plus_plus_baseline_subtracts_kl():
    cfg = AlgorithmConfig(advantage_estimator="reinforce_plus_plus_baseline", kl_coef=0.1, normalize_advantages=True)
    s = _sample(0.5, [1, 1, 1], **KL_FIELDS)
    compute_advantages(cfg, [s])
    assert s["returns"].tolist() == approx([0.45, 0.5, 0.45])  # 0.5 - 0.1 * (0.5, 0, 0.5)
    mean, var = 1.4 / 3, ((0.45 - 1.4 / 3) ** 2 * 2 + (0.5 - 1.4 / 3) ** 2) / 2
    assert s["advantages"].tolist() == approx([(x - mean) / math.sqrt(var + 1e-8) for x in (0.45, 0.5, 0.45)], rel=1e-5)


def test_kl_shaping_uses_rollout_log_probs_when_they_are_the_old_policy():
    cfg = AlgorithmConfig(
        advantage_estimator="reinforce_plus_plus_baseline", kl_coef=1.0, normalize_advantages=True, use_rollout_logprobs=True
    )
    s = _sample(0.0, [1, 1, 1], log_probs=[9.0, 9.0, 9.0], rollout_log_probs=KL_FIELDS["log_probs"], ref_log_probs=KL_FIELDS["ref_log_probs"])
    s_no_kl = dict(s)
    compute_advantages(cfg, [s])
    assert s["returns"].tolist() == approx([-0.5, 0.0, -0.5])
    del s_no_kl["ref_log_probs"]
    with pytest.raises(ValueError, match="'ref_log_probs'"):
        compute_advantages(cfg, [s_no_kl])


def custom_advantages(args, rollout_data):
    """A slime-style plugin: advantage = reward * position index; reads flags off ``args``."""
    pairs = zip(rollout_data["rewards"], rollout_data["loss_masks"])
    rollout_data["advantages"] = [torch.arange(len(m), dtype=torch.float32) * r * args.gamma for r, m in pairs]


def custom_advantages_too_short(args, rollout_data):
    rollout_data["advantages"] = [torch.zeros(1) for _ in rollout_data["rewards"]]


def test_custom_advantage_function_replaces_the_estimator():
    cfg = AlgorithmConfig(custom_advantage_function_path="test_rl_algorithms.custom_advantages", gamma=0.5)
    s = _sample(2.0, [1, 1, 1])
    compute_advantages(cfg, [s])
    assert s["advantages"].tolist() == [0.0, 1.0, 2.0]
    bad = AlgorithmConfig(custom_advantage_function_path="test_rl_algorithms.custom_advantages_too_short")
    with pytest.raises(ValueError, match="sample 0 got 1 advantages, response_length is 3"):
        compute_advantages(bad, [_sample(2.0, [1, 1, 1])])


def test_whitening_is_masked_and_spans_all_samples():
    a, b = masked_whiten([T(1.0, 100.0), T(3.0)], [T(1, 0), T(1)])
    # masked values (1, 3): mean 2, unbiased var 2
    s = 1 / math.sqrt(2 + 1e-8)
    assert a.tolist() == approx([-s, 98 * s]) and b.tolist() == approx([s])
    with pytest.raises(ValueError, match="no supervised token"):
        masked_whiten([T(1.0)], [T(0)])


# ------------------------------------------------------------------ KL
@pytest.mark.parametrize(
    "kl_type,r,expected",
    [
        ("k1", 0.5, 0.5),
        ("k1", -0.5, -0.5),
        ("k2", 0.5, 0.125),
        ("k2", -0.5, 0.125),
        ("k3", 0.5, math.exp(-0.5) - 1 + 0.5),  # 0.10653
        ("k3", -0.5, math.exp(0.5) - 1 - 0.5),  # 0.14872
        ("low_var_kl", 0.5, math.exp(-0.5) - 1 + 0.5),
        ("k3", -20.0, math.exp(20) - 21),
        ("low_var_kl", -20.0, 10.0),  # the tail is clamped
        ("k3", 0.0, 0.0),
    ],
)
def test_kl_estimators(kl_type, r, expected):
    # r = log p - log p_ref
    got = approx_kl(T(-1.0 + r), T(-1.0), kl_type)
    assert got.item() == approx(expected)


def test_unknown_kl_type():
    with pytest.raises(ValueError, match="unknown KL type"):
        approx_kl(T(0.0), T(0.0), "k4")


# ------------------------------------------------------------------ clipped surrogate
@pytest.mark.parametrize(
    "adv,ratio,expected,clipped",
    [
        (1.0, 1.5, -1.28, 1.0),  # above 1 + eps_high: the clipped branch wins, no gradient
        (1.0, 0.5, -0.5, 0.0),  # below 1 - eps with A > 0: unclipped
        (-1.0, 0.5, 0.8, 1.0),  # below 1 - eps with A < 0: clipped at 0.8
        (-1.0, 1.5, 1.5, 0.0),  # above with A < 0: unclipped
        (1.0, 1.1, -1.1, 0.0),  # inside the range
        (-1.0, 1.25, 1.25, 0.0),  # inside the asymmetric range (1.25 < 1.28)
    ],
)
def test_clip_both_sides_asymmetric(adv, ratio, expected, clipped):
    lr = T(LN(ratio)).requires_grad_()
    loss, clip, dual = clipped_surrogate(lr, T(adv), 0.2, 0.28)
    assert loss.item() == approx(expected) and clip.item() == clipped and dual.item() == 0
    loss.backward()
    assert lr.grad.item() == approx(0.0 if clipped else -adv * ratio)  # d(-A r)/d log r = -A r


@pytest.mark.parametrize(
    "adv,ratio,expected,dual",
    [
        (-1.0, 4.0, 3.0, 1.0),  # A < 0, ratio far above: capped at -c A = 3
        (-2.0, 2.0, 4.0, 0.0),  # under the cap (4 < 6)
        (1.0, 4.0, -1.2, 0.0),  # A > 0: dual clip never applies
    ],
)
def test_dual_clip(adv, ratio, expected, dual):
    lr = T(LN(ratio)).requires_grad_()
    loss, _, d = clipped_surrogate(lr, T(adv), 0.2, 0.2, eps_clip_c=3.0)
    assert loss.item() == approx(expected) and d.item() == dual
    loss.backward()
    if dual:
        assert lr.grad.item() == 0.0


def test_gspo_sequence_mean():
    values = T(1.0, 2.0, 3.0, 10.0, 20.0, 5.0)
    mask = T(1, 1, 0, 1, 1, 1)
    seg = torch.tensor([0, 0, 0, 1, 1, -1])
    assert sequence_mean(values, mask, seg).tolist() == [1.5, 1.5, 1.5, 15.0, 15.0, 0.0]


def test_gspo_ratio_is_per_sequence():
    cfg = AlgorithmConfig(advantage_estimator="gspo", eps_clip=0.2)
    # sequence 0: token log-ratios (ln 2, 0) -> mean ln sqrt(2) -> ratio 1.41421 -> clipped at 1.2 (A = 1)
    # sequence 1: (ln 0.9, ln 0.9) -> ratio 0.9 for both tokens, inside the range (A = 1)
    lp = T(LN(2), 0.0, LN(0.9), LN(0.9)).requires_grad_()
    loss, m = policy_objective(
        cfg, log_probs=lp, old_log_probs=T(0, 0, 0, 0), advantages=T(1, 1, 1, 1), weights=T(0.25, 0.25, 0.25, 0.25),
        segment_ids=torch.tensor([0, 0, 1, 1]),
    )
    assert loss.item() == approx(0.25 * (-1.2 - 1.2 - 0.9 - 0.9))
    assert m["pg_clipfrac"].item() == approx(0.5)
    assert m["ppo_kl"].item() == approx(-0.25 * (2 * LN(math.sqrt(2)) + 2 * LN(0.9)))
    loss.backward()
    # sequence 1: d/d lp_i of -0.25 * 2 * exp(mean) = -0.25 * 2 * 0.9 / 2 = -0.225; sequence 0 clipped: 0
    assert lp.grad.tolist() == approx([0.0, 0.0, -0.225, -0.225])


# ------------------------------------------------------------------ entropy and TIS
def test_entropy_from_logits():
    h = entropy_from_logits(torch.tensor([[0.0, 0.0], [0.0, LN(3)], [5.0, 5.0]], dtype=torch.float64))
    assert h.tolist() == approx([LN(2), -(0.25 * LN(0.25) + 0.75 * LN(0.75)), LN(2)])  # 0.69315, 0.56233, 0.69315


def test_tis_weights_truncate_both_ends():
    w, stats = tis_weights(T(-1.0, -3.0, -2.0), T(-2.0, -1.0, -2.0), clip=2.0, clip_low=0.5)
    # ratios exp(old - rollout) = (e, e^-2, 1) -> (2, 0.5, 1)
    assert w.tolist() == approx([2.0, 0.5, 1.0])
    assert stats["tis"].tolist() == approx([math.e, math.exp(-2), 1.0])
    assert stats["tis_clipfrac"].tolist() == [1.0, 1.0, 0.0]
    assert stats["tis_abs"].tolist() == approx([math.e - 1, 1 - math.exp(-2), 0.0])


# ------------------------------------------------------------------ the combined objective
def test_policy_objective_by_hand():
    """Two tokens, weights (0.25, 0.75): PPO (both clipped), entropy bonus, k1 KL loss, TIS."""
    cfg = AlgorithmConfig(entropy_coef=0.1, use_kl_loss=True, kl_loss_coef=0.5, use_tis=True, tis_clip=2.0)
    lp = T(LN(1.5), LN(0.5)).requires_grad_()
    loss, m = policy_objective(
        cfg, log_probs=lp, old_log_probs=T(0, 0), advantages=T(1, -1), weights=T(0.25, 0.75),
        entropy=T(1.0, 2.0), ref_log_probs=T(0, 0), rollout_log_probs=T(0, -LN(4)),
    )
    # surrogate: token 0 ratio 1.5, A=1 -> -1.2 (clipped); token 1 ratio 0.5, A=-1 -> 0.8 (clipped)
    # TIS weights clamp(exp(0 - rollout)) = (1, min(4, 2) = 2): pg = 0.25 * -1.2 * 1 + 0.75 * 0.8 * 2 = 0.9
    assert m["pg_loss"].item() == approx(0.9)
    assert m["pg_clipfrac"].item() == approx(1.0)
    assert m["ppo_kl"].item() == approx(0.25 * -LN(1.5) + 0.75 * -LN(0.5))  # 0.418494
    assert m["ppo_ratio"].item() == approx(0.25 * 1.5 + 0.75 * 0.5)
    assert m["entropy"].item() == approx(1.75)
    assert m["kl_loss"].item() == approx(0.25 * LN(1.5) + 0.75 * LN(0.5))  # k1 vs ref 0: -0.418494
    assert m["tis"].item() == approx(0.25 + 0.75 * 4) and m["tis_clipfrac"].item() == approx(0.75)
    assert m["train_rollout_logprob_abs_diff"].item() == approx(0.75 * LN(4))
    expected = 0.9 - 0.1 * 1.75 + 0.5 * (0.25 * LN(1.5) + 0.75 * LN(0.5))
    assert loss.item() == approx(expected) and m["loss"].item() == approx(expected)
    loss.backward()
    # both surrogate tokens are clipped (no gradient); the k1 KL term gives kl_loss_coef * weight
    assert lp.grad.tolist() == approx([0.5 * 0.25, 0.5 * 0.75])


def test_policy_objective_requires_its_inputs():
    base = dict(log_probs=T(0.0), old_log_probs=T(0.0), advantages=T(1.0), weights=T(1.0))
    with pytest.raises(ValueError, match="--use-tis needs"):
        policy_objective(AlgorithmConfig(use_tis=True), **base)
    with pytest.raises(ValueError, match="--use-kl-loss needs"):
        policy_objective(AlgorithmConfig(use_kl_loss=True), **base)
    with pytest.raises(ValueError, match="--entropy-coef needs"):
        policy_objective(AlgorithmConfig(entropy_coef=0.1), **base)
    with pytest.raises(ValueError, match="gspo needs segment_ids"):
        policy_objective(AlgorithmConfig(advantage_estimator="gspo"), **base)


# ------------------------------------------------------------------ flags
def _parse(argv, n_samples_per_prompt=8):
    import argparse

    p = add_algorithm_arguments(argparse.ArgumentParser())
    args = p.parse_args(argv)
    args.n_samples_per_prompt = n_samples_per_prompt
    return AlgorithmConfig.from_args(args)


def test_flags_parse_with_slime_names_and_defaults():
    assert _parse([]) == AlgorithmConfig()
    grpo = [
        "--advantage-estimator", "grpo", "--use-kl-loss", "--kl-loss-coef", "0.00", "--kl-loss-type", "low_var_kl",
        "--entropy-coef", "0.00", "--eps-clip", "0.2", "--eps-clip-high", "0.28",
    ]  # slime's run-qwen3-4B.sh GRPO_ARGS
    cfg = _parse(grpo)
    assert cfg.use_kl_loss and cfg.kl_loss_type == "low_var_kl" and cfg.clip_high == 0.28 and cfg.needs_ref_log_probs
    cfg = _parse(["--disable-grpo-std-normalization", "--disable-rewards-normalization", "--use-tis", "--tis-clip", "1.5"])
    assert not cfg.grpo_std_normalization and not cfg.rewards_normalization and cfg.use_tis and cfg.tis_clip == 1.5
    assert not _parse([], n_samples_per_prompt=1).grpo_std_normalization  # one sample per group has no std
    assert _parse(["--use-rollout-logprobs"]).needs_old_log_probs is False


def test_flags_join_the_trainer_parser():
    from slime.utils.arguments import get_parser

    p = get_parser()
    if not any(a.dest == "advantage_estimator" for a in p._actions):  # until the lead wires the group in
        add_algorithm_arguments(p)
    args = p.parse_args(["--eps-clip-c", "3", "--num-steps-per-rollout", "2"])
    assert AlgorithmConfig.from_args(args).eps_clip_c == 3.0


RPP_BASE = dict(advantage_estimator="reinforce_plus_plus_baseline", normalize_advantages=True)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(advantage_estimator="ppo"), "ppo needs a critic"),
        (dict(kl_coef=0.1), "--kl-coef shapes rewards for reinforce_plus_plus"),
        (dict(kl_loss_coef=0.1), "--kl-loss-coef has no effect without --use-kl-loss"),
        (dict(RPP_BASE, kl_coef=0.1, use_kl_loss=True, kl_loss_coef=0.1), "only one of --kl-coef"),
        (dict(advantage_estimator="reinforce_plus_plus"), "needs --normalize-advantages"),
        (dict(eps_clip_c=1.0), "--eps-clip-c"),
        (dict(eps_clip=1.5), "--eps-clip must be"),
        (dict(use_tis=True, use_rollout_logprobs=True), "choose one"),
        (dict(tis_clip=0.5, tis_clip_low=0.8), "--tis-clip-low"),
        (dict(kl_loss_type="k9"), "--kl-loss-type"),
    ],
)
def test_bad_flag_combinations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlgorithmConfig(**kwargs)


def test_global_batch_rule():
    assert derive_global_batch_size(32, 8, None, None) == 256  # one step per rollout
    assert derive_global_batch_size(32, 8, None, 4) == 64
    assert derive_global_batch_size(32, 8, 64, 4) == 64
    assert derive_global_batch_size(32, 8, 128, None) == 128
    with pytest.raises(ValueError, match="contradicts --num-steps-per-rollout"):
        derive_global_batch_size(32, 8, 100, 4)
    with pytest.raises(ValueError, match="equal steps"):
        derive_global_batch_size(32, 8, None, 3)
    with pytest.raises(ValueError, match="must divide"):
        derive_global_batch_size(32, 8, 100, None)
