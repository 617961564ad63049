"""Pipeline parallelism: every layout equals the single-rank formula (loss, gradients, log-probs).

One four-process torchrun world (tests/pp_dist_worker.py) runs the layouts one after another;
the references are transformers' float64 model on each sample separately, normalized by hand
(what the single-rank actor is tested against in test_megatron_training). Samples have
different lengths and are packed (THD) into several micro-batches of different lengths per
rank, so the pipelined schedule passes variable shapes, and the packed log-probs equal
separate per-sample runs (packing isolation under PP). Virtual stages (PP=2 x V=2, megatron's
interleaved schedule) run in the same world: their ranks pack 2, 3 (DP=2) and 5 (DP=1)
micro-batches, so the count is rounded up to a multiple of PP on some ranks. Context
parallelism with TP=2 (sequence parallelism) and with PP=2 runs there too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import run_torchrun
from test_megatron_model import parallel  # noqa: F401  (the world-1 process group, a module fixture)
from megatron_helpers import (
    attach_rl_fields,
    hf_policy_reference,
    hf_response_log_probs,
    make_hf_checkpoint,
    synthetic_samples,
)

N_SAMPLES = 8
VOCAB = 300  # make_hf_checkpoint's vocabulary
TIMEOUT_S = 400
# policy_loss with its clipping, KL, entropy and TIS terms, so each contributes to what must match.
ALGO = {
    "eps_clip": 0.2,
    "eps_clip_high": 0.28,
    "entropy_coef": 0.01,
    "use_kl_loss": True,
    "kl_loss_coef": 0.1,
    "use_tis": True,
}


def sft_reference(hf_dir, samples, per_token: bool):
    """Loss and HF-named gradients of the SFT objective, computed with transformers in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float64)
    total_sup = sum(sum(s["loss_mask"]) for s in samples)
    loss = 0
    for s in samples:
        ids = torch.tensor(s["tokens"])[None]
        mask = torch.tensor([0] * (len(s["tokens"]) - s["response_length"]) + s["loss_mask"], dtype=torch.float64)
        ce = -model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        tok = (ce * mask[1:]).sum()
        loss = loss + (tok / total_sup if per_token else tok / mask[1:].sum() / len(samples))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    loss = loss.detach()
    grads.setdefault("lm_head.weight", grads["model.embed_tokens.weight"])  # tied
    return float(loss), grads


def hf_state(hf_dir):
    from slime.backends.megatron_utils.hf_weights import load_hf_state_dict

    return load_hf_state_dict(str(hf_dir))


def _run(
    name, hf_dir, build, loss_type="sft_loss", per_token=True, norms=(), log_probs=False, steps=0, resume="", save="",
    **extra,
):
    return {
        "name": name, "hf_dir": str(hf_dir), "build": build, "loss_type": loss_type, "per_token": per_token,
        "norms": list(norms), "log_probs": log_probs, "steps": steps, "resume_from": str(resume), "save_to": str(save),
        **extra,
    }  # fmt: skip


@pytest.fixture(scope="module")
def pp_world(tmp_path_factory):
    """(result by run name, checkpoints, samples, tokens) of one four-rank run of every layout."""
    tmp = tmp_path_factory.mktemp("pp")
    tied = make_hf_checkpoint("qwen3", tmp / "qwen3", seed=1, num_layers=4)
    untied = make_hf_checkpoint("qwen2", tmp / "qwen2", seed=2, num_layers=4)
    samples = synthetic_samples(N_SAMPLES, VOCAB, seed=5)
    _, log_probs, _ = hf_response_log_probs(untied, samples)
    attach_rl_fields(samples, log_probs, seed=6)
    tokens = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(7)).tolist()
    full_recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    runs = [
        # PP=2 x DP=2, tied embeddings split over the first and last stage; both normalizations;
        # block recompute of one layer per stage.
        _run("pp2", tied, {"pipeline_model_parallel_size": 2, "recompute_granularity": "full",
             "recompute_method": "block", "recompute_num_layers": 1}, per_token=False, norms=(True, False),
             log_probs=True, steps=1, save=tmp / "ckpt_pp2"),
        # TP=2 x PP=2, uneven stages (1 + 3 layers), untied output layer, policy_loss, full recompute.
        _run("tp2_pp2_uneven", untied, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
             decoder_first_pipeline_num_layers=1, decoder_last_pipeline_num_layers=3, **full_recompute),
             loss_type="policy_loss", norms=(True,), log_probs=True),
        # The PP=2 checkpoint resumed at PP=1 (DP=4): the next step is the one PP=2 took; saved again.
        _run("pp1_resume", tied, {}, per_token=False, steps=1, resume=tmp / "ckpt_pp2", save=tmp / "ckpt_pp1"),
        # ... and that PP=1 checkpoint at PP=2 with uneven stages (3 + 1).
        _run("pp2_uneven_resume", tied, {"pipeline_model_parallel_size": 2, "decoder_first_pipeline_num_layers": 3},
             resume=tmp / "ckpt_pp1"),
        # PP=2 x V=2 x DP=2: one layer per chunk (rank 0 holds layers 0 and 2), tied embeddings
        # on chunk 0 of rank 0 and chunk 1 of rank 1, full recompute; both normalizations; saved.
        _run("vpp", tied, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
             **full_recompute}, per_token=False, norms=(True, False), log_probs=True, steps=1, save=tmp / "ckpt_vpp",
             offload=True, reload_dist=True),
        # That PP=2 x V=2 checkpoint resumed at PP=1: the next step is the one V=2 took.
        _run("vpp_to_pp1", tied, {}, per_token=False, steps=1, resume=tmp / "ckpt_vpp"),
        # TP=2 x PP=2 x V=2 with sequence parallelism (each chunk's block spec), DP=1: five packs
        # rounded up to six, untied, policy_loss with its KL term (so the reference weights of
        # every chunk are kept and swapped in).
        _run("tp2_vpp", untied, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
             virtual_pipeline_model_parallel_size=2, sequence_parallel=True), loss_type="policy_loss", norms=(True,), steps=1, ref_log_probs=True),
        # Context parallelism with the other splits (each sample zigzag-split over two CP ranks):
        # TP=2 x CP=2 with sequence parallelism, and PP=2 x CP=2 (stages pass CP shards).
        _run("tp2_cp2", untied, dict(tensor_model_parallel_size=2, context_parallel_size=2, sequence_parallel=True),
             norms=(True,), log_probs=True),
        _run("pp2_cp2", tied, dict(pipeline_model_parallel_size=2, context_parallel_size=2), norms=(True, False),
             log_probs=True),
    ]  # fmt: skip
    torch.save({"samples": samples, "algorithm": ALGO, "tokens": tokens, "runs": runs}, tmp / "in.pt")
    run_torchrun(4, "pp_dist_worker.py", tmp / "in.pt", tmp / "out.pt", timeout=TIMEOUT_S)
    return torch.load(tmp / "out.pt", weights_only=True), {"tied": tied, "untied": untied}, samples, tokens


def assert_grads(ours, ref, msg):
    assert set(ours) <= set(ref) and set(ref) - set(ours) <= {"lm_head.weight"}, msg  # tied: no lm_head
    for k, g in ours.items():
        torch.testing.assert_close(g, ref[k], rtol=1e-4, atol=1e-7, msg=f"{msg}: {k}")


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "per_sample"])
def test_pp2_sft_loss_and_grads_match_single_rank(pp_world, per_token):
    result, ckpt, samples, _ = pp_world
    ref_loss, ref_grads = sft_reference(ckpt["tied"], samples, per_token)
    loss, grads = result["pp2"]["grads"][per_token]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert_grads(grads, ref_grads, f"pp2 per_token={per_token}")
    if per_token:  # evaluate: the per-token loss, summed on the last stage, on global rank 0
        assert result["pp2"]["eval"] == pytest.approx(ref_loss, rel=1e-5)
    else:  # the train step's metrics (last stage) reach global rank 0
        first = result["pp2"]["metrics"][0]
        assert first["loss"] == pytest.approx(loss, rel=1e-6) and first["supervised_tokens"] > 0
        assert first["micro_batches"] >= 2
        # the tied embedding counted once in the gradient norm (its last-stage copy is not a parameter of its own)
        norm = sum(float((g**2).sum()) for k, g in ref_grads.items() if k != "lm_head.weight") ** 0.5
        assert first["grad_norm"] == pytest.approx(norm, rel=1e-4)


@pytest.mark.parametrize("name", ["tp2_pp2_uneven", "tp2_vpp"])
def test_tp2_pp2_policy_loss_matches_single_rank(pp_world, name):
    from slime.algorithms.config import AlgorithmConfig

    result, ckpt, samples, _ = pp_world
    ref_loss, _, ref_grads = hf_policy_reference(ckpt["untied"], samples, AlgorithmConfig(**ALGO), per_token=True)
    loss, grads = result[name]["grads"][True]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert_grads(grads, ref_grads, name)
    if name == "tp2_vpp":  # after a step, every chunk's reference weights swapped in: the HF model's log-probs
        entry = result[name]
        _, ref_lp, _ = hf_response_log_probs(ckpt["untied"], samples)
        assert len(entry["ref_log_probs"]) == len(samples)
        for ours, ref in zip(entry["ref_log_probs"], ref_lp):
            torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
        trained, back = entry["hf_after"], entry["hf_after_ref"]
        assert any(not torch.equal(trained[k], v) for k, v in hf_state(ckpt["untied"]).items())  # the step moved them
        assert all(torch.equal(back[k], v) for k, v in trained.items())  # ... and they came back after the swap


@pytest.mark.parametrize("name,family", [("tp2_cp2", "untied"), ("pp2_cp2", "tied")])
def test_context_parallel_with_tp_or_pp_matches_single_rank(pp_world, name, family):
    """CP=2 combined with TP=2 (sequence parallelism) or PP=2: loss and every gradient of the
    SFT objective, the packed log-probs and entropy (gathered over CP, against separate
    per-sample HF runs) and the logits of one sequence split over the CP ranks."""
    from transformers import AutoModelForCausalLM

    result, ckpt, samples, tokens = pp_world
    entry = result[name]
    for per_token, (loss, grads) in entry["grads"].items():
        ref_loss, ref_grads = sft_reference(ckpt[family], samples, per_token)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert_grads(grads, ref_grads, f"{name} per_token={per_token}")
    mine = [samples[i] for i in entry["share"]]
    _, ref_lp, ref_ent = hf_response_log_probs(ckpt[family], mine)
    assert len(entry["log_probs"]) == len(mine)
    for ours, ref, ours_ent, ent in zip(entry["log_probs"], ref_lp, entry["entropy"], ref_ent):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_ent.double(), ent, rtol=1e-5, atol=1e-5)
    hf_model = AutoModelForCausalLM.from_pretrained(str(ckpt[family]), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(entry["logits"], hf_model(torch.tensor([tokens])).logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "per_sample"])
def test_virtual_stages_sft_loss_and_grads_match_single_rank(pp_world, per_token):
    """PP=2 x V=2: every chunk's gradients (layers under their global index) equal the
    single-rank ones; the train step's metrics reach rank 0 with an even micro-batch count."""
    result, ckpt, samples, _ = pp_world
    ref_loss, ref_grads = sft_reference(ckpt["tied"], samples, per_token)
    loss, grads = result["vpp"]["grads"][per_token]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert_grads(grads, ref_grads, f"vpp per_token={per_token}")
    if per_token:
        assert result["vpp"]["eval"] == pytest.approx(ref_loss, rel=1e-5)
    else:
        first = result["vpp"]["metrics"][0]
        assert first["loss"] == pytest.approx(loss, rel=1e-6) and first["micro_batches"] % 2 == 0
        norm = sum(float((g**2).sum()) for k, g in ref_grads.items() if k != "lm_head.weight") ** 0.5
        assert first["grad_norm"] == pytest.approx(norm, rel=1e-4)


@pytest.mark.parametrize("name,family", [("pp2", "tied"), ("tp2_pp2_uneven", "untied"), ("vpp", "tied")])
def test_log_probs_logits_export_and_weight_sync_gather_every_stage(pp_world, name, family):
    """Rank 0 (first stage) gets the last stage's log-probs and logits; packed log-probs equal
    separate per-sample HF runs; export and weight sync give the HF weights back bit-exactly."""
    from transformers import AutoModelForCausalLM

    result, ckpt, samples, tokens = pp_world
    entry = result[name]
    mine = [samples[i] for i in entry["share"]]
    _, ref_lp, ref_ent = hf_response_log_probs(ckpt[family], mine)
    assert len(entry["log_probs"]) == len(mine)
    for ours, ref in zip(entry["log_probs"], ref_lp):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(entry["entropy"], ref_ent):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    hf_model = AutoModelForCausalLM.from_pretrained(str(ckpt[family]), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(entry["logits"], hf_model(torch.tensor([tokens])).logits[0], rtol=1e-5, atol=1e-5)
    hf = hf_state(ckpt[family])
    if family == "tied":
        hf.pop("lm_head.weight")
    for exported in (entry["hf"], dict(entry["buckets"])):
        assert set(exported) == set(hf) or set(exported) == set(hf) | {"lm_head.weight"}
        for k, v in hf.items():
            assert torch.equal(exported[k], v), k


def test_torch_dist_checkpoints_move_between_pipeline_layouts(pp_world):
    """Saved at PP=2, resumed at PP=1 (model, optimizer and schedule): its next step is PP=2's;
    saved at PP=1, loaded at PP=2 with uneven stages: the same weights, bit for bit."""
    result, *_ = pp_world
    pp2, pp1, back = result["pp2"], result["pp1_resume"], result["pp2_uneven_resume"]
    assert pp1["metrics"][0]["loss"] == pytest.approx(pp2["metrics"][1]["loss"], rel=1e-5)
    for k, v in pp2["hf_after"].items():
        torch.testing.assert_close(pp1["hf_saved"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert set(back["hf"]) == set(pp1["hf_saved"])
    for k, v in pp1["hf_saved"].items():
        assert torch.equal(back["hf"][k], v), k


def test_torch_dist_checkpoint_moves_from_virtual_stages_to_pp1(pp_world):
    """Saved at PP=2 x V=2 (model, optimizer, schedule), resumed at PP=1: the same weights bit
    for bit and the next step is V=2's; the TP=2 x V=2 export and weight sync are exact."""
    result, ckpt, *_ = pp_world
    vpp, pp1 = result["vpp"], result["vpp_to_pp1"]
    assert set(pp1["hf"]) == set(vpp["hf_saved"])
    for k, v in vpp["hf_saved"].items():
        assert torch.equal(pp1["hf"][k], v), k
    assert pp1["metrics"][0]["loss"] == pytest.approx(vpp["metrics"][1]["loss"], rel=1e-5)
    assert vpp["offload_exact"]  # --offload-train releases and restores every chunk
    hf_tied = hf_state(ckpt["tied"])
    assert any(not torch.equal(vpp["hf_after"][k], v) for k, v in hf_tied.items() if k in vpp["hf_after"])  # trained
    for k, v in vpp["hf_after"].items():  # a weights-only save loaded by load_dist over the HF weights: every chunk
        assert torch.equal(vpp["hf_reloaded"][k], v), k
    hf = hf_state(ckpt["untied"])
    for exported in (result["tp2_vpp"]["hf"], dict(result["tp2_vpp"]["buckets"])):
        assert set(exported) == set(hf)
        for k, v in hf.items():
            assert torch.equal(exported[k], v), k


def test_converter_at_pp2_loads_on_one_rank(parallel, tmp_path):  # noqa: F811
    """tools/convert_hf_to_torch_dist.py under torchrun at PP=2 with uneven stages (1 + 3
    layers, tied embeddings): each stage converts its own layers, and the checkpoint loads on
    one rank with the HF weights bit for bit."""
    import subprocess

    from conftest import dist_env, torchrun_cmd

    from slime.backends.megatron_utils.checkpoint import load_model_weights
    from slime.backends.megatron_utils.hf_weights import mcore_to_hf
    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs, build_gpt_model

    hf = make_hf_checkpoint("qwen3", tmp_path / "qwen3", seed=3, num_layers=4)
    flags = ["--hf-checkpoint", hf, "--save", tmp_path / "dist", "--pipeline-model-parallel-size", "2",
             "--decoder-first-pipeline-num-layers", "1", "--decoder-last-pipeline-num-layers", "3"]  # fmt: skip
    proc = subprocess.run(torchrun_cmd(2, "../tools/convert_hf_to_torch_dist.py", *flags), env=dist_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = ModelArgs(**hf_model_args(str(hf)))
    model = build_gpt_model(m, ModelBuildArgs())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_model_weights(model, str(tmp_path / "dist"))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    back, ref = mcore_to_hf([state], m), hf_state(hf)
    ref.pop("lm_head.weight", None)  # tied
    assert set(ref) <= set(back)
    for k, v in ref.items():
        assert torch.equal(back[k], v), k


def test_bad_pipeline_layouts_fail_at_start_up():
    from conftest import TINY

    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.pipeline import check_pipeline_layout

    m = ModelArgs(**hf_model_args(str(TINY)))  # 2 layers
    with pytest.raises(ValueError, match="does not split over --pipeline-model-parallel-size 3"):
        check_pipeline_layout(m, ModelBuildArgs(pipeline_model_parallel_size=3))
    with pytest.raises(ValueError, match="--decoder-first-pipeline-num-layers needs --pipeline-model-parallel-size"):
        check_pipeline_layout(m, ModelBuildArgs(decoder_first_pipeline_num_layers=1))
    with pytest.raises(ValueError, match="does not split"):
        check_pipeline_layout(m, ModelBuildArgs(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=2))
    with pytest.raises(ValueError, match="use alltoall"):  # MoE at PP: see test_moe_parallel.py
        check_pipeline_layout(dataclasses.replace(m, num_experts=4), ModelBuildArgs(pipeline_model_parallel_size=2))
    # virtual stages: every stage's layers split into V chunks, uneven stages included
    with pytest.raises(ValueError, match="does not split into --pipeline-model-parallel-size 2 x 2 virtual stages"):
        check_pipeline_layout(m, ModelBuildArgs(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2))
    m8 = dataclasses.replace(m, num_layers=8)
    check_pipeline_layout(m8, ModelBuildArgs(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2))
    check_pipeline_layout(
        m8, ModelBuildArgs(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                           decoder_first_pipeline_num_layers=2)
    )  # fmt: skip
    with pytest.raises(ValueError, match="--decoder-last-pipeline-num-layers 3 does not split into 2 virtual stages"):
        check_pipeline_layout(
            m8, ModelBuildArgs(pipeline_model_parallel_size=3, virtual_pipeline_model_parallel_size=2,
                               decoder_last_pipeline_num_layers=3)
        )  # fmt: skip
    with pytest.raises(ValueError, match="virtual pipeline stages need --pipeline-model-parallel-size > 1"):
        ModelBuildArgs(virtual_pipeline_model_parallel_size=2)  # `parallel.ParallelLayout` refuses it


def test_chunk_names_round_trip():
    """A rank's chunk dicts <-> one dict under global layer numbers (rank 0 of PP=2 x V=2 with
    4 layers holds layers 0 and 2)."""
    from slime.backends.megatron_utils.pipeline import join_chunks, split_chunks

    chunks = [
        {"embedding.word_embeddings.weight": 0, "decoder.layers.0.mlp.w": 1},
        {"decoder.layers.0.mlp.w": 2, "decoder.final_layernorm.weight": 3, "output_layer.weight": 4},
    ]
    joined = join_chunks(chunks, [0, 2])
    assert joined == {
        "embedding.word_embeddings.weight": 0, "decoder.layers.0.mlp.w": 1, "decoder.layers.2.mlp.w": 2,
        "decoder.final_layernorm.weight": 3, "output_layer.weight": 4,
    }  # fmt: skip
    assert split_chunks(joined, [(0, 1), (2, 3)]) == chunks
    with pytest.raises(ValueError, match="layer 1 is not on this pipeline rank"):
        split_chunks({"decoder.layers.1.mlp.w": 0}, [(0, 1), (2, 3)])
