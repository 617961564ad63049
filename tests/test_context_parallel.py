"""Context parallelism (CP=2, packed THD, no Transformer Engine) equals one rank: loss,
gradients, metrics, evaluate and compute_log_probs, under the lean and plain losses and both
normalizations; samples do not attend across each other; the zigzag split is exact."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, dist_env, torchrun_cmd
from megatron_helpers import attach_rl_fields, hf_response_log_probs, synthetic_samples

VOCAB = 849  # tiny-qwen3's tokenizer
DIST_TIMEOUT_S = 300
MAX_TOKENS = 160  # per micro-batch of the whole CP group: 80 per CP rank at CP=2
RL = {"entropy_coef": 0.01, "use_kl_loss": True, "kl_loss_coef": 0.1, "kl_loss_type": "k3", "use_tis": True}
GSPO = {
    "advantage_estimator": "gspo",
    "eps_clip": 0.02,
    "eps_clip_high": 0.03,
    "use_kl_loss": True,
    "kl_loss_coef": 0.05,
}


def _samples() -> list[dict]:
    out = synthetic_samples(6, VOCAB, seed=5)
    # Short ones too: lengths 7 and 13 are not multiples of 2 x CP, 3 tokens pad to one chunk each.
    g = torch.Generator().manual_seed(6)
    for n, resp in ((7, 3), (13, 5), (3, 1)):
        out.insert(1, {"tokens": torch.randint(0, VOCAB, (n,), generator=g).tolist(), "loss_mask": [1] * resp,
                       "response_length": resp})  # fmt: skip
    _, log_probs, _ = hf_response_log_probs(TINY, out)
    attach_rl_fields(out, log_probs, seed=7)
    return out


def test_zigzag_split_and_merge():
    """Each rank keeps chunks r and 2N-1-r of every padded sample, with the full sequence's
    tokens, labels, weights and fields; the shards merge back to the pack; loads balance."""
    from slime.backends.megatron_utils.batching import BatchingArgs, make_micro_batches
    from slime.backends.megatron_utils.context_parallel import padded_length, split_micro_batch, zigzag_merge

    assert [padded_length(n, 2) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    samples = synthetic_samples(3, VOCAB, seed=1)[:3]
    samples[1:1] = [{"tokens": [5, 6, 7], "loss_mask": [1], "response_length": 1},
                    {"tokens": list(range(100, 113)), "loss_mask": [1, 0, 1, 1], "response_length": 4}]  # fmt: skip
    for s in samples:
        s["advantages"] = torch.arange(s["response_length"], dtype=torch.float32) + 1
    (mb,) = make_micro_batches(samples, BatchingArgs(micro_batch_size=len(samples)), 40, len(samples))
    lengths = [len(s["tokens"]) for s in samples]
    for cp in (2, 3):
        shards = [split_micro_batch(mb, cp, r) for r in range(cp)]
        padded = [padded_length(n, cp) for n in lengths]
        for r, sh in enumerate(shards):
            assert sh.tokens.shape == (1, sum(padded) // cp)
            assert sh.cu_seqlens.tolist() == [0, *torch.tensor(padded).cumsum(0).tolist()]
            assert sh.max_seqlen == max(padded) and sh.spans == mb.spans
            at = 0
            for s, n, p in zip(samples, lengths, padded):
                c = p // (2 * cp)  # this sample's two chunks, in order
                want = [*range(r * c, (r + 1) * c), *range((2 * cp - 1 - r) * c, (2 * cp - r) * c)]
                assert sh.position_ids[0, at : at + 2 * c].tolist() == want  # positions in the sample
                got = sh.tokens[0, at : at + 2 * c].tolist()
                assert got == [s["tokens"][q] if q < n else 0 for q in want]
                at += 2 * c
            assert sh.weights[sh.segment_ids < 0].abs().sum() == 0  # padding carries no loss
        for name in ("tokens", "labels", "weights", "segment_ids"):
            merged = zigzag_merge([getattr(sh, name) for sh in shards], shards[0].cp)
            assert torch.equal(merged, getattr(mb, name)), name
        advantages = zigzag_merge([sh.fields["advantages"] for sh in shards], shards[0].cp)
        assert torch.equal(advantages, mb.fields["advantages"])
        assert sum(sh.real_tokens for sh in shards) == mb.real_tokens
        assert sum(sh.supervised_tokens for sh in shards) == mb.supervised_tokens
    # Sequence parallelism at TP=8 under CP=2: the last sample is padded further so that every
    # shard's length is a multiple of 8; the shards still merge back to the pack.
    shards = [split_micro_batch(mb, 2, r, multiple=8) for r in range(2)]
    assert sum(padded_length(n, 2) for n in lengths) // 2 % 8 != 0  # the multiple needs extra padding here
    for sh in shards:
        assert sh.tokens.shape[1] % 8 == 0 and sh.real_tokens + int((sh.segment_ids < 0).sum()) == sh.tokens.shape[1]
        assert sh.cp.padded[:-1] == tuple(padded_length(n, 2) for n in lengths[:-1])
    for name in ("tokens", "labels", "weights", "segment_ids"):
        assert torch.equal(zigzag_merge([getattr(sh, name) for sh in shards], shards[0].cp), getattr(mb, name)), name


def test_cp_refuses_unsupported_layouts():
    """At start-up (validate_trainer_args' flag check, before Ray): SBHD under CP (MoE layouts
    under CP: test_moe_parallel's start-up test)."""
    from test_slime_script_compat import _parse

    from slime.backends.megatron_utils.arguments import check_parallel_sizes

    with pytest.raises(ValueError, match="--context-parallel-size 2 splits packed sequences: it needs --qkv-format"):
        check_parallel_sizes(_parse(["--context-parallel-size", "2", "--qkv-format", "sbhd"]))
    check_parallel_sizes(_parse(["--context-parallel-size", "2"]))  # accepted


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(CP=2 result from one torchrun world of 2, CP=1 reference in this process)."""
    from slime.algorithms.config import AlgorithmConfig
    from slime.backends.megatron_utils.cpu_compat import disable_cpu_mode
    from slime.backends.megatron_utils.parallel import destroy_parallel

    sys.path.insert(0, str(ROOT / "tests"))
    from cp_dist_worker import run_checks

    tmp = tmp_path_factory.mktemp("cp")
    spec = {
        "samples": _samples(),
        "algorithm": dataclasses.asdict(AlgorithmConfig(**RL)),
        "gspo": dataclasses.asdict(AlgorithmConfig(**GSPO)),
        "max_tokens": MAX_TOKENS,
        "workdir": str(tmp),
    }
    torch.save(spec, tmp / "in.pt")
    cmd = torchrun_cmd(2, "cp_dist_worker.py", TINY, tmp / "in.pt", tmp / "out.pt")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the single-rank reference runs while the two CP ranks start up
        ref = run_checks(str(TINY), spec, cp=1)
    finally:
        destroy_parallel()
        disable_cpu_mode()
    try:
        _, err = proc.communicate(timeout=DIST_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return torch.load(tmp / "out.pt", weights_only=True), ref, spec["samples"], tmp


def _assert_grads(ours: dict, ref: dict, name: str) -> None:
    assert ours and set(ours) == set(ref), name
    for k, g in ours.items():
        # float32 noise scales with the tensor (a CP rank sums the K/V gradients in another order)
        atol = max(1e-7, 1e-6 * float(ref[k].abs().max()))
        torch.testing.assert_close(g, ref[k], rtol=1e-4, atol=atol, msg=f"{name}: {k}")


@pytest.mark.parametrize("check", ["sft_token", "sft_sample", "policy", "gspo"])
def test_cp2_loss_and_gradients_equal_one_rank(runs, check):
    cp, ref, _, _ = runs
    assert cp[check]["loss"] == pytest.approx(ref[check]["loss"], rel=1e-6), check
    _assert_grads(cp[check]["grads"], ref[check]["grads"], check)


def test_cp2_metrics_eval_and_log_probs_equal_one_rank(runs):
    """Metrics are the global ones once (summed over DP x CP, FLOPs not counted twice); a micro-batch
    packs 2 x --max-tokens-per-gpu at CP=2 (same micro-batches as one rank at twice the cap)."""
    cp, ref, samples, _ = runs
    assert cp["sft_token"]["eval"] == pytest.approx(ref["sft_token"]["eval"], rel=1e-6)
    checks = (
        ("sft_token", ("loss",)),
        ("policy", ("loss", "pg_loss", "entropy", "kl_loss", "tis")),
        ("gspo", ("loss", "pg_loss", "pg_clipfrac", "ppo_kl", "kl_loss")),
    )
    for check, keys in checks:
        got, want = cp[check]["metrics"], ref[check]["metrics"]
        for key in keys + ("grad_norm",):
            assert got[key] == pytest.approx(want[key], rel=1e-5), f"{check}: {key}"
        for key in ("supervised_tokens", "total_tokens", "micro_batches"):
            assert got[key] == want[key], f"{check}: {key}"
        assert got["micro_batches"] < len(samples)  # several samples per micro-batch
        assert got["model_tflops_per_s_per_gpu"] * got["step_time_s"] == pytest.approx(
            want["model_tflops_per_s_per_gpu"] * want["step_time_s"] / 2, rel=1e-6
        )  # same FLOPs in total, over 2 devices
    for key in ("log_probs", "entropy"):
        assert len(cp["policy"][key]) == len(samples)
        for got, want, s in zip(cp["policy"][key], ref["policy"][key], samples):
            assert got.shape == (s["response_length"],)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_cp2_packing_isolates_samples(runs):
    """The CP forward of one pack gives each sample the logits of its own single-rank forward."""
    cp, ref, _, _ = runs
    for got, alone in zip(cp["sft_token"]["pack_logits"], ref["sft_token"]["single_logits"]):
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_cp2_save_export_weight_sync_and_resume(runs):
    """Under CP=2: the HF export and the weight-sync buckets are the trained weights (rank 0's, a
    full replica), the torch_dist save loads back exactly on every rank and restores the step."""
    from safetensors.torch import load_file

    from slime.backends.megatron_utils.hf_weights import mcore_to_hf
    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args

    cp, _, _, tmp = runs
    state = cp["state"]
    trained = mcore_to_hf([state["trained"]], ModelArgs(**hf_model_args(str(TINY))))
    exported = load_file(tmp / "hf" / "model.safetensors")
    assert set(state["buckets"]) == set(trained) and set(exported) <= set(trained)
    for name, t in state["buckets"].items():
        assert torch.equal(t, trained[name]), name
    for name, t in exported.items():
        assert torch.equal(t, trained[name]), name
    assert state["resume_max_diff"] == 0.0 and state["resumed_step"] == 1
