"""Invariant 1: the loss and its gradients are those of the formula, whatever the packing,
micro-batching, DP or TP; a few steps lower the loss. The reference is transformers' model
on each sample separately, normalized by hand."""

from __future__ import annotations

import dataclasses
from pathlib import Path
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, TINY_DATA, free_port

N_SAMPLES = 8
MP_TIMEOUT_S = 240


def samples_from_data(n=N_SAMPLES):
    from slime.data.config import SFTDataConfig, build_data_source

    src = build_data_source(SFTDataConfig(prompt_data=str(TINY_DATA), hf_checkpoint=str(TINY)), progress=False)
    return [{"tokens": s.tokens, "loss_mask": s.loss_mask, "response_length": s.response_length} for s in src.get_samples(n)]


def reference(samples, per_token: bool):
    """Loss and HF-named gradients computed directly with transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float64)
    total_sup = sum(sum(s["loss_mask"]) for s in samples)
    loss = 0
    for s in samples:
        ids = torch.tensor(s["tokens"])[None]
        mask = torch.tensor([0] * (len(s["tokens"]) - s["response_length"]) + s["loss_mask"], dtype=torch.float64)
        logp = model(ids).logits[0, :-1].log_softmax(-1)
        ce = -logp.gather(-1, ids[0, 1:, None])[:, 0]
        tok = (ce * mask[1:]).sum()
        loss = loss + (tok / total_sup if per_token else tok / mask[1:].sum() / len(samples))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    grads["lm_head.weight"] = grads["model.embed_tokens.weight"]  # tied
    return float(loss), grads


@pytest.fixture(scope="module")
def actor():
    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.cpu_compat import disable_cpu_mode
    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs
    from slime.backends.megatron_utils.parallel import destroy_parallel

    a = MegatronActor(
        ModelArgs(**hf_model_args(str(TINY))),
        ModelBuildArgs(),
        BatchingArgs(),
        OptimizerArgs(lr=3e-3, weight_decay=0.0),
        TrainArgs(global_batch_size=N_SAMPLES, total_steps=10),
    )
    a.load_hf(str(TINY))
    yield a
    destroy_parallel()
    disable_cpu_mode()


def hf_grads(actor, grads):
    from slime.backends.megatron_utils.hf_weights import mcore_to_hf

    return mcore_to_hf([grads], actor.model_args)


LAYOUTS = {
    "thd_dynamic": dict(use_dynamic_batch_size=True, max_tokens_per_gpu=600),
    "thd_one_pack": dict(use_dynamic_batch_size=True, max_tokens_per_gpu=100_000),
    "thd_mbs1": dict(micro_batch_size=1),
    "thd_mbs3": dict(micro_batch_size=3),
    "sbhd_mbs1_unpacked": dict(qkv_format="sbhd", micro_batch_size=1),
    "sbhd_mbs4_padded": dict(qkv_format="sbhd", micro_batch_size=4),
}


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "per_sample"])
def test_loss_and_grads_match_formula_for_every_layout(actor, per_token):
    from slime.backends.megatron_utils.batching import BatchingArgs

    samples = samples_from_data()
    ref_loss, ref_grads = reference(samples, per_token)
    for name, layout in LAYOUTS.items():
        actor.batching = BatchingArgs(calculate_per_token_loss=per_token, **layout)
        loss, grads = actor.gradients(samples)
        assert loss == pytest.approx(ref_loss, rel=1e-5), name
        ours = hf_grads(actor, grads)
        for k, g in ours.items():
            torch.testing.assert_close(g.double(), ref_grads[k], rtol=1e-4, atol=1e-7, msg=f"{name}: {k}")


def _actor_with(actor, build):
    """A per-token actor of ``actor``'s model under ``build``, on the HF weights."""
    from slime.backends.megatron_utils.actor import MegatronActor
    from slime.backends.megatron_utils.batching import BatchingArgs

    other = MegatronActor(actor.model_args, build, BatchingArgs(calculate_per_token_loss=True), actor.optim_args, actor.train_args)
    other.load_hf(str(TINY))
    return other


def _assert_reference_gradients(actor):
    samples = samples_from_data()
    ref_loss, ref_grads = reference(samples, per_token=True)
    loss, grads = actor.gradients(samples)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for k, g in hf_grads(actor, grads).items():
        torch.testing.assert_close(g.double(), ref_grads[k], rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize(
    "recompute",
    [{"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
     {"recompute_granularity": "selective"}],  # megatron's default selective module: core attention
    ids=["full", "selective"],
)  # fmt: skip
def test_recompute_gives_the_same_gradients(actor, recompute):
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs

    other = _actor_with(actor, ModelBuildArgs(**recompute))
    _assert_reference_gradients(other)
    attention = other.model.module.decoder.layers[0].self_attention
    assert attention.checkpoint_core_attention == (recompute["recompute_granularity"] == "selective")


def test_deterministic_mode(actor, monkeypatch):
    """--deterministic-mode (slime's reproducibility script): megatron's config flag, torch's
    deterministic algorithms and the cuBLAS workspace they need; the same exact gradients."""
    import os

    from slime.backends.megatron_utils.model_provider import ModelBuildArgs

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        other = _actor_with(actor, ModelBuildArgs(deterministic_mode=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert other.model.module.config.deterministic_mode
        _assert_reference_gradients(other)
    finally:
        torch.use_deterministic_algorithms(False)  # process-wide: the other tests run without it


def test_modes_differ(actor):
    """Per-token and per-sample are different objectives on unequal samples (the test can fail)."""
    from slime.backends.megatron_utils.batching import BatchingArgs

    samples = samples_from_data()
    actor.batching = BatchingArgs(calculate_per_token_loss=True)
    a, _ = actor.gradients(samples)
    actor.batching = BatchingArgs(calculate_per_token_loss=False)
    b, _ = actor.gradients(samples)
    assert abs(a - b) > 1e-3


def test_steps_lower_the_loss_and_report_metrics(actor):
    from slime.backends.megatron_utils.batching import BatchingArgs

    actor.batching = BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=800, calculate_per_token_loss=True)
    actor.load_hf(str(TINY))
    samples = samples_from_data()
    history = [actor.train_step(samples) for _ in range(6)]
    for m in history:
        for key in ("loss", "lr", "grad_norm", "supervised_tokens", "total_tokens", "tokens_per_s", "packing_efficiency", "step_time_s"):
            assert key in m
        assert 0 < m["packing_efficiency"] <= 1 and m["supervised_tokens"] == sum(sum(s["loss_mask"]) for s in samples)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[0]["lr"] == pytest.approx(3e-3)


def test_lr_schedule_warmup_then_cosine(actor):
    import math

    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs

    optim = OptimizerArgs(lr=1e-3, min_lr=1e-4, lr_decay_style="cosine", lr_warmup_iters=2, weight_decay=0.0)
    other = MegatronActor(actor.model_args, actor.build_args, actor.batching, optim, TrainArgs(global_batch_size=N_SAMPLES, total_steps=6))
    samples = samples_from_data()[:2]
    lrs = [other.train_step(samples)["lr"] for _ in range(6)]
    # Megatron's schedule: linear warmup from 0 over 2 steps, then cosine from lr to min_lr at step 6.
    expected = [0.0, 5e-4, 1e-3] + [1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in (3, 4, 5)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_rl_sampling_flags_do_not_reach_the_loss():
    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.utils.arguments import get_parser

    base = ["--hf-checkpoint", str(TINY), "--prompt-data", str(TINY_DATA), "--rollout-batch-size", "8"]
    p = get_parser()
    plain = actor_config_from_args(p.parse_args(base), total_steps=4)
    sampled = actor_config_from_args(
        p.parse_args(base + ["--rollout-temperature", "0.3", "--rollout-top-p", "0.5", "--rollout-top-k", "5"]), total_steps=4
    )
    assert plain == sampled


def test_bad_settings_fail_early():
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.loss import resolve_loss
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs

    with pytest.raises(ValueError, match="--max-tokens-per-gpu"):
        BatchingArgs(use_dynamic_batch_size=True)
    with pytest.raises(ValueError, match="--min-lr"):
        OptimizerArgs(lr=1e-5, min_lr=1e-4)
    with pytest.raises(ValueError, match="--recompute-method"):
        ModelBuildArgs(recompute_granularity="full")
    with pytest.raises(ValueError, match="custom_loss needs --custom-loss-function-path"):
        resolve_loss("custom_loss")
    with pytest.raises(ValueError, match="unknown --loss-type"):
        resolve_loss("nope")


# ------------------------------------------------------------------ two gloo processes
def run_steps(tmp_path, name, *flags, nproc=1):
    dump = tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-m"]
    if nproc > 1:
        cmd += ["torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port()), "-m"]
    cmd += [
        "slime.backends.megatron_utils.run_steps",
        "--hf-checkpoint", str(TINY), "--prompt-data", str(TINY_DATA),
        "--rollout-batch-size", str(N_SAMPLES), "--num-steps", "1", "--dump-grads", str(dump),
        "--use-dynamic-batch-size", "--max-tokens-per-gpu", "700", *flags,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=MP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return torch.load(dump, weights_only=True), metrics


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "per_sample"])
def test_dp2_and_tp2_match_single_process(tmp_path, per_token):
    flags = ["--calculate-per-token-loss"] if per_token else []
    ref_loss, ref_grads = reference(samples_from_data(), per_token)
    # Per-sample means depend on how samples are dealt to DP ranks. TP=2 only shards the
    # vocabulary of the cross-entropy; the loss weights (per-sample or per-token) are built
    # before and apart from it, so TP=2 runs under per-token only: one torchrun less in CI.
    # TP=2 runs with --sequence-parallel, as slime's scripts do (plain TP=2 trains in
    # test_torch_dist_round_trip_and_tp2_load): torch norms marked for the TP gradient sum.
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    layouts = (("dp2", []), ("tp2_sp", tp2)) if per_token else (("dp2", []),)
    for name, extra in layouts:
        dump, metrics = run_steps(tmp_path, name, *flags, *extra, nproc=2)
        assert dump["loss"] == pytest.approx(ref_loss, rel=1e-5), name
        assert metrics and metrics[0]["loss"] == pytest.approx(ref_loss, rel=1e-5)
        for k, g in dump["grads"].items():
            torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-7, msg=f"{name}: {k}")


def test_torch_dist_round_trip_and_tp2_load(tmp_path):
    """HF -> torch_dist -> HF is bit-exact, and the TP=1 conversion trains identically at TP=2."""
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    dist_dir, hf_out = tmp_path / "dist", tmp_path / "hf"
    for cmd in (
        ["tools/convert_hf_to_torch_dist.py", "--hf-checkpoint", str(TINY), "--save", str(dist_dir)],
        ["tools/convert_torch_dist_to_hf.py", "--input-dir", str(dist_dir), "--output-dir", str(hf_out), "--origin-hf-dir", str(TINY)],
    ):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=MP_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(hf_out / "model.safetensors"), load_file(TINY / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(hf_out))  # loads as a HF model
    dump, _ = run_steps(tmp_path, "tp2_ref_load", "--ref-load", str(dist_dir), "--tensor-model-parallel-size", "2", "--calculate-per-token-loss", nproc=2)
    ref_loss, ref_grads = reference(samples_from_data(), per_token=True)
    assert dump["loss"] == pytest.approx(ref_loss, rel=1e-5)
    for k, g in dump["grads"].items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-7, msg=k)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    from slime.backends.megatron_utils.checkpoint import checkpoint_dir

    with pytest.raises(FileNotFoundError, match="not a torch_dist checkpoint"):
        checkpoint_dir(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(FileNotFoundError, match="iter_0000007"):
        checkpoint_dir(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("x")
    with pytest.raises(ValueError, match="unreadable iteration"):
        checkpoint_dir(str(tmp_path))


def test_torch_dist_round_trip_untied_llama(tmp_path):
    from safetensors.torch import load_file

    from megatron_helpers import make_hf_checkpoint

    hf = make_hf_checkpoint("llama", tmp_path / "llama")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for cmd in (
        ["tools/convert_hf_to_torch_dist.py", "--hf-checkpoint", str(hf), "--save", str(tmp_path / "dist")],
        ["tools/convert_torch_dist_to_hf.py", "--input-dir", str(tmp_path / "dist"), "--output-dir", str(tmp_path / "out"), "--origin-hf-dir", str(hf)],
    ):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=MP_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(hf / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_crash_mid_save_keeps_previous_checkpoint(actor, tmp_path, monkeypatch):
    """A save that dies before the tracker moves leaves the previous checkpoint current and loadable."""
    from megatron.core import dist_checkpointing

    from slime.backends.megatron_utils import checkpoint

    actor.batching = dataclasses.replace(actor.batching, calculate_per_token_loss=True)
    samples = samples_from_data()[:2]
    actor.train_step(samples)
    actor.save(str(tmp_path), 0, {"rollout_id": 0, "data_state": {}})
    before = {k: v.clone() for k, v in actor.megatron_state().items()}
    actor.train_step(samples)

    def dying_save(state, target, *a, **k):
        (Path(target) / "partial.distcp").write_bytes(b"half written")
        raise RuntimeError("node lost mid-save")

    monkeypatch.setattr(dist_checkpointing, "save", dying_save)
    with pytest.raises(RuntimeError, match="mid-save"):
        actor.save(str(tmp_path), 1, {"rollout_id": 1, "data_state": {}})
    monkeypatch.undo()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "0"
    state = actor.load(str(tmp_path))
    assert state["rollout_id"] == 0
    for k, v in actor.megatron_state().items():
        assert torch.equal(v, before[k]), k
    assert checkpoint.checkpoint_dir(str(tmp_path)).endswith("iter_0000000")


def test_training_checkpoints_use_megatron_lm_keys(actor, tmp_path, monkeypatch):
    """A training checkpoint's tensors are keyed as Megatron-LM saves them (the unwrapped
    model's ``decoder.layers...``), so it also serves as initial weights (`load_dist`, what
    --ref-load does); one saved with the older ``module.`` prefix still resumes and loads."""
    from megatron.core import dist_checkpointing

    from slime.backends.megatron_utils import checkpoint

    actor.batching = dataclasses.replace(actor.batching, calculate_per_token_loss=True)
    actor.train_step(samples_from_data()[:2])  # optimizer moments exist
    saved = {k: v.clone() for k, v in actor.megatron_state().items()}

    def zero_weights():
        with torch.no_grad():
            for p in actor.model.module.parameters():
                p.zero_()

    actor.save(str(tmp_path / "new"), 1, {"rollout_id": 1})
    keys = dist_checkpointing.load_tensors_metadata(checkpoint.checkpoint_dir(str(tmp_path / "new"))).keys()
    assert "decoder.final_layernorm.weight" in keys and "embedding.word_embeddings.weight" in keys
    assert not [k for k in keys if k.startswith(checkpoint.LEGACY_PREFIX)]
    assert [k for k in keys if k.startswith("optimizer.")]  # the training state is in it too
    zero_weights()
    actor.load_dist(str(tmp_path / "new"))
    assert all(torch.equal(v, saved[k]) for k, v in actor.megatron_state().items())

    real = checkpoint._sharded_state_dict
    monkeypatch.setattr(checkpoint, "_sharded_state_dict", lambda model, prefix="": real(model, checkpoint.LEGACY_PREFIX))
    actor.save(str(tmp_path / "old"), 1, {"rollout_id": 1})  # the layout of earlier saves
    monkeypatch.undo()
    old = dist_checkpointing.load_tensors_metadata(checkpoint.checkpoint_dir(str(tmp_path / "old"))).keys()
    assert "module.decoder.final_layernorm.weight" in old
    # Chained optimizers (a dense and an expert one at EP > 1) prefix their keys with chained_N.
    legacy = ["chained_0.optimizer.state.exp_avg.module.decoder.x", "module.decoder.x", "module.embedding.y"]
    assert checkpoint.key_prefix_of(legacy) == checkpoint.LEGACY_PREFIX
    assert checkpoint.key_prefix_of([k.replace("module.", "") for k in legacy]) == ""
    for load in (lambda: actor.load(str(tmp_path / "old")), lambda: actor.load_dist(str(tmp_path / "old"))):
        zero_weights()
        load()
        assert all(torch.equal(v, saved[k]) for k, v in actor.megatron_state().items())


def test_weights_load_without_our_extra_state(actor, tmp_path):
    """Initial weights (`load_dist`, --ref-load) need the weights only: a checkpoint whose
    layers' ``_extra_state`` is missing or named otherwise (Transformer Engine's layers save
    theirs under other names) loads bit for bit; one that lacks a weight names it."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from slime.backends.megatron_utils import checkpoint

    saved = {k: v.clone() for k, v in actor.megatron_state().items()}

    def save_without(root, drop):
        sd = checkpoint._sharded_state_dict(actor.chunks)
        sd = {k: v for k, v in sd.items() if not drop(k)}
        target = tmp_path / root / "iter_0000000"
        target.mkdir(parents=True)
        dist_checkpointing.save(sd, str(target))
        dist.barrier()
        (tmp_path / root / "latest_checkpointed_iteration.txt").write_text("0")
        return str(tmp_path / root)

    no_extra = save_without("no_extra", lambda k: k.endswith("_extra_state"))
    keys = dist_checkpointing.load_tensors_metadata(checkpoint.checkpoint_dir(no_extra)).keys()
    assert not [k for k in keys if "_extra_state" in k]
    with torch.no_grad():
        for p in actor.model.module.parameters():
            p.zero_()
    actor.load_dist(no_extra)
    assert all(torch.equal(v, saved[k]) for k, v in actor.megatron_state().items())

    no_norm = save_without("no_norm", lambda k: k == "decoder.final_layernorm.weight")
    with pytest.raises(ValueError, match=r"lacks weights for \['decoder.final_layernorm.weight'\]"):
        actor.load_dist(no_norm)
