"""Invariant 4 (HF parity, bit-exact round trip) and invariant 2 (packing isolation), in one
process with a world-1 gloo group; model flags checked against HF configs."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_helpers import FAMILIES, assert_packed_matches_hf, make_hf_checkpoint


@pytest.fixture(scope="module")
def parallel():
    from slime.backends.megatron_utils.cpu_compat import disable_cpu_mode
    from slime.backends.megatron_utils.parallel import destroy_parallel, init_parallel

    yield init_parallel(seed=1234)
    destroy_parallel()
    disable_cpu_mode()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_hf_checkpoint(f, root / f) for f in FAMILIES}


def model_args(hf_dir, *flags):
    from slime.backends.megatron_utils.model_config import add_model_arguments, resolve_model_args

    p = argparse.ArgumentParser()
    p.add_argument("--hf-checkpoint")
    add_model_arguments(p)
    return resolve_model_args(p.parse_args(["--hf-checkpoint", str(hf_dir), *flags]))


def build(m, backend="sdpa"):
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs, build_gpt_model

    return build_gpt_model(m, ModelBuildArgs(attention_backend=backend)).eval()


def loaded(hf_dir, backend="sdpa"):
    from slime.backends.megatron_utils.hf_weights import hf_to_mcore, load_hf_state_dict

    m = model_args(hf_dir)
    model = build(m, backend)
    missing, unexpected = model.load_state_dict(hf_to_mcore(load_hf_state_dict(str(hf_dir)), m), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    return m, model


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(parallel, checkpoints, family):
    from transformers import AutoModelForCausalLM

    hf_dir = checkpoints[family]
    m, model = loaded(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.vocab_size, (2, 33), generator=g)
    with torch.no_grad():
        ours = model(ids, torch.arange(33).expand(2, 33), attention_mask=None)[..., : m.vocab_size]
        theirs = ref(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        # Packed: three samples in one row, positions restarting, equal to separate HF calls.
        assert_packed_matches_hf(model, ids, ref, m.vocab_size)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_round_trip_bit_exact(parallel, checkpoints, family, tp):
    from slime.backends.megatron_utils.hf_weights import hf_to_mcore, load_hf_state_dict, mcore_to_hf

    hf_dir = checkpoints[family]
    m = model_args(hf_dir)
    hf = load_hf_state_dict(str(hf_dir))
    shards = [hf_to_mcore(hf, m, r, tp) for r in range(tp)]
    if tp == 1:  # the names and shapes are exactly the model's
        own = {k: v.shape for k, v in build(m).state_dict().items() if not k.endswith("_extra_state")}
        assert {k: v.shape for k, v in shards[0].items()} == own
    back = mcore_to_hf(shards, m)
    assert set(back) <= set(hf)
    for k, v in back.items():
        assert torch.equal(v, hf[k]), k


def test_packed_attention_backends_isolate_samples():
    from slime.backends.megatron_utils.attention import packed_attention

    g = torch.Generator().manual_seed(0)
    lens = [3, 9, 6]
    t, hq, hkv, d = sum(lens), 4, 2, 8
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, 3, 12, 18], dtype=torch.int32)
    # Independent reference: one dense attention with an explicit block-diagonal causal mask.
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) / d**0.5
    ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vv)
    for backend in ("sdpa", "flex"):
        out = packed_attention(q, k, v, cu, backend, scale=d**-0.5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # Changing the other samples' keys/values leaves sample 1 unchanged.
        k2, v2 = k.clone(), v.clone()
        k2[:3] += 5
        v2[12:] -= 3
        out2 = packed_attention(q, k2, v2, cu, backend, scale=d**-0.5)
        torch.testing.assert_close(out2[3:12], out[3:12], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs CUDA"):
        packed_attention(q, k, v, cu, "varlen")


def test_flex_model_matches_sdpa_model(parallel, checkpoints):
    from megatron.core.packed_seq_params import PackedSeqParams

    _, a = loaded(checkpoints["qwen3"], "sdpa")
    m, b = loaded(checkpoints["qwen3"], "flex")
    ids = torch.randint(0, m.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None]
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12)
    with torch.no_grad():
        torch.testing.assert_close(
            a(ids, pos, attention_mask=None, packed_seq_params=psp),
            b(ids, pos, attention_mask=None, packed_seq_params=psp),
            rtol=1e-5,
            atol=1e-5,
        )


def test_flags_derived_from_hf_and_conflicts_named(checkpoints):
    from slime.backends.megatron_utils.model_config import ModelConfigError

    q3 = model_args(checkpoints["qwen3"])
    assert (q3.kv_channels, q3.qk_layernorm, q3.add_qkv_bias, q3.untie_embeddings_and_output_weights) == (24, True, False, False)
    q2 = model_args(checkpoints["qwen2"])
    assert (q2.kv_channels, q2.qk_layernorm, q2.add_qkv_bias, q2.untie_embeddings_and_output_weights) == (16, False, True, True)
    ll = model_args(checkpoints["llama"])
    assert ll.use_rope_scaling and ll.rope_scaling_factor == 8.0 and ll.rotary_base == 500000.0
    # Agreeing flags are fine; a disagreeing one names the flag and both values.
    assert model_args(checkpoints["qwen3"], "--num-layers", "2", "--rotary-base", "1000000") == q3
    with pytest.raises(ModelConfigError, match=r"--rotary-base is 10000\.0 but .*config\.json implies 1000000\.0"):
        model_args(checkpoints["qwen3"], "--rotary-base", "10000")
    with pytest.raises(ModelConfigError, match="--qk-layernorm is True"):
        model_args(checkpoints["qwen2"], "--qk-layernorm")
    with pytest.raises(ModelConfigError, match="--num-query-groups"):
        model_args(checkpoints["llama"], "--num-query-groups", "4")


def test_flags_without_hf_config():
    from slime.backends.megatron_utils.model_config import ModelConfigError, add_model_arguments, resolve_model_args

    p = argparse.ArgumentParser()
    p.add_argument("--hf-checkpoint")
    add_model_arguments(p)
    with pytest.raises(ModelConfigError, match="--num-layers"):
        resolve_model_args(p.parse_args([]))
    m = resolve_model_args(
        p.parse_args("--num-layers 2 --hidden-size 64 --ffn-hidden-size 96 --num-attention-heads 4 --vocab-size 300 --swiglu --disable-bias-linear".split())
    )
    assert (m.kv_channels, m.num_query_groups, m.swiglu, m.add_bias_linear, m.qk_layernorm) == (16, 4, True, False, False)
    assert m.padded_vocab_size(1) == 384 and m.padded_vocab_size(2) == 512
