"""Memory-lean vocab-parallel cross-entropy (`lean_ce`): the same log-probs, entropy and
gradients as the plain path (megatron's CE on materialised logits), at TP=1 and TP=2, through
the actor's losses and scoring; plus the throughput formula and the flags."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import pytest
import torch
from conftest import ROOT, TINY, TINY_DATA, run_torchrun

sys.path.insert(0, str(ROOT / "tests"))

DIST_TIMEOUT_S = 180


def _close(a, b, atol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=atol)


def _check_paths(result):
    plain, lean, ref = result["plain"], result["lean"], result["reference"]
    for key in ("logp", "ent"):
        _close(lean[key][0], ref[key])
        _close(lean[key], plain[key])
    _close(lean["grad_hidden"], plain["grad_hidden"])
    _close(lean["grad_weight"], plain["grad_weight"])
    assert lean["grad_weight"].abs().sum() > 0  # the comparison is not between two zeros


def _samples(n=6):
    from slime.data.config import SFTDataConfig, build_data_source

    src = build_data_source(SFTDataConfig(prompt_data=str(TINY_DATA), hf_checkpoint=str(TINY)), progress=False)
    return [
        {"tokens": s.tokens, "loss_mask": s.loss_mask, "response_length": s.response_length} for s in src.get_samples(n)
    ]


@pytest.fixture(scope="module")
def actors():
    """A plain and a lean actor (chunks of 7 tokens: many chunks, a ragged last one) on the
    tiny Qwen3 weights, for policy_loss with a training entropy term (it also scores SFT)."""
    from slime.algorithms.config import AlgorithmConfig
    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.cpu_compat import disable_cpu_mode
    from slime.backends.megatron_utils.lean_ce import CrossEntropyConfig
    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs
    from slime.backends.megatron_utils.parallel import destroy_parallel
    from slime.backends.megatron_utils.throughput import ThroughputConfig

    algo = AlgorithmConfig(entropy_coef=0.3, kl_coef=0.0)
    built = {}
    for name, chunk in (("plain", 0), ("lean", 7)):
        a = MegatronActor(
            ModelArgs(**hf_model_args(str(TINY))),
            ModelBuildArgs(),
            BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=300, calculate_per_token_loss=True),
            OptimizerArgs(lr=1e-3, weight_decay=0.0),
            TrainArgs(global_batch_size=6, total_steps=2, loss_type="policy_loss"),
            algorithm=algo,
            cross_entropy=CrossEntropyConfig(chunk_tokens=chunk),
            throughput=ThroughputConfig(peak_tflops=0.5),
        )
        a.load_hf(str(TINY))
        built[name] = a
    yield built
    destroy_parallel()
    disable_cpu_mode()


def test_function_matches_plain_path_tp1(actors):
    """Padded vocabulary, 37 tokens in chunks of 5, entropy with gradient, fp64 inputs."""
    from lean_ce_worker import compare_paths

    _check_paths(compare_paths())


def test_actor_scoring_and_policy_loss_match_plain(actors):
    plain, lean = actors["plain"], actors["lean"]
    samples = _samples()
    got, want = lean.compute_log_probs(samples, with_entropy=True), plain.compute_log_probs(samples, with_entropy=True)
    for key in ("log_probs", "entropy"):
        for a, b in zip(got[key], want[key]):
            _close(a, b)
    _close(lean.logits(samples[0]["tokens"]), plain.logits(samples[0]["tokens"]), atol=1e-5)
    rl = [
        {**s, "advantages": torch.linspace(-1, 1, s["response_length"]), "log_probs": lp - 0.05}
        for s, lp in zip(samples, want["log_probs"])
    ]
    (loss_l, grads_l), (loss_p, grads_p) = lean.gradients(rl), plain.gradients(rl)
    assert loss_l == pytest.approx(loss_p, rel=1e-5, abs=1e-6)
    assert set(grads_l) == set(grads_p)
    for name in grads_p:
        _close(grads_l[name], grads_p[name], atol=1e-6)
    out_w = "embedding.word_embeddings.weight"  # tied: embedding + output projection gradients
    assert grads_l[out_w].abs().sum() > 0


def test_actor_sft_loss_and_custom_loss_match_plain(actors):
    plain, lean = actors["plain"], actors["lean"]
    samples = _samples()
    for loss_type, custom in (("sft_loss", None), ("custom_loss", "slime.backends.megatron_utils.loss.sft_loss")):
        results = []
        for a in (plain, lean):
            saved = (a.loss_fn, a.train_args)
            a.train_args = dataclasses.replace(a.train_args, loss_type=loss_type, custom_loss_function_path=custom)
            from slime.backends.megatron_utils.loss import resolve_loss

            a.loss_fn = resolve_loss(loss_type, custom)
            if custom:  # a plugin function object, not the built-in one: it must be given logits
                a.loss_fn = lambda logits, batch, ctx, f=a.loss_fn: f(logits.clone(), batch, ctx)
            try:
                results.append(a.gradients(samples))
            finally:
                a.loss_fn, a.train_args = saved
        (loss_p, grads_p), (loss_l, grads_l) = results
        assert loss_l == pytest.approx(loss_p, rel=1e-5)
        for name in grads_p:
            _close(grads_l[name], grads_p[name], atol=1e-6)


def test_step_reports_throughput_per_gpu(actors):
    """Runs last on these actors: it changes the lean actor's weights."""
    from slime.backends.megatron_utils.throughput import train_flops

    lean = actors["lean"]
    samples = _samples()
    rl = [
        {**s, "advantages": torch.ones(s["response_length"]), "log_probs": torch.zeros(s["response_length"])}
        for s in samples
    ]
    m = lean.train_step(rl)
    t = m["step_time_s"]
    assert m["tokens_per_s_per_gpu"] == pytest.approx(sum(len(s["tokens"]) for s in samples) / t)
    flops = train_flops(lean.model_args, [len(s["tokens"]) for s in samples], lean.padded_vocab_size)
    assert m["model_tflops_per_s_per_gpu"] == pytest.approx(flops / t / 1e12)
    assert m["mfu_percent"] == pytest.approx(100 * flops / t / 0.5e12)
    assert 0 < m["packing_efficiency"] <= 1


def test_bf16_weights_match_plain_autograd(monkeypatch):
    """bf16 model (the GPU case): logits GEMM in bf16 then fp32 as the plain path; the weight
    gradient accumulated in fp32 over chunks and vocabulary slices is within bf16 rounding."""
    from slime.backends.megatron_utils import lean_ce

    monkeypatch.setattr(lean_ce, "_WGRAD_ROWS", 7)  # several vocabulary slices
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(23, 8, generator=gen).bfloat16().requires_grad_(True)
    w = torch.randn(40, 8, generator=gen).bfloat16().requires_grad_(True)
    y = torch.randint(0, 35, (23,), generator=gen)
    g_lp, g_ent = torch.rand(2, 23, generator=gen)
    lp, ent = lean_ce.chunked_log_probs(h, w, y, 35, 0, 4, with_entropy=True)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = (h2 @ w2.t()).float()[:, :35].log_softmax(-1)
    ((ref.gather(1, y[:, None])[:, 0] * g_lp).sum() - ((ref.exp() * ref).sum(-1) * g_ent).sum()).backward()
    _close(lp, ref.gather(1, y[:, None])[:, 0])
    assert w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad.float(), w2.grad.float(), rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), rtol=2**-7, atol=1e-2)


def test_tp2_matches_plain_path(tmp_path):
    """Two ranks, each with half of a padded vocabulary (rank 1 holds the padding)."""
    run_torchrun(2, "lean_ce_worker.py", tmp_path / "out.pt", timeout=DIST_TIMEOUT_S)
    ranks = torch.load(tmp_path / "out.pt", weights_only=True)
    for r in ranks:
        _check_paths(r)
    _close(ranks[0]["lean"]["grad_hidden"], ranks[1]["lean"]["grad_hidden"], atol=0)  # summed over TP


def test_flags():
    from slime.backends.megatron_utils.lean_ce import CrossEntropyConfig, add_loss_arguments
    from slime.backends.megatron_utils.throughput import ThroughputConfig, add_throughput_arguments

    parser = add_throughput_arguments(add_loss_arguments(argparse.ArgumentParser()))
    assert CrossEntropyConfig.from_args(parser.parse_args([])).lean
    assert not CrossEntropyConfig.from_args(parser.parse_args(["--no-lean-cross-entropy"])).lean
    assert CrossEntropyConfig.from_args(parser.parse_args(["--cross-entropy-chunk-tokens", "64"])).chunk_tokens == 64
    assert not CrossEntropyConfig.from_args(parser.parse_args(["--cross-entropy-chunk-tokens", "0"])).lean
    with pytest.raises(ValueError, match="--cross-entropy-chunk-tokens"):
        CrossEntropyConfig(chunk_tokens=-1)
    assert ThroughputConfig.from_args(parser.parse_args(["--peak-tflops", "100"])).peak_flops(bf16=False) == 1e14
    with pytest.raises(ValueError, match="--peak-tflops"):
        ThroughputConfig(peak_tflops=0)


def test_train_flops_is_megatrons_formula_for_one_sequence():
    """Megatron-LM's closed form (causal attention) for Qwen3-1.7B's shape, one 8k sequence;
    packed samples count attention per sample."""
    from slime.backends.megatron_utils.model_config import ModelArgs
    from slime.backends.megatron_utils.throughput import device_peak_tflops, train_flops

    m = ModelArgs(num_layers=28, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16,
                  num_query_groups=8, kv_channels=128, vocab_size=151936)  # fmt: skip
    s, h, v = 8192, 2048, m.padded_vocab_size()
    q_ratio = 16 * 128 / h
    megatron = s * (12 * 28 * h * h * ((1 + 8 / 16 + s / h / 2) * q_ratio + (6144 / h) * 1.5) + 6 * v * h)
    assert train_flops(m, [s], v) == pytest.approx(megatron, rel=1e-12)
    two = train_flops(m, [s // 2, s // 2], v)
    assert two < train_flops(m, [s], v)  # half the attention pairs, same GEMMs
    assert train_flops(m, [s], v) - two == pytest.approx(6 * 28 * 16 * 128 * (s * s - 2 * (s // 2) ** 2))
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("Some CPU") is None
