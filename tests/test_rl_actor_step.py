"""One rollout of RL training on one rank (MegatronActor.train_rollout) in slime's order, and the
reference model: its log-probs equal an actor built on the reference weights, survive training
and swapping, and resume reloads them from where the run started (--ref-load / HF), not --load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY
from megatron_helpers import build_actor, synthetic_samples

VOCAB = 849  # tiny-qwen3's tokenizer
GBS = 4  # two optimizer steps per rollout of 8 samples
KL = dict(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k3")


def batching():
    from slime.backends.megatron_utils.batching import BatchingArgs

    return BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=300, calculate_per_token_loss=True)


def rl_actor(**algo):
    from slime.algorithms.config import AlgorithmConfig

    return build_actor(TINY, batching(), GBS, "policy_loss", AlgorithmConfig(**algo))


def rollout(seed: int, log_probs: list[torch.Tensor] | None = None) -> list[dict]:
    """8 samples as the rollout manager sends them: processed rewards, engine log-probs (a
    perturbed copy of ``log_probs``, as list[float]) or None."""
    out = synthetic_samples(8, VOCAB, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for i, s in enumerate(out):
        s["reward"] = 1.0 if i % 3 == 0 else -0.5
        s["rollout_log_probs"] = None
        if log_probs is not None:
            s["rollout_log_probs"] = (log_probs[i] + 0.05 * torch.randn(log_probs[i].shape, generator=g)).tolist()
    return out


def masked_mean(values, samples) -> float:
    num = sum(float((torch.as_tensor(v) * torch.tensor(s["loss_mask"])).sum()) for v, s in zip(values, samples))
    return num / sum(sum(s["loss_mask"]) for s in samples)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Actor A (GRPO + k3 KL loss, reference = TINY) trained on two rollouts; what it saw."""
    from slime.backends.megatron_utils.checkpoint import save_model_weights
    from slime.backends.megatron_utils.cpu_compat import disable_cpu_mode
    from slime.backends.megatron_utils.parallel import destroy_parallel

    root = tmp_path_factory.mktemp("rl")
    actor = rl_actor(**KL)
    first = rollout(seed=1)
    initial = actor.compute_log_probs(first)["log_probs"]
    first = rollout(seed=1, log_probs=initial)
    keys_before = [set(s) for s in first]
    metrics1 = actor.train_rollout([first[:4], first[4:]])
    save_model_weights(actor.model.module, str(root / "ref"))  # a --ref-load for the resume test
    mid = actor.compute_log_probs(first)["log_probs"]
    metrics2 = actor.train_rollout([rollout(seed=2)[:4], rollout(seed=2)[4:]])
    actor.save(str(root / "ckpt"), 1, {"rollout_id": 1, "step": actor.step})
    yield dict(actor=actor, first=first, initial=initial, mid=mid, m1=metrics1, m2=metrics2, root=root, keys=keys_before)
    destroy_parallel()
    disable_cpu_mode()


def test_rollout_values_come_from_the_pre_update_policy(run):
    m1, first, initial = run["m1"], run["first"], run["initial"]
    assert [m["step"] for m in m1] == [1, 2]
    # Step 1 is on-policy and the reference is the starting point: ratio 1, nothing clipped, KL 0.
    assert abs(m1[0]["ppo_kl"]) < 1e-7 and m1[0]["ppo_ratio"] == pytest.approx(1.0, abs=1e-7)
    assert m1[0]["pg_clipfrac"] == 0 and abs(m1[0]["kl_loss"]) < 1e-7 and abs(m1[0]["ref_kl"]) < 1e-7
    # Step 2 still compares with the old log-probs computed before step 1 (slime's order).
    assert abs(m1[1]["ppo_kl"]) > 1e-4 and m1[1]["kl_loss"] > 1e-6
    # GRPO: each supervised token's advantage is its sample's reward; stats over the whole rollout.
    rewards = [torch.full((s["response_length"],), s["reward"]) for s in first]
    mean = masked_mean(rewards, first)
    var = masked_mean([(r - mean) ** 2 for r in rewards], first)
    n = sum(sum(s["loss_mask"]) for s in first)
    for m in m1:
        assert m["advantages_mean"] == pytest.approx(mean, abs=1e-6)
        assert m["advantages_std"] == pytest.approx((var * n / (n - 1)) ** 0.5, rel=1e-6)
    # Engine vs trainer log-probs of step 1's samples (per-token mean), before any update.
    diffs = [(lp - torch.tensor(s["rollout_log_probs"])).abs() for lp, s in zip(initial[:4], first[:4])]
    assert m1[0]["train_rollout_logprob_abs_diff"] == pytest.approx(masked_mean(diffs, first[:4]), rel=1e-4)
    for key in ("loss", "pg_loss", "entropy", "grad_norm", "lr", "tokens_per_s", "log_probs_time_s", "ref_log_probs_time_s"):
        assert key in m1[0], key
    # The caller's sample dicts are left as they came.
    assert [set(s) for s in first] == run["keys"]
    # Second rollout: the actor has moved away from the reference.
    assert run["m2"][0]["ref_kl"] > 1e-6 and run["m2"][0]["kl_loss"] > 1e-6


def test_reference_equals_an_actor_built_on_the_reference_weights(run):
    actor, first = run["actor"], run["first"]
    separate = build_actor(TINY, batching(), GBS)  # plain SFT actor on TINY = the reference weights
    expected = separate.compute_log_probs(first)["log_probs"]
    current = actor.compute_log_probs(first)["log_probs"]
    ref = actor.compute_ref_log_probs(first)
    for e, r, i in zip(expected, ref, run["initial"]):
        assert torch.equal(r, e) and torch.equal(r, i)
    # The swap gives the actor its own weights back, bit for bit; they differ from the reference.
    for c, again in zip(current, actor.compute_log_probs(first)["log_probs"]):
        assert torch.equal(c, again)
    assert max(float((c - r).abs().max()) for c, r in zip(current, ref)) > 1e-3


def test_resume_reloads_the_reference_from_where_the_run_started(run):
    actor, first, root = run["actor"], run["first"], run["root"]
    current = actor.compute_log_probs(first)["log_probs"]

    from_hf = rl_actor(**KL)
    state = from_hf.load(str(root / "ckpt"), hf_checkpoint=str(TINY))
    assert state["rollout_id"] == 1 and state["ref_source"] == f"hf:{TINY}" and from_hf.step == 4
    for got, want in zip(from_hf.compute_log_probs(first)["log_probs"], current):
        assert torch.equal(got, want)  # the resumed weights
    for got, want in zip(from_hf.compute_ref_log_probs(first), run["initial"]):
        assert torch.equal(got, want)  # the reference is TINY's, not the resumed weights

    from_dist = rl_actor(**KL)
    from_dist.load(str(root / "ckpt"), ref_load=str(root / "ref"))
    for got, want in zip(from_dist.compute_ref_log_probs(first), run["mid"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert from_dist.ref.source.startswith("torch_dist:")

    with pytest.raises(ValueError, match="--ref-load or --hf-checkpoint"):
        rl_actor(**KL).load(str(root / "ckpt"))


def test_use_rollout_logprobs_takes_the_engines_as_the_old_policy(run):
    from slime.algorithms.config import AlgorithmConfig

    actor = run["actor"]
    actor.loss_ctx = dataclasses.replace(actor.loss_ctx, algorithm=AlgorithmConfig(use_rollout_logprobs=True))
    try:
        with pytest.raises(ValueError, match="--use-rollout-logprobs needs the engine's log-probs.*sample 0"):
            actor.train_rollout([rollout(seed=3)[:4], rollout(seed=3)[4:]])
        data = rollout(seed=3, log_probs=actor.compute_log_probs(rollout(seed=3))["log_probs"])
        now = actor.compute_log_probs(data[:4])["log_probs"]
        m = actor.train_rollout([data[:4], data[4:]])[0]
    finally:
        actor.loss_ctx = dataclasses.replace(actor.loss_ctx, algorithm=AlgorithmConfig(**KL))
    assert "ref_log_probs_time_s" not in m and "ref_kl" not in m  # no KL term: no reference forward
    assert m["train_rollout_logprob_abs_diff"] == 0
    # ppo_kl = mean(old - new) with old = the engine's values.
    gap = [torch.tensor(s["rollout_log_probs"]) - lp for s, lp in zip(data[:4], now)]
    assert m["ppo_kl"] == pytest.approx(masked_mean(gap, data[:4]), rel=1e-4, abs=1e-7)


def test_sft_rollout_is_one_train_step_per_step(run):
    twins = [build_actor(TINY, batching(), GBS) for _ in range(2)]
    data = synthetic_samples(8, VOCAB, seed=7)
    by_rollout = twins[0].train_rollout([data[:4], data[4:]])
    by_step = [twins[1].train_step(data[:4]), twins[1].train_step(data[4:])]
    assert [m["loss"] for m in by_rollout] == [m["loss"] for m in by_step]
    assert "advantages_mean" not in by_rollout[0]


def test_custom_loss_gets_rl_fields_for_rl_samples(run):
    """A custom loss (here policy_loss by path) sees advantages and old log-probs when the rollout
    carries rewards, like policy_loss itself."""
    from slime.algorithms.config import AlgorithmConfig
    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs

    actor = run["actor"]
    custom = MegatronActor(
        actor.model_args,
        actor.build_args,
        batching(),
        actor.optim_args,
        TrainArgs(GBS, 10, loss_type="custom_loss", custom_loss_function_path="slime.backends.megatron_utils.loss.policy_loss"),
        AlgorithmConfig(),
    )
    custom.load_hf(str(TINY))
    m = custom.train_rollout([rollout(seed=4)[:4], rollout(seed=4)[4:]])
    assert abs(m[0]["ppo_kl"]) < 1e-7 and "advantages_mean" in m[0]
