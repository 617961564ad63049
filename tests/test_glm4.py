"""GLM4 (GLM-Z1-9B-0414's family): architecture flags from config.json, slime's GLM4 and
Qwen3-30B-A3B script flags (model, optimizer offload), ``--spec``, SFT steps whose gradients
equal transformers', a torch_dist round trip.

HF logits parity (padded and packed THD) and the bit-exact HF round trip at TP=1 and TP=2 are
test_megatron_model's family tests (glm4 is in `megatron_helpers.FAMILIES`); real TP=2 ranks
run the tiny GLM4 in test_moe's torchrun world (one process start for both).
"""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch
from conftest import dry_run_flags
from megatron_helpers import build_actor, hf_response_log_probs, make_hf_checkpoint, synthetic_samples
from test_megatron_model import parallel  # noqa: F401  (the world-1 process group, a module fixture)
from test_model_scripts import HF_CONFIGS, script_args
from test_moe import SLIME_QWEN3_30B_A3B

GLM4_SPEC = ("slime.backends.megatron_utils.glm4", "get_glm_spec")

# THUDM/slime's scripts/models/glm4-9B.sh MODEL_ARGS, as its bash expands them.
# fmt: off
SLIME_GLM4_9B = [
    "--spec", "slime_plugins.models.glm4", "get_glm_spec", "--swiglu", "--num-layers", "40", "--hidden-size", "4096",
    "--ffn-hidden-size", "13696", "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "2",
    "--use-rotary-position-embeddings", "--disable-bias-linear", "--add-qkv-bias", "--normalization", "RMSNorm",
    "--norm-epsilon", "1e-5", "--rotary-base", "10000", "--vocab-size", "151552", "--post-self-attn-layernorm",
    "--post-mlp-layernorm", "--rotary-interleaved", "--rotary-percent", "0.5", "--no-rope-fusion",
    "--untie-embeddings-and-output-weights",
]
# OPTIMIZER_ARGS of THUDM/slime's scripts/run-glm4-9B.sh and scripts/run-qwen3-30B-A3B.sh.
SLIME_GLM4_9B_OPTIMIZER = [
    "--optimizer", "adam", "--lr", "1e-6", "--lr-decay-style", "constant", "--weight-decay", "0.1",
    "--adam-beta1", "0.9", "--adam-beta2", "0.98",
]
SLIME_QWEN3_30B_A3B_OPTIMIZER = [
    *SLIME_GLM4_9B_OPTIMIZER, "--optimizer-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d",
    "--use-precision-aware-optimizer",
]
# fmt: on


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    return make_hf_checkpoint("glm4", tmp_path_factory.mktemp("glm4") / "glm4")


def resolve(*argv):
    from slime.backends.megatron_utils.model_config import add_model_arguments, resolve_model_args

    p = argparse.ArgumentParser()
    p.add_argument("--hf-checkpoint")
    add_model_arguments(p)
    return resolve_model_args(p.parse_args([str(a) for a in argv]))


def config_dir(path, name, drop=()):
    """A directory holding the public config.json of ``name`` (less the keys in ``drop``)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({k: v for k, v in HF_CONFIGS[name].items() if k not in drop}))
    return path


# ------------------------------------------------------------------ flags and config.json
def test_flags_derived_from_config_and_conflicts_named(glm4, tmp_path):
    from slime.backends.megatron_utils.model_config import ModelArgs, ModelConfigError

    m = resolve("--hf-checkpoint", glm4)
    assert (m.rotary_percent, m.rotary_interleaved, m.post_self_attn_layernorm, m.post_mlp_layernorm) == (
        0.5,
        True,
        True,
        True,
    )
    assert m.add_qkv_bias and not m.add_bias_linear and not m.qk_layernorm and m.untie_embeddings_and_output_weights
    assert (m.kv_channels, m.num_query_groups, m.norm_epsilon, m.spec) == (16, 2, 1e-5, None)
    same = ["--rotary-percent", "0.5", "--rotary-interleaved", "--post-self-attn-layernorm", "--post-mlp-layernorm"]
    assert resolve("--hf-checkpoint", glm4, *same, "--no-rope-fusion", "--add-qkv-bias") == m
    for flags, match in (
        (["--rotary-percent", "1.0"], r"--rotary-percent is 1\.0 but .*config\.json implies 0\.5"),
        (["--qk-layernorm"], "--qk-layernorm is True"),
    ):
        with pytest.raises(ModelConfigError, match=match):
            resolve("--hf-checkpoint", glm4, *flags)
    qwen3 = config_dir(tmp_path / "q", "qwen3-4B")
    for flag in ("--post-self-attn-layernorm", "--post-mlp-layernorm", "--rotary-interleaved"):
        with pytest.raises(ModelConfigError, match=f"{flag} is True but .* implies False"):
            resolve("--hf-checkpoint", qwen3, flag)
    # A config.json without GLM4's optional keys takes transformers' Glm4Config defaults.
    sparse = resolve(
        "--hf-checkpoint", config_dir(tmp_path / "g", "glm4-9B", ("partial_rotary_factor", "attention_bias"))
    )
    assert sparse.rotary_percent == 0.5 and sparse.add_qkv_bias
    base = {
        "num_layers": 1,
        "hidden_size": 24,
        "ffn_hidden_size": 48,
        "num_attention_heads": 4,
        "num_query_groups": 4,
        "vocab_size": 8,
    }
    with pytest.raises(ModelConfigError, match="--rotary-percent 0.5 of --kv-channels 6 rotates 3 dims"):
        ModelArgs(**base, kv_channels=6, rotary_percent=0.5)
    with pytest.raises(ModelConfigError, match="--post-mlp-layernorm: not built for MoE layers"):
        ModelArgs(**base, kv_channels=6, post_mlp_layernorm=True, num_experts=4)


def test_slime_glm4_script_flags_parse_and_match_the_hf_config(tmp_path):
    """slime's glm4-9B.sh MODEL_ARGS (its --spec path included) resolve to exactly ours, which
    alone equal the public config.json; our SFT launcher's command line configures the actor
    and passes every start-up check (what stops it here is the data this machine lacks)."""
    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.utils.arguments import get_parser, validate_trainer_args

    hf = config_dir(tmp_path, "glm4-9B")
    theirs = get_parser().parse_args(
        ["--hf-checkpoint", str(hf), *SLIME_GLM4_9B, *SLIME_GLM4_9B_OPTIMIZER, "--rollout-batch-size", "8"]
    )
    cfg = actor_config_from_args(theirs, total_steps=10)
    ours = resolve("--hf-checkpoint", hf, *script_args("glm4-9B"))
    assert cfg.model == ours and ours.spec == GLM4_SPEC and ours.max_position_embeddings == 32768
    assert (cfg.optim.adam_beta2, cfg.optim.optimizer_cpu_offload) == (0.98, False)
    flags = dry_run_flags("run-glm4-9B-sft.sh", tmp_path / "out", HF_DIR=str(hf))
    args = get_parser().parse_args(flags)
    cfg = actor_config_from_args(args, total_steps=10)
    assert cfg.model == ours and cfg.build.tensor_model_parallel_size == 2
    with pytest.raises(FileNotFoundError, match="--prompt-data"):
        validate_trainer_args(args)  # --spec imported and every flag check passed before this


def test_slime_qwen3_30b_a3b_optimizer_offload_flags(caplog):
    """slime's Qwen3-30B-A3B MODEL_ARGS + OPTIMIZER_ARGS parse; on CUDA the flags are
    megatron-core's OptimizerConfig fields (precision-aware refused without Transformer Engine,
    which megatron-core 0.16.1 needs for it); on CPU they are dropped with one log line."""
    from megatron.core.optimizer import OptimizerConfig

    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.backends.megatron_utils.optimizer import OptimizerArgs
    from slime.utils.arguments import get_parser

    argv = [*SLIME_QWEN3_30B_A3B, *SLIME_QWEN3_30B_A3B_OPTIMIZER, "--hf-checkpoint", "/nonexistent"]
    optim = actor_config_from_args(get_parser().parse_args(argv + ["--rollout-batch-size", "8"]), 10).optim
    assert optim.optimizer_cpu_offload and optim.overlap_cpu_optimizer_d2h_h2d and optim.use_precision_aware_optimizer
    on_gpu = optim.offload_config(cuda=True, te_installed=True)
    assert on_gpu == {
        "optimizer_cpu_offload": True,
        "optimizer_offload_fraction": 1.0,
        "overlap_cpu_optimizer_d2h_h2d": True,
        "use_precision_aware_optimizer": True,
    }
    # megatron-core takes the offload fields as they are (precision-aware needs TE to be checked).
    offload = {k: v for k, v in on_gpu.items() if k != "use_precision_aware_optimizer"}
    OptimizerConfig(optimizer="adam", bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True, **offload)
    with pytest.raises(ValueError, match="--use-precision-aware-optimizer: .* needs Transformer Engine"):
        optim.offload_config(cuda=True, te_installed=False)
    with caplog.at_level(logging.INFO, logger="slime.backends.megatron_utils.optimizer"):
        assert optim.offload_config(cuda=False) == {}
        assert OptimizerArgs().offload_config(cuda=False) == {}  # nothing given, nothing logged
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "--optimizer-cpu-offload" in lines[0] and "no effect on CPU" in lines[0], lines
    with pytest.raises(ValueError, match="--use-precision-aware-optimizer needs --optimizer adam"):
        OptimizerArgs(optimizer="sgd", use_precision_aware_optimizer=True)
    with pytest.raises(ValueError, match="--optimizer-offload-fraction must be in"):
        OptimizerArgs(optimizer_offload_fraction=1.5)


# ------------------------------------------------------------------ --spec
@pytest.mark.usefixtures("parallel")
def test_spec_paths_resolve_and_build(glm4, tmp_path):
    """slime's GLM4 path is our GLM4 layer (same model as without --spec); a user's function
    returning megatron's local spec gets the packed core attention in (packed THD batches give
    the default model's logits); a bad path is an error naming --spec."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from slime.backends.megatron_utils.attention import PackedCoreAttention
    from slime.backends.megatron_utils.hf_weights import hf_to_mcore, load_hf_state_dict
    from slime.backends.megatron_utils.layer_spec_plugin import check_spec
    from slime.backends.megatron_utils.model_config import ModelConfigError
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs, build_gpt_model
    from slime.utils.arguments import get_parser, validate_trainer_args

    def logits(hf_dir, *flags):
        m = resolve("--hf-checkpoint", hf_dir, *flags)
        model = build_gpt_model(m, ModelBuildArgs()).eval()
        missing, unexpected = model.load_state_dict(hf_to_mcore(load_hf_state_dict(str(hf_dir)), m), strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
        attn = [mod.core_attention for mod in model.modules() if hasattr(mod, "core_attention")]
        assert attn and all(isinstance(a, PackedCoreAttention) for a in attn)
        ids = torch.randint(0, m.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
        cu = torch.tensor([0, 7, 20], dtype=torch.int32)
        pos = torch.cat([torch.arange(7), torch.arange(13)])[None]
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=13, max_seqlen_kv=13)
        with torch.no_grad():
            return m, model(ids, pos, attention_mask=None, packed_seq_params=psp)

    m, via_spec = logits(glm4, "--spec", "slime_plugins.models.glm4", "get_glm_spec")
    assert m.spec == GLM4_SPEC
    assert torch.equal(via_spec, logits(glm4)[1])
    qwen2 = make_hf_checkpoint("qwen2", tmp_path / "qwen2")
    m, user = logits(qwen2, "--spec", "megatron_helpers", "local_layer_spec")
    assert m.spec == ("megatron_helpers", "local_layer_spec")
    assert torch.equal(user, logits(qwen2)[1])
    with pytest.raises(ModelConfigError, match=r"--spec no_such_pkg\.mod fn: cannot import module 'no_such_pkg\.mod'"):
        check_spec(["no_such_pkg.mod", "fn"])
    with pytest.raises(
        ModelConfigError, match="--spec megatron_helpers nope: module 'megatron_helpers' has no attribute"
    ):
        check_spec(["megatron_helpers", "nope"])
    args = get_parser().parse_args(
        ["--hf-checkpoint", str(glm4), "--spec", "slime_plugins.models.glm5", "get_glm_spec"]
    )
    with pytest.raises(ModelConfigError, match="--spec slime_plugins.models.glm5 get_glm_spec: cannot import"):
        validate_trainer_args(argparse.Namespace(**{**vars(args), "rollout_batch_size": 8, "num_epoch": 1}))


# ------------------------------------------------------------------ training
@pytest.mark.usefixtures("parallel")
def test_sft_steps_match_transformers_and_lower_the_loss(glm4, caplog):
    """One SFT step on four samples packed in one THD row: loss and every gradient (sandwich
    norms, QKV bias, fused gate/up included) equal transformers' in float64; five steps lower
    the loss; full recomputation (slime's GLM4 scripts use it) gives bit-identical gradients.
    The optimizer offload flags are on: on CPU they change nothing (logged)."""
    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs

    samples = synthetic_samples(4, 300, seed=3)
    batching = BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=4096, calculate_per_token_loss=True)
    optim = OptimizerArgs(
        lr=3e-3,
        weight_decay=0.0,
        optimizer_cpu_offload=True,
        overlap_cpu_optimizer_d2h_h2d=True,
        use_precision_aware_optimizer=True,
    )
    with caplog.at_level(logging.INFO, logger="slime.backends.megatron_utils.optimizer"):
        actor = build_actor(glm4, batching, global_batch_size=4, optim=optim)
    assert "no effect on CPU" in caplog.text
    loss, grads = actor.gradients(samples)
    model, log_probs, _ = hf_response_log_probs(glm4, samples, requires_grad=True)
    total = sum(sum(s["loss_mask"]) for s in samples)
    ref = (
        -sum((lp * torch.tensor(s["loss_mask"], dtype=torch.float64)).sum() for s, lp in zip(samples, log_probs))
        / total
    )
    ref.backward()
    ours = actor.gather_hf(grads)
    assert set(ours) == {k for k, _ in model.named_parameters()}
    assert loss == pytest.approx(float(ref), rel=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(ours[k].double(), p.grad, rtol=1e-4, atol=1e-7, msg=k)
    recompute = ModelBuildArgs(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    again = MegatronActor(actor.model_args, recompute, batching, optim, TrainArgs(global_batch_size=4, total_steps=1))
    again.load_hf(str(glm4))
    loss2, grads2 = again.gradients(samples)
    assert again.model.module.config.recompute_granularity == "full"
    assert loss2 == loss and all(torch.equal(g, grads2[k]) for k, g in grads.items())
    losses = [actor.train_step(samples)["loss"] for _ in range(5)]
    assert losses[0] == pytest.approx(float(ref), rel=1e-5)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.usefixtures("parallel")
def test_torch_dist_round_trip(glm4, tmp_path):
    """The GLM4 layer's own norms go through torch_dist (megatron's sharded state dict) and back."""
    from slime.backends.megatron_utils.checkpoint import load_model_weights, save_model_weights
    from slime.backends.megatron_utils.hf_weights import hf_to_mcore, load_hf_state_dict
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs, build_gpt_model

    m = resolve("--hf-checkpoint", glm4)
    model = build_gpt_model(m, ModelBuildArgs())
    model.load_state_dict(hf_to_mcore(load_hf_state_dict(str(glm4)), m), strict=False)
    want = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert (
        "decoder.layers.1.post_mlp_layernorm.weight" in want
        and "decoder.layers.0.post_self_attn_layernorm.weight" in want
    )
    save_model_weights(model, str(tmp_path / "ckpt"), iteration=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_model_weights(model, str(tmp_path / "ckpt"))
    got = model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
