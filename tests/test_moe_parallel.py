"""MoE across ranks: TP=2 with sequence parallelism, expert parallelism (EP=2, both token
dispatchers, one rank with fewer samples), EP=2 x TP=2 with expert TP 1, each equal to a single rank in loss, gradients
and router metrics on packed micro-batches of different lengths; HF logits, bit-exact export,
weight sync and torch_dist checkpoints across layouts; conversion at EP x ETP x TP.

Context parallelism (CP=2 alone, with EP=2 over the CP ranks and with TP=2), EP=2 x PP=2 and
TP=2 x PP=2 with virtual stages equal a single rank too, the aux loss on.

Two torchrun worlds (tests/moe_dist_worker.py), of two and four ranks, run every layout.

Aux-loss semantics. megatron computes the load-balancing loss per micro-batch on each rank
(over the tokens of that micro-batch; under sequence parallelism the TP ranks' slices are
combined). EP does not split a micro-batch's tokens (EP ranks are DP ranks), so with the aux
loss on, an EP run equals the single-rank run fed the same micro-batches (here: each rank's
two samples pack into one micro-batch, as the single rank packs them; aux loss on); with
``--moe-aux-loss-coeff 0`` it equals any single-rank run (checked with a rank that has one
sample and so runs a padding-only micro-batch to keep the EP ranks in step). Under sequence
parallelism the TP ranks' partial aux losses sum to the micro-batch's (aux loss on).
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from conftest import run_torchrun
from test_megatron_model import parallel  # noqa: F401  (the world-1 process group, a module fixture)
from test_moe import build, checkpoints, hf_state, resolve  # noqa: F401  (fixtures)

DIST_TIMEOUT_S = 300
MAX_TOKENS = 200  # every pair of neighbouring samples below packs into one micro-batch, three do not
AUX = 0.05
Z = 1e-4  # router z-loss weight of the CP runs (the tiny router's z is ~150)

# name -> (family, layout, dispatcher, aux coeff, how the 4 samples are split over DP ranks).
# The aux loss is on for the Qwen2-MoE runs (both tests of its per-micro-batch semantics) and
# off for the Qwen3-MoE ones but PP=2, so three single-rank references cover every run.
# A layout's "world" is its torchrun world's size (2 unless given); "max_tokens" its
# --max-tokens-per-gpu (MAX_TOKENS unless given: a CP group packs CP x that per micro-batch);
# "z" its --moe-z-loss-coeff (none unless given).
RUNS = {
    "tp2_sp": ("qwen3_moe", {"tp": 2, "sp": True}, "alltoall", 0.0, "all"),
    "tp2_sp_allgather": ("qwen2_moe", {"tp": 2, "sp": True}, "allgather", AUX, "all"),
    "ep2": ("qwen3_moe", {"ep": 2}, "alltoall", 0.0, "one_three"),
    "ep2_allgather": ("qwen2_moe", {"ep": 2}, "allgather", AUX, "pairs"),
    "tp2_ep2_etp1": ("qwen3_moe", {"tp": 2, "ep": 2, "etp": 1, "sp": True}, "alltoall", 0.0, "all"),
    # Two pipeline stages, one MoE layer each: the aux loss and router statistics meet over PP.
    "pp2": ("qwen3_moe", {"pp": 2}, "alltoall", AUX, "all"),
    # Each sample split over two CP ranks (zigzag, padded): the ranks' partial aux losses and
    # router counts add up to the micro-batch's; the packs are the single rank's (2 x 100 tokens).
    "cp2": ("qwen3_moe", {"cp": 2, "max_tokens": MAX_TOKENS // 2, "z": Z}, "alltoall", AUX, "all"),
    # Four ranks. EP=2 x PP=2: each stage's experts split over the two DP ranks.
    "ep2_pp2": ("qwen3_moe", {"ep": 2, "pp": 2, "world": 4}, "alltoall", AUX, "pairs"),
    # CP=2 x DP=2 with EP=2 over the CP ranks (megatron folds CP into the expert data ranks).
    "cp2_ep2": ("qwen3_moe", {"cp": 2, "ep": 2, "max_tokens": MAX_TOKENS // 2, "world": 4}, "alltoall", AUX, "pairs"),
    # TP=2 (sequence parallel) x CP=2: the router's token counts meet over TP x CP.
    "tp2_cp2": ("qwen3_moe", {"tp": 2, "sp": True, "cp": 2, "max_tokens": MAX_TOKENS // 2, "z": Z, "world": 4},
                "alltoall", AUX, "all"),
    # TP=2 x PP=2 x V=2 on four layers, the first dense: rank 0 holds layers 0 and 2, rank 1
    # layers 1 and 3, so both ranks have a MoE layer only over their two chunks.
    "tp2_vpp": ("qwen2_moe_4l", {"tp": 2, "sp": True, "pp": 2, "vpp": 2, "world": 4}, "alltoall", AUX, "all"),
}
WORLDS = sorted({layout.get("world", 2) for _, layout, *_ in RUNS.values()})

RESUMED = ("ep2", "tp2_ep2_etp1")  # a training-state save/load round trip (optimizer too)


def _samples(vocab_size):
    from megatron_helpers import synthetic_samples

    samples = synthetic_samples(4, vocab_size, seed=5)
    lengths = [len(s["tokens"]) for s in samples]
    assert lengths[0] + lengths[1] <= MAX_TOKENS < lengths[0] + lengths[1] + lengths[2], lengths
    assert lengths[2] + lengths[3] <= MAX_TOKENS, lengths
    return samples


def _split(samples, how):
    return {"all": [samples], "pairs": [samples[:2], samples[2:]], "one_three": [samples[:1], samples[1:]]}[how]


def _model(hf_dir, dispatcher, aux, z=None):
    m = resolve("--hf-checkpoint", hf_dir)
    return dataclasses.replace(m, moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=aux, moe_z_loss_coeff=z)


@pytest.fixture(scope="module")
def dist_ckpt(parallel, checkpoints, tmp_path_factory):  # noqa: F811 (a fixture argument)
    """The tiny Qwen2-MoE saved as a torch_dist checkpoint at TP=1 (what the converter writes)."""
    from slime.backends.megatron_utils.checkpoint import save_model_weights
    from slime.backends.megatron_utils.hf_weights import hf_to_mcore

    m = resolve("--hf-checkpoint", checkpoints["qwen2_moe"])
    model = build(m)
    model.load_state_dict(hf_to_mcore(hf_state(checkpoints["qwen2_moe"]), m), strict=False)
    root = tmp_path_factory.mktemp("dist") / "q2"
    save_model_weights(model, str(root), iteration=0)
    return root


@pytest.fixture(scope="module")
def models(checkpoints, tmp_path_factory):  # noqa: F811
    """test_moe's tiny checkpoints and a 4-layer Qwen2-MoE (first layer dense) for virtual stages."""
    from make_tiny_qwen3_moe import make_tiny_moe

    deep = make_tiny_moe(tmp_path_factory.mktemp("moe4") / "q2", "qwen2_moe", seed=4, num_hidden_layers=4)
    return {**checkpoints, "qwen2_moe_4l": deep}


@pytest.fixture(scope="module")
def dist_run(models, dist_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_par")
    vocab = resolve("--hf-checkpoint", models["qwen3_moe"]).vocab_size
    tokens = torch.randint(0, vocab, (29,), generator=torch.Generator().manual_seed(3)).tolist()
    samples = _samples(vocab)
    runs = {world: [] for world in WORLDS}
    for name, (family, layout, dispatcher, aux, how) in RUNS.items():
        run = {"name": name, "hf_dir": str(models[family]), "dispatcher": dispatcher, "aux_coeff": aux}
        run.update({"max_tokens": MAX_TOKENS, **layout}, samples=_split(samples, how), dist_ckpt="", save="")
        runs[run.pop("world", 2)].append(run)
    by_name = {r["name"]: r for world in runs.values() for r in world}
    by_name["ep2"]["save"] = str(tmp / "ep2_ckpt")  # loaded at EP=1 below
    for name in RESUMED:
        by_name[name]["resume"] = str(tmp / f"{name}_state")
    by_name["ep2_allgather"]["dist_ckpt"] = str(dist_ckpt)  # a TP=1 checkpoint loaded at EP=2
    by_name["tp2_sp_allgather"]["dist_ckpt"] = str(dist_ckpt)  # ... and at TP=2
    result = {}
    for world, world_runs in runs.items():
        inp, out = tmp / f"in{world}.pt", tmp / f"out{world}.pt"
        torch.save({"runs": world_runs, "tokens": tokens}, inp)
        run_torchrun(world, "moe_dist_worker.py", inp, out, timeout=DIST_TIMEOUT_S)
        result.update(torch.load(out, weights_only=True))
    return result, tokens, samples, tmp


@pytest.fixture(scope="module")
def references(parallel, models, dist_run):  # noqa: F811
    """Single-rank (loss, HF-named grads, MoE metrics, micro-batch lengths) per (family, aux)."""
    from megatron.core import parallel_state as ps

    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.moe_layers import moe_step_metrics
    from slime.backends.megatron_utils.optimizer import OptimizerArgs

    samples = dist_run[2]
    out = {}
    for family, aux, z in sorted({(f, a, layout.get("z", 0.0)) for f, layout, _, a, _ in RUNS.values()}):
        batching = BatchingArgs(
            use_dynamic_batch_size=True, max_tokens_per_gpu=MAX_TOKENS, calculate_per_token_loss=True
        )
        actor = MegatronActor(
            _model(models[family], "alltoall", aux, z or None),
            ModelBuildArgs(),
            batching,
            OptimizerArgs(lr=1e-3),
            TrainArgs(global_batch_size=len(samples), total_steps=1),
        )
        actor.load_hf(str(models[family]))
        mbs = actor._micro_batches(samples, batching)[0]
        loss, grads = actor.gradients(samples)
        metrics = moe_step_metrics(actor.model.module, len(mbs))
        forward_only = (actor.evaluate(samples), actor.compute_log_probs(samples)["log_probs"])
        step = actor.train_step(samples)
        out[family, aux, z] = (
            loss,
            actor.gather_hf(grads),
            metrics,
            [mb.tokens.shape[-1] for mb in mbs],
            step,
            forward_only,
        )
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)  # the module's world-1 state, as the fixture left it
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_layout_matches_a_single_rank(dist_run, references, name):
    """Loss, every expert's and dense gradient, aux loss and router statistics of one step, the
    eval loss and per-token log-probs (forward only), then
    an optimizer step's loss and grad norm (and, for RESUMED, a training-state round trip)."""
    family, layout, _, aux, how = RUNS[name]
    entry = dist_run[0][name]
    loss, grads, metrics, lengths, step, (eval_loss, log_probs) = references[family, aux, layout.get("z", 0.0)]
    samples = dist_run[2]
    if how == "pairs":  # the single rank packs the same micro-batches as the two EP ranks
        assert lengths == [sum(len(s["tokens"]) for s in p) for p in _split(samples, how)]
    assert entry["loss"] == pytest.approx(loss, rel=1e-6)
    assert set(entry["grads"]) == set(grads)
    for k, g in grads.items():
        torch.testing.assert_close(entry["grads"][k], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-9, msg=k)
    assert {"moe/expert_load_max", "moe/experts_unused"} <= set(entry["moe"])
    for k in set(metrics) | set(entry["moe"]):  # megatron's tracker keeps a cleared aux entry at 0
        assert entry["moe"].get(k, 0.0) == pytest.approx(metrics.get(k, 0.0), rel=1e-5), k
    if aux:
        assert entry["moe"]["moe/load_balancing_loss"] > 0
    assert entry["eval"] == pytest.approx(eval_loss, rel=1e-6)
    assert len(entry["log_probs"]) == len(log_probs)
    for ours, ref in zip(entry["log_probs"], log_probs):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # An optimizer step: the same loss and a grad norm over dense and expert-parallel params.
    assert entry["step"]["update_successful"]
    assert entry["step"]["loss"] == pytest.approx(step["loss"], rel=1e-6)
    assert entry["step"]["grad_norm"] == pytest.approx(step["grad_norm"], rel=1e-5)
    if name in RESUMED:
        assert entry["resume_exact"]  # save_training_state / load_training_state at this layout
    if how == "one_three":  # rank 0 ran a padding-only micro-batch to match rank 1's two
        assert entry["micro_batches"] == 2


@pytest.mark.parametrize("name", list(RUNS))
def test_layout_gives_hf_logits_and_exports_bit_exact(models, dist_run, name):
    """The sharded weights (TP, expert and ETP slices) give HF's logits and come back
    bit-exactly through export, the weight-sync stream and a TP=1 torch_dist checkpoint
    loaded at TP=2 / EP=2."""
    from transformers import AutoModelForCausalLM

    family = RUNS[name][0]
    result, tokens = dist_run[0], dist_run[1]
    entry, hf = result[name], hf_state(models[family])
    ref = AutoModelForCausalLM.from_pretrained(str(models[family]), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(entry["logits"], ref(torch.tensor([tokens])).logits[0], rtol=1e-5, atol=1e-5)
    exports = [entry["hf"], dict(entry["buckets"])] + ([entry["hf_from_dist"]] if "hf_from_dist" in entry else [])
    assert len(entry["buckets"]) == len(hf)
    for exported in exports:
        assert set(exported) == set(hf)
        for k, v in exported.items():
            assert torch.equal(v, hf[k]), k
    assert ("hf_from_dist" in entry) == (name in ("ep2_allgather", "tp2_sp_allgather"))


@pytest.mark.usefixtures("parallel")
def test_ep2_checkpoint_loads_at_ep1(checkpoints, dist_run):  # noqa: F811
    """megatron's sharded state dict stores experts under global offsets: an EP=2 save loads
    on one rank holding all experts."""
    from slime.backends.megatron_utils.checkpoint import load_model_weights
    from slime.backends.megatron_utils.hf_weights import mcore_to_hf

    m = resolve("--hf-checkpoint", checkpoints["qwen3_moe"])
    model = build(m)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_model_weights(model, str(dist_run[3] / "ep2_ckpt"))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    back, hf = mcore_to_hf([state], m), hf_state(checkpoints["qwen3_moe"])
    assert set(back) == set(hf)
    for k, v in back.items():
        assert torch.equal(v, hf[k]), k


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("tp,ep,etp", [(1, 2, 1), (2, 2, 2), (2, 2, 1), (2, 4, 1)])
def test_conversion_round_trip_at_ep_etp_tp(checkpoints, family, tp, ep, etp):  # noqa: F811
    """HF -> every (TP, EP, ETP) rank's shard -> gathered (`merge_expert_shards`) -> HF, bit-exact;
    each rank converts only its own experts (global index = ep_rank * local + i)."""
    from slime.backends.megatron_utils.expert_parallel import ExpertPlacement, is_expert_param, merge_expert_shards
    from slime.backends.megatron_utils.hf_weights import hf_to_mcore, mcore_to_hf

    m, hf = resolve("--hf-checkpoint", checkpoints[family]), hf_state(checkpoints[family])
    dense = [{k: v for k, v in hf_to_mcore(hf, m, t, tp).items() if not is_expert_param(k)} for t in range(tp)]
    pieces = []
    for e in range(ep):
        for s in range(etp):
            shard = hf_to_mcore(hf, m, s % tp, tp, ExpertPlacement(ep_rank=e, ep_size=ep, etp_rank=s, etp_size=etp))
            experts = {k: v for k, v in shard.items() if is_expert_param(k)}
            assert len({k.split(".local_experts.")[1].split(".")[0] for k in experts}) == m.num_experts // ep
            pieces.append((e, s, experts))
    back = mcore_to_hf(merge_expert_shards(dense, pieces), m)
    assert set(back) == set(hf) - ({"lm_head.weight"} if not m.untie_embeddings_and_output_weights else set())
    for k, v in back.items():
        assert torch.equal(v, hf[k]), k


def test_expert_layouts_refused_at_start_up(checkpoints):  # noqa: F811
    from slime.backends.megatron_utils.expert_parallel import check_expert_layout, check_world
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs

    m = resolve("--hf-checkpoint", checkpoints["qwen3_moe"])  # 8 experts, expert FFN 32
    bad = [
        (
            ModelBuildArgs(expert_model_parallel_size=3),
            "--num-experts 8 is not divisible by --expert-model-parallel-size 3",
        ),
        (ModelBuildArgs(tensor_model_parallel_size=2), "--sequence-parallel"),
        (
            ModelBuildArgs(tensor_model_parallel_size=2, sequence_parallel=True, expert_tensor_parallel_size=1),
            "needs --expert-model-parallel-size > 1",
        ),
        (
            ModelBuildArgs(tensor_model_parallel_size=2, sequence_parallel=True, expert_tensor_parallel_size=4),
            "must divide --tensor-model-parallel-size 2",
        ),
        (
            ModelBuildArgs(expert_model_parallel_size=2, context_parallel_size=2),
            "allgather with --expert-model-parallel-size 2 and --context-parallel-size 2",
        ),
    ]
    for build_args, match in bad:
        with pytest.raises(ValueError, match=match):
            check_expert_layout(m, build_args)
    dense = types.SimpleNamespace(is_moe=False)  # only is_moe is read for a dense model
    with pytest.raises(ValueError, match="needs a MoE model"):
        check_expert_layout(dense, ModelBuildArgs(expert_model_parallel_size=2))
    check_expert_layout(dataclasses.replace(m, moe_token_dispatcher_type="alltoall"),
                        ModelBuildArgs(expert_model_parallel_size=2, context_parallel_size=2))  # the cp2_ep2 run  # fmt: skip
    check_expert_layout(dense, ModelBuildArgs(expert_tensor_parallel_size=1))  # slime's dense scripts pass it
    with pytest.raises(ValueError, match="not divisible by --expert-model-parallel-size"):
        check_world(6, ep=4, etp=None, tp=1, pp=1)


def test_moe_pipeline_layouts_refused_at_start_up(checkpoints):  # noqa: F811
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.pipeline import check_pipeline_layout

    qwen3 = resolve("--hf-checkpoint", checkpoints["qwen3_moe"], "--moe-token-dispatcher-type", "alltoall")
    check_pipeline_layout(qwen3, ModelBuildArgs(pipeline_model_parallel_size=2))  # the pp2 run above
    with pytest.raises(ValueError, match="--moe-token-dispatcher-type allgather with --pipeline-model-parallel-size 2"):
        check_pipeline_layout(dataclasses.replace(qwen3, moe_token_dispatcher_type="allgather"),
                              ModelBuildArgs(pipeline_model_parallel_size=2))  # fmt: skip
    # Qwen2-MoE's first layer is dense: a first stage of one layer would hold no MoE layer.
    qwen2 = resolve("--hf-checkpoint", checkpoints["qwen2_moe"], "--moe-token-dispatcher-type", "alltoall")
    assert qwen2.moe_pattern()[0] == 0
    with pytest.raises(ValueError, match="pipeline stage 0 .layers 0-0. has no MoE layer"):
        check_pipeline_layout(qwen2, ModelBuildArgs(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1))
    check_pipeline_layout(qwen2, ModelBuildArgs(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=2))
    # Virtual stages: a rank's layers are its chunks' (PP=2 x V=2: rank 0 holds layers 0 and 2).
    vpp = ModelBuildArgs(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    check_pipeline_layout(dataclasses.replace(qwen2, num_layers=4, moe_layer_freq=[0, 1, 1, 1]), vpp)  # the tp2_vpp run
    with pytest.raises(ValueError, match=r"pipeline stage 0 \(layers 0-0, 2-2\) has no MoE layer"):
        check_pipeline_layout(dataclasses.replace(qwen2, num_layers=4, moe_layer_freq=[0, 1, 0, 1]), vpp)


@pytest.mark.parametrize(
    "pp,vpp,first,last", [(2, 2, None, None), (2, 3, None, None), (4, 2, None, None), (2, 2, 2, None), (3, 2, 4, 2)]
)
def test_rank_layers_follow_megatron_offsets(pp, vpp, first, last):
    """The start-up check's layers per pipeline rank are where megatron-core puts them."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from slime.backends.megatron_utils.pipeline import _rank_layers

    even_layers = 2 * vpp
    stages = pp - (first is not None) - (last is not None)
    num_layers = (first or 0) + (last or 0) + stages * even_layers
    sizes = [first or even_layers] + [even_layers] * (pp - 2) + [last or even_layers]
    config = TransformerConfig(
        num_layers=num_layers, hidden_size=8, num_attention_heads=2, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last, pipeline_dtype=torch.float32,
    )  # fmt: skip
    for rank, layers in enumerate(_rank_layers(sizes, vpp)):
        per_chunk = sizes[rank] // vpp
        expected = [get_transformer_layer_offset(config, v, rank) + i for v in range(vpp) for i in range(per_chunk)]
        assert layers == expected, (rank, layers, expected)


def test_micro_batch_alignment_helpers():
    """`make_micro_batches(num_micro_batches=)` splits greedy groups, then adds padding-only
    micro-batches; `pad_micro_batch` adds one padding segment of weight 0 (the MoE padding mask)."""
    from megatron_helpers import synthetic_samples

    from slime.backends.megatron_utils.batching import BatchingArgs, make_micro_batches, pad_micro_batch

    samples = synthetic_samples(4, 300, seed=5)
    sup = sum(sum(s["loss_mask"]) for s in samples)
    args = BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=MAX_TOKENS, calculate_per_token_loss=True)
    assert [mb.num_samples for mb in make_micro_batches(samples, args, sup, 4)] == [2, 2]
    split = make_micro_batches(samples, args, sup, 4, num_micro_batches=6)
    assert [mb.num_samples for mb in split] == [1, 1, 1, 1, 0, 0]
    assert all(mb.real_tokens == 0 and float(mb.weights.sum()) == 0 and mb.padding_mask.all() for mb in split[4:])
    total = sum(float(mb.weights.sum()) for mb in split)
    assert total == pytest.approx(sum(float(mb.weights.sum()) for mb in make_micro_batches(samples, args, sup, 4)))
    assert make_micro_batches([], args, sup, 4, num_micro_batches=2)[1].num_samples == 0  # a rank with no samples

    mb = split[0]
    n = mb.tokens.shape[-1]
    assert mb.padding_mask is None and pad_micro_batch(mb, n) is mb
    padded = pad_micro_batch(mb, n + 5)
    assert padded.tokens.shape == (1, n + 5) and padded.real_tokens == mb.real_tokens
    assert padded.cu_seqlens.tolist() == mb.cu_seqlens.tolist() + [n + 5]  # a segment of its own
    assert padded.position_ids[0, n:].tolist() == list(range(5))
    assert padded.padding_mask[0].tolist() == [False] * n + [True] * 5
    assert torch.equal(padded.weights[0, :n], mb.weights[0]) and float(padded.weights[0, n:].abs().sum()) == 0
    assert padded.response_positions(0) == mb.response_positions(0)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_micro_batch(mb, n - 1)
    with pytest.raises(ValueError, match="--qkv-format thd"):
        make_micro_batches(samples, BatchingArgs(qkv_format="sbhd", micro_batch_size=4), sup, 4, num_micro_batches=2)
