"""MoE (Qwen3-MoE, Qwen2-MoE): HF parity, bit-exact HF <-> Megatron at TP=1 and TP=2, SFT steps
with the load-balancing loss checked against transformers' routing, router metrics, and the
MoE flags of slime's Qwen3-30B-A3B script (derived from config.json, mismatches refused).
Multi-rank layouts (TP + sequence parallelism, EP, ETP) are in test_moe_parallel.py.

The tiny checkpoints are written at test time by tools/make_tiny_qwen3_moe.py (random init).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import pytest
import torch
from conftest import ROOT, dry_run_flags
from megatron_helpers import make_hf_checkpoint
from test_megatron_model import parallel  # noqa: F401  (the world-1 process group, a module fixture)
from test_model_scripts import HF_CONFIGS, script_args

sys.path.insert(0, str(ROOT / "tools"))
from make_tiny_qwen3_moe import FAMILIES, make_tiny_moe


# THUDM/slime's scripts/models/qwen3-30B-A3B.sh MODEL_ARGS, as its bash loop expands them.
# fmt: off
SLIME_QWEN3_30B_A3B = [
    "--disable-bias-linear", "--qk-layernorm", "--group-query-attention", "--num-attention-heads", "32",
    "--num-query-groups", "4", "--kv-channels", "128", "--num-layers", "48", "--hidden-size", "2048",
    "--ffn-hidden-size", "6144", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--norm-epsilon", "1e-6", "--rotary-percent", "1.0", "--swiglu", "--untie-embeddings-and-output-weights",
    "--vocab-size", "151936", "--rotary-base", "1000000",
    "--moe-ffn-hidden-size", "768", "--moe-router-score-function", "softmax", "--moe-token-dispatcher-type", "alltoall",
    "--moe-router-topk", "8", "--moe-layer-freq", "[" + ", ".join(["1"] * 48) + "]", "--num-experts", "128",
    "--moe-grouped-gemm", "--moe-token-drop-policy", "probs", "--moe-router-dtype", "fp32", "--moe-permute-fusion",
    "--moe-aux-loss-coeff", "0",
]
# fmt: on


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    # + the tiny dense GLM4: its real TP=2 check shares this module's torchrun world.
    return {**{f: make_tiny_moe(root / f, f) for f in FAMILIES}, "glm4": make_hf_checkpoint("glm4", root / "glm4")}


def _parser():
    from slime.backends.megatron_utils.model_config import add_model_arguments

    p = argparse.ArgumentParser()
    p.add_argument("--hf-checkpoint")
    add_model_arguments(p)
    return p


def resolve(*argv):
    from slime.backends.megatron_utils.model_config import resolve_model_args

    return resolve_model_args(_parser().parse_args([str(a) for a in argv]))


def build(m):
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs, build_gpt_model

    return build_gpt_model(m, ModelBuildArgs())


def hf_state(hf_dir):
    from slime.backends.megatron_utils.hf_weights import load_hf_state_dict

    return load_hf_state_dict(str(hf_dir))


# ------------------------------------------------------------------ flags and config.json
def test_flags_derived_from_hf_config(checkpoints):
    q3 = resolve("--hf-checkpoint", checkpoints["qwen3_moe"])
    assert (q3.num_experts, q3.moe_router_topk, q3.moe_ffn_hidden_size, q3.ffn_hidden_size) == (8, 2, 32, 96)
    assert q3.moe_layer_freq == (1, 1) and not q3.moe_router_pre_softmax  # norm_topk_prob: softmax over the top-k
    assert q3.qk_layernorm and not q3.add_qkv_bias and q3.moe_shared_expert_intermediate_size is None
    q2 = resolve("--hf-checkpoint", checkpoints["qwen2_moe"])
    assert q2.moe_layer_freq == (0, 1, 1)  # mlp_only_layers=[0]
    assert q2.moe_router_pre_softmax  # no top-k renormalization
    assert (q2.moe_shared_expert_intermediate_size, q2.moe_shared_expert_gate, q2.add_qkv_bias) == (48, True, True)
    # Agreeing flags (an integer --moe-layer-freq is expanded before the comparison) are fine.
    assert resolve("--hf-checkpoint", checkpoints["qwen3_moe"], "--num-experts", "8", "--moe-layer-freq", "1") == q3
    assert resolve("--hf-checkpoint", checkpoints["qwen2_moe"], "--moe-layer-freq", "([0]*1+[1]*2)") == q2


@pytest.mark.parametrize(
    "family,flags,match",
    [
        ("qwen3_moe", ["--num-experts", "16"], r"--num-experts is 16 but .*config\.json implies 8"),
        ("qwen3_moe", ["--moe-router-topk", "4"], "--moe-router-topk is 4"),
        ("qwen3_moe", ["--moe-router-pre-softmax"], "--moe-router-pre-softmax is True"),
        ("qwen3_moe", ["--moe-ffn-hidden-size", "64"], "--moe-ffn-hidden-size is 64"),
        ("qwen2_moe", ["--moe-layer-freq", "1"], r"--moe-layer-freq is \(1, 1, 1\)"),
        ("qwen2_moe", ["--moe-shared-expert-intermediate-size", "32"], "--moe-shared-expert-intermediate-size is 32"),
        ("qwen3_moe", ["--rotary-percent", "0.5"], "--rotary-percent is 0.5"),
    ],
)
def test_flag_contradicting_config_is_refused(checkpoints, family, flags, match):
    from slime.backends.megatron_utils.model_config import ModelConfigError

    with pytest.raises(ModelConfigError, match=match):
        resolve("--hf-checkpoint", checkpoints[family], *flags)


def test_moe_flags_on_a_dense_config_are_refused(tmp_path):
    from slime.backends.megatron_utils.model_config import ModelConfigError

    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS["qwen3-4B"]))
    with pytest.raises(ModelConfigError, match="--num-experts is 8 but .* implies None"):
        resolve("--hf-checkpoint", tmp_path, *script_args("qwen3-4B"), "--num-experts", "8")


def test_layer_freq_parsing_and_bad_values():
    from slime.backends.megatron_utils.moe_config import parse_moe_layer_freq

    assert parse_moe_layer_freq("2") == 2
    assert parse_moe_layer_freq("[0, 1,1]") == (0, 1, 1)
    assert parse_moe_layer_freq("'([0]*2+[1]*3)'") == (0, 0, 1, 1, 1)  # shell-quoted, as some scripts pass it
    for bad in ("[0, 2]", "__import__('os')", "[1]*x"):
        with pytest.raises(argparse.ArgumentTypeError, match="--moe-layer-freq"):
            parse_moe_layer_freq(bad)
    with pytest.raises(ValueError, match="lists 2 layers but the model has --num-layers 4"):
        resolve(
            "--num-layers",
            4,
            "--hidden-size",
            64,
            "--ffn-hidden-size",
            96,
            "--num-attention-heads",
            4,
            "--vocab-size",
            300,
            "--num-experts",
            4,
            "--moe-layer-freq",
            "[1,1]",
        )


def test_slime_qwen3_30b_a3b_flags_parse_and_match_the_hf_config(tmp_path):
    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.utils.arguments import get_parser

    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS["qwen3-30B-A3B"]))
    from slime.backends.megatron_utils.model_config import resolve_model_args

    # Through the trainer's whole parser: no other group takes or refuses a MoE flag.
    theirs = resolve_model_args(get_parser().parse_args(["--hf-checkpoint", str(tmp_path), *SLIME_QWEN3_30B_A3B]))
    ours = resolve("--hf-checkpoint", tmp_path, *script_args("qwen3-30B-A3B"))
    assert theirs == ours
    assert (ours.num_experts, ours.moe_router_topk, ours.moe_token_dispatcher_type, ours.moe_router_dtype) == (
        128,
        8,
        "alltoall",
        "fp32",
    )
    assert ours.moe_layer_freq == (1,) * 48 and not ours.moe_router_pre_softmax
    # Our SFT launcher's whole command line (with slime's MODEL_ARGS) configures the actor.
    flags = dry_run_flags("run-qwen3-30B-A3B-sft.sh", tmp_path / "out")
    cfg = actor_config_from_args(get_parser().parse_args(flags), total_steps=10)
    assert cfg.model.num_experts == 128 and cfg.build.tensor_model_parallel_size == 4 and cfg.build.sequence_parallel
    assert (cfg.build.expert_model_parallel_size, cfg.build.expert_tensor_parallel_size) == (8, 1)  # slime's layout


# ------------------------------------------------------------------ HF parity and round trip
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.usefixtures("parallel")
def test_logits_match_transformers(checkpoints, family):
    from megatron_helpers import assert_packed_matches_hf
    from transformers import AutoModelForCausalLM

    from slime.backends.megatron_utils.hf_weights import hf_to_mcore

    hf_dir = checkpoints[family]
    m = resolve("--hf-checkpoint", hf_dir)
    model = build(m).eval()
    missing, unexpected = model.load_state_dict(hf_to_mcore(hf_state(hf_dir), m), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    ref = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, m.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids, torch.arange(33).expand(2, 33), attention_mask=None)[..., : m.vocab_size]
        torch.testing.assert_close(ours, ref(ids).logits, rtol=1e-5, atol=1e-5)
        # Packed (THD): routing is per token, so samples stay independent as in separate HF calls.
        assert_packed_matches_hf(model, ids, ref, m.vocab_size)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.usefixtures("parallel")
def test_hf_round_trip_bit_exact(checkpoints, family, tp):
    from slime.backends.megatron_utils.hf_weights import hf_to_mcore, mcore_to_hf

    m = resolve("--hf-checkpoint", checkpoints[family])
    hf = hf_state(checkpoints[family])
    shards = [hf_to_mcore(hf, m, r, tp) for r in range(tp)]
    if tp == 1:  # exactly the model's names and shapes
        own = {k: v.shape for k, v in build(m).state_dict().items() if not k.endswith("_extra_state")}
        assert {k: v.shape for k, v in shards[0].items()} == own
    back = mcore_to_hf(shards, m)
    assert set(back) == set(hf) - ({"lm_head.weight"} if not m.untie_embeddings_and_output_weights else set())
    for k, v in back.items():
        assert torch.equal(v, hf[k]), k


# ------------------------------------------------------------------ SFT steps, aux loss, router metrics
def _hf_reference(hf_dir, samples, m):
    """transformers in float64: (per-token SFT loss + coeff * sum over MoE layers of megatron's
    switch load-balancing loss over all tokens of the step, its per-layer values, routed-token
    counts per layer and expert, HF-named gradients). Megatron's switch loss is HF's
    load_balancing_loss_func of one layer divided by top-k."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float64)
    total_sup = sum(sum(s["loss_mask"]) for s in samples)
    ce, per_layer_logits = 0, None
    for s in samples:
        ids = torch.tensor(s["tokens"])[None]
        out = model(ids, output_router_logits=True)
        lp = out.logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        resp = lp[len(s["tokens"]) - s["response_length"] - 1 :]
        ce = ce - (resp * torch.tensor(s["loss_mask"], dtype=torch.float64)).sum() / total_sup
        logits = [r.double() for r in out.router_logits]
        per_layer_logits = logits if per_layer_logits is None else [torch.cat(p) for p in zip(per_layer_logits, logits)]
    k, e = m.moe_router_topk, m.num_experts
    aux, z, counts = [], [], []
    for logits in per_layer_logits:
        probs = logits.softmax(-1)
        routed = torch.zeros_like(probs).scatter(1, probs.topk(k, dim=-1).indices, 1.0).sum(0)
        t = probs.shape[0]
        aux.append((probs.sum(0) * routed).sum() * e / (k * t * t))
        z.append(torch.logsumexp(logits, dim=-1).square().mean())  # ST-MoE's router z-loss
        counts.append(routed.detach())
    loss = ce + m.moe_aux_loss_coeff * sum(aux) + (m.moe_z_loss_coeff or 0.0) * sum(z)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return float(loss), [float(a) for a in aux], [float(v) for v in z], torch.stack(counts), grads


@pytest.mark.usefixtures("parallel")
def test_sft_steps_aux_loss_and_router_metrics(checkpoints):
    """One step's gradients equal transformers' (SFT loss + coeff x load-balancing loss + z
    coeff x router z-loss per MoE layer, no token-count factor), the logged aux and z losses
    and router statistics equal those of HF's routing, and a few SFT steps lower the loss."""
    from megatron_helpers import synthetic_samples

    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.moe_layers import moe_step_metrics
    from slime.backends.megatron_utils.optimizer import OptimizerArgs

    hf_dir = checkpoints["qwen3_moe"]
    m = dataclasses.replace(
        resolve("--hf-checkpoint", hf_dir),
        moe_aux_loss_coeff=0.05,
        moe_z_loss_coeff=1e-4,  # the tiny router's logits are large (z ~ 150): a small weight keeps fp32 error small
        moe_token_dispatcher_type="alltoall",
        moe_router_dtype="fp32",
    )
    samples = synthetic_samples(4, m.vocab_size, seed=5)
    batching = BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=4096, calculate_per_token_loss=True)
    actor = MegatronActor(
        m,
        ModelBuildArgs(),
        batching,
        OptimizerArgs(lr=3e-3, weight_decay=0.0),
        TrainArgs(global_batch_size=4, total_steps=10),
    )
    actor.load_hf(str(hf_dir))
    _, grads = actor.gradients(samples)  # one micro-batch: every sample packed in one row
    metrics = moe_step_metrics(actor.model.module, num_micro_batches=1)
    ref_loss, ref_aux, ref_z, ref_counts, ref_grads = _hf_reference(hf_dir, samples, m)
    ours = actor.gather_hf(grads)
    for k, g in ours.items():
        torch.testing.assert_close(g.double(), ref_grads[k], rtol=1e-4, atol=1e-7, msg=k)
    assert metrics["moe/load_balancing_loss"] == pytest.approx(sum(ref_aux) / len(ref_aux), rel=1e-5)
    assert metrics["moe/z_loss"] == pytest.approx(sum(ref_z) / len(ref_z), rel=1e-5)
    share = ref_counts / ref_counts.sum(dim=1, keepdim=True)
    assert metrics["moe/expert_load_max"] == pytest.approx(float((share.max(dim=1).values * m.num_experts).mean()))
    assert metrics["moe/experts_unused"] == pytest.approx(float((ref_counts == 0).double().mean()))
    again = moe_step_metrics(actor.model.module, 1)  # reset after reading: nothing routed since
    assert again.get("moe/load_balancing_loss", 0.0) == 0.0 and "moe/expert_load_max" not in again

    losses = []
    for _ in range(5):
        step = actor.train_step(samples)  # the actor reports the MoE metrics of its step
        assert step["moe/load_balancing_loss"] > 0 and step["moe/expert_load_max"] >= 1.0
        losses.append(step["loss"])
    assert losses[0] == pytest.approx(ref_loss - 0.05 * sum(ref_aux) - 1e-4 * sum(ref_z), rel=1e-5)  # the SFT loss
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.usefixtures("parallel")
def test_full_recompute_gives_the_same_gradients(checkpoints):
    """slime's MoE scripts train with --recompute-granularity full: the recomputed MoE layers
    (routing, dispatch, aux loss) give bit-identical gradients over several micro-batches."""
    from megatron.core import parallel_state as ps
    from megatron_helpers import synthetic_samples

    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs

    hf_dir = checkpoints["qwen2_moe"]
    m = dataclasses.replace(resolve("--hf-checkpoint", hf_dir), moe_aux_loss_coeff=0.05)
    samples = synthetic_samples(4, m.vocab_size, seed=7)
    batching = BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=200, calculate_per_token_loss=True)
    results = []
    for build in (
        ModelBuildArgs(),
        ModelBuildArgs(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    ):
        actor = MegatronActor(m, build, batching, OptimizerArgs(lr=1e-3), TrainArgs(global_batch_size=4, total_steps=1))
        actor.load_hf(str(hf_dir))
        results.append(actor.gradients(samples))
    assert results[0][0] == results[1][0]
    for name, g in results[0][1].items():
        assert torch.equal(g, results[1][1][name]), name
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)  # the module's world-1 state, as the fixture left it
