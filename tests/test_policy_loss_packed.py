"""Invariant 1 for policy_loss: loss, metrics and gradients equal those of the formula applied per
sample on transformers' float64 log-probs, whatever the packing, micro-batching, TP or DP; the
actor's log-probs and entropies are transformers'; a step moves log-probs along the advantages."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY, run_torchrun
from megatron_helpers import attach_rl_fields, build_actor, hf_policy_reference, hf_response_log_probs, synthetic_samples

N_SAMPLES = 8
VOCAB = 849  # tiny-qwen3's tokenizer; its padded vocabulary (896) exercises the padding mask
DIST_TIMEOUT_S = 240
BUCKET_BYTES = 100_000  # TP=2 weight sync: several buckets, some single tensors above the cap

# Every feature at once, so each one's contribution is part of what must match.
FULL = dict(
    eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=1.5, entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1,
    kl_loss_type="k3", use_tis=True, tis_clip=1.2, tis_clip_low=0.8,
)
GSPO = dict(
    advantage_estimator="gspo", eps_clip=0.02, eps_clip_high=0.03, use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="low_var_kl"
)

LAYOUTS = {
    "thd_dynamic": dict(use_dynamic_batch_size=True, max_tokens_per_gpu=160),
    "thd_mbs3": dict(micro_batch_size=3),
    "sbhd_mbs1_unpacked": dict(qkv_format="sbhd", micro_batch_size=1),
    "sbhd_mbs4_padded": dict(qkv_format="sbhd", micro_batch_size=4),
}
METRICS = ("loss", "pg_loss", "pg_clipfrac", "pg_dualclipfrac", "ppo_kl", "ppo_ratio", "entropy", "kl_loss")


@pytest.fixture(scope="module")
def samples():
    out = synthetic_samples(N_SAMPLES, VOCAB, seed=3)
    _, log_probs, _ = hf_response_log_probs(TINY, out)
    attach_rl_fields(out, log_probs, seed=4)
    return out


@pytest.fixture(scope="module")
def actor():
    from slime.algorithms.config import AlgorithmConfig
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.cpu_compat import disable_cpu_mode
    from slime.backends.megatron_utils.parallel import destroy_parallel

    a = build_actor(TINY, BatchingArgs(), N_SAMPLES, "policy_loss", AlgorithmConfig())
    yield a
    destroy_parallel()
    disable_cpu_mode()


def hf_grads(actor, grads):
    from slime.backends.megatron_utils.hf_weights import mcore_to_hf

    return mcore_to_hf([grads], actor.model_args)


def assert_grads_close(ours: dict, ref: dict, name: str) -> None:
    assert set(ours) <= set(ref), name
    for k, g in ours.items():
        torch.testing.assert_close(g.double(), ref[k], rtol=1e-4, atol=1e-7, msg=f"{name}: {k}")


@pytest.mark.parametrize("algo,per_token", [(FULL, True), (GSPO, False)], ids=["full_per_token", "gspo_per_sample"])
def test_policy_loss_matches_formula_for_every_layout(actor, samples, algo, per_token):
    from slime.algorithms.config import AlgorithmConfig
    from slime.backends.megatron_utils.batching import BatchingArgs

    cfg = AlgorithmConfig(**algo)
    ref_loss, ref_metrics, ref_grads = hf_policy_reference(TINY, samples, cfg, per_token)
    # The data must exercise what is tested: both clip outcomes, and the TIS truncation.
    assert 0.05 < ref_metrics["pg_clipfrac"] < 0.95
    if cfg.use_tis:
        assert ref_metrics["pg_dualclipfrac"] > 0 and 0.05 < ref_metrics["tis_clipfrac"] < 0.95
    actor.load_hf(str(TINY))  # a previous case stepped the optimizer
    actor.loss_ctx = dataclasses.replace(actor.loss_ctx, algorithm=cfg)
    for name, layout in LAYOUTS.items():
        actor.batching = BatchingArgs(calculate_per_token_loss=per_token, **layout)
        loss, grads = actor.gradients(samples)
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7), name
        assert_grads_close(hf_grads(actor, grads), ref_grads, name)
    metrics = actor.train_step(samples)  # last layout; the metrics of the step before its update
    for key in METRICS + (("tis", "tis_clipfrac", "tis_abs", "train_rollout_logprob_abs_diff") if cfg.use_tis else ()):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), key


def test_compute_log_probs_match_transformers(actor, samples):
    from slime.backends.megatron_utils.batching import BatchingArgs

    _, ref_lp, ref_ent = hf_response_log_probs(TINY, samples)
    actor.load_hf(str(TINY))  # earlier tests stepped the optimizer
    for layout in ("thd_dynamic", "sbhd_mbs4_padded"):
        actor.batching = BatchingArgs(**LAYOUTS[layout])
        out = actor.compute_log_probs(samples, with_entropy=True)
        assert len(out["log_probs"]) == len(samples)
        for s, lp, ent, r_lp, r_ent in zip(samples, out["log_probs"], out["entropy"], ref_lp, ref_ent):
            assert lp.shape == (s["response_length"],)
            torch.testing.assert_close(lp.double(), r_lp, rtol=0, atol=2e-5)
            torch.testing.assert_close(ent.double(), r_ent, rtol=0, atol=2e-5)


def test_a_step_moves_log_probs_along_the_advantages(actor, samples):
    """On-policy GRPO steps (plain SGD, so the step is the gradient): with every advantage +1 the
    supervised tokens gain log-probability, with -1 they lose it; with mixed signs the
    positive samples gain more than the negative ones."""
    from slime.algorithms.config import AlgorithmConfig
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs

    batching = BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=400, calculate_per_token_loss=True)
    optim = OptimizerArgs(optimizer="sgd", lr=0.5, weight_decay=0.0)
    sgd = build_actor(TINY, batching, N_SAMPLES, "policy_loss", AlgorithmConfig(), optim=optim)
    masks = [torch.tensor(s["loss_mask"], dtype=torch.bool) for s in samples]

    def mean_gain(signs):
        sgd.load_hf(str(TINY))
        before = sgd.compute_log_probs(samples)["log_probs"]
        on_policy = [{**s, "log_probs": lp, "advantages": torch.full_like(lp, a)} for s, lp, a in zip(samples, before, signs)]
        metrics = sgd.train_step(on_policy)
        assert metrics["pg_clipfrac"] == 0 and abs(metrics["ppo_kl"]) < 1e-6  # ratio 1 everywhere
        after = sgd.compute_log_probs(samples)["log_probs"]
        return [float((a - b)[m].mean()) for a, b, m in zip(after, before, masks)]

    assert all(g > 0 for g in mean_gain([1.0] * N_SAMPLES))
    assert all(g < 0 for g in mean_gain([-1.0] * N_SAMPLES))
    signs = [1.0 if i % 2 else -1.0 for i in range(N_SAMPLES)]
    gains = mean_gain(signs)
    pos = [g for g, a in zip(gains, signs) if a > 0]
    neg = [g for g, a in zip(gains, signs) if a < 0]
    assert min(pos) > max(neg)


def test_policy_loss_needs_its_fields(actor, samples):
    from slime.algorithms.config import AlgorithmConfig
    from slime.backends.megatron_utils.batching import BatchingArgs

    actor.batching = BatchingArgs()
    actor.loss_ctx = dataclasses.replace(actor.loss_ctx, algorithm=AlgorithmConfig())
    bare = [{k: s[k] for k in ("tokens", "loss_mask", "response_length", "log_probs")} for s in samples]
    with pytest.raises(ValueError, match="'advantages'"):
        actor.gradients(bare)
    partial = [dict(s) for s in samples]
    del partial[2]["ref_log_probs"]
    with pytest.raises(ValueError, match="'ref_log_probs' is set on some samples but missing on sample 2"):
        actor.gradients(partial)
    short = [dict(s) for s in samples]
    short[1]["advantages"] = short[1]["advantages"][:-1]
    with pytest.raises(ValueError, match="sample 1: 'advantages' has"):
        actor.gradients(short)


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory, samples):
    """One two-process run (tests/rl_dist_worker.py) for the TP=2 / DP=2 checks and the TP=2
    weight-sync buckets: (result, samples with rewards, config, advantage config)."""
    from slime.algorithms.config import AlgorithmConfig

    tmp_path = tmp_path_factory.mktemp("dist")
    cfg = AlgorithmConfig(**FULL)
    adv_cfg = AlgorithmConfig(advantage_estimator="reinforce_plus_plus_baseline", kl_coef=0.05, normalize_advantages=True)
    with_rewards = [{**s, "reward": float(i % 3) - 1.0} for i, s in enumerate(samples)]
    spec = {
        "samples": with_rewards,
        "algorithm": dataclasses.asdict(cfg),
        "advantage_algorithm": dataclasses.asdict(adv_cfg),
        "per_token": True,
        "bucket_bytes": BUCKET_BYTES,
    }
    torch.save(spec, tmp_path / "in.pt")
    run_torchrun(2, "rl_dist_worker.py", TINY, tmp_path / "in.pt", tmp_path / "out.pt", timeout=DIST_TIMEOUT_S)
    return torch.load(tmp_path / "out.pt", weights_only=True), with_rewards, cfg, adv_cfg


def test_tp2_and_dp2_match_the_formula(dist_run, samples):
    """Vocab-parallel log-probs and entropy (TP=2); DP-summed gradients, metrics and advantage
    whitening (DP=2)."""
    from slime.algorithms.advantages import compute_advantages

    result, with_rewards, cfg, adv_cfg = dist_run
    per_token = True
    ref_loss, ref_metrics, ref_grads = hf_policy_reference(TINY, samples, cfg, per_token)
    _, ref_lp, ref_ent = hf_response_log_probs(TINY, samples)
    for lp, ent, r_lp, r_ent in zip(result["tp2"]["log_probs"], result["tp2"]["entropy"], ref_lp, ref_ent):
        torch.testing.assert_close(lp.double(), r_lp, rtol=0, atol=2e-5)
        torch.testing.assert_close(ent.double(), r_ent, rtol=0, atol=2e-5)
    for name in ("tp2", "dp2"):
        entry = result[name]
        assert entry["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-7), name
        assert_grads_close(entry["grads"], ref_grads, name)
        for key in METRICS + ("tis", "tis_clipfrac"):
            assert entry["metrics"][key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), f"{name}: {key}"
    # DP=2 advantages (rank 0 holds samples 0, 2, 4...) equal one process whitening all of them.
    whole = [dict(s) for s in with_rewards]
    stats = compute_advantages(adv_cfg, whole)
    for got, s in zip(result["dp2"]["advantages"], whole[::2]):
        torch.testing.assert_close(got, s["advantages"], rtol=1e-5, atol=1e-6)
    assert result["dp2"]["advantage_stats"] == pytest.approx(stats, abs=1e-6)
    assert stats["advantages_mean"] == pytest.approx(0, abs=1e-6) and stats["advantages_std"] == pytest.approx(1, abs=1e-3)




def test_tp2_weight_sync_buckets_give_the_actors_log_probs(dist_run):
    """DESIGN invariant 8 at TP=2: the buckets rank 0 streams after a step (TP shards gathered,
    HF names, under the cap unless one tensor is larger) loaded into transformers by the
    engine's own weight loader give the actor's log-probs of a fixed sequence."""
    from transformers import AutoModelForCausalLM

    from slime.engines.weights import apply_named_tensors

    result, with_rewards, _, _ = dist_run
    buckets, probe = result["tp2"]["buckets"], with_rewards[0]
    assert len(buckets) > 3
    assert all(sum(t.numel() * t.element_size() for _, t in b) <= BUCKET_BYTES or len(b) == 1 for b in buckets)
    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for b in buckets for n, _ in b]
    assert len(names) == len(set(names)) and set(names) | {"lm_head.weight"} == set(before)
    for b in buckets:
        apply_named_tensors(model, b)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the step changed weights
    ids = torch.tensor(probe["tokens"])[None]
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].double().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(logp[-probe["response_length"] :], result["tp2"]["probe_log_probs"].double(), rtol=0, atol=2e-5)
