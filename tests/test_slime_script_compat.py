"""slime's own SFT launch script runs here unchanged in its flags.

SLIME_SFT_FLAGS is the training command line of THUDM/slime's
`scripts/run-qwen3-4B-base-sft.sh` (its CKPT/SFT/PERF/OPTIMIZER/MISC groups and actor
placement, in its order), with MODEL_ARGS from our `scripts/models/qwen3-4B.sh`.
"""

from __future__ import annotations

import pytest

from test_model_scripts import script_args

SLIME_SFT_FLAGS = [
    # CKPT_ARGS
    "--hf-checkpoint", "/root/Qwen3-4B-Base/", "--ref-load", "/root/Qwen3-4B-Base_torch_dist",
    "--load", "/root/Qwen3-4B-Base_slime/", "--save", "/root/Qwen3-4B-Base_slime/", "--save-interval", "1000",
    # SFT_ARGS
    "--rollout-function-path", "slime.rollout.sft_rollout.generate_rollout", "--prompt-data", "/root/openhermes2_5.parquet",
    "--input-key", "messages", "--rollout-shuffle", "--num-epoch", "3", "--rollout-batch-size", "128",
    "--global-batch-size", "128", "--loss-type", "sft_loss", "--calculate-per-token-loss",
    "--disable-compute-advantages-and-returns", "--debug-train-only",
    # PERF_ARGS
    "--tensor-model-parallel-size", "1", "--sequence-parallel", "--pipeline-model-parallel-size", "1",
    "--context-parallel-size", "1", "--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "1",
    "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
    "--use-dynamic-batch-size", "--max-tokens-per-gpu", "9216",
    # OPTIMIZER_ARGS
    "--optimizer", "adam", "--lr", "1e-5", "--lr-decay-style", "cosine", "--min-lr", "1e-6",
    "--lr-warmup-fraction", "0.1", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
    # MISC_ARGS
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--accumulate-allreduce-grads-in-fp32",
    "--attention-softmax-in-fp32", "--attention-backend", "flash",
    # placement (given on the ray job submit line)
    "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "8",
]


def _parse(extra=()):
    from slime.utils.arguments import get_parser

    return get_parser().parse_args(script_args("qwen3-4B") + SLIME_SFT_FLAGS + list(extra))


def test_slime_sft_script_flags_parse_and_configure_the_actor():
    from slime.backends.megatron_utils.arguments import actor_config_from_args, check_parallel_sizes

    args = _parse()
    check_parallel_sizes(args)  # all sizes 1: accepted
    assert args.attention_backend == "flash" and args.accumulate_allreduce_grads_in_fp32 and args.attention_softmax_in_fp32
    cfg = actor_config_from_args(args, total_steps=10)
    assert cfg.build.grad_reduce_in_fp32 and cfg.build.attention_softmax_in_fp32
    assert cfg.build.attention_backend == "sdpa"  # this CPU machine: the only CPU training path
    assert cfg.model.num_layers == 36 and cfg.train.global_batch_size == 128


@pytest.mark.parametrize(
    "flag", ["--pipeline-model-parallel-size", "--context-parallel-size", "--expert-model-parallel-size", "--expert-tensor-parallel-size"]
)
def test_parallel_sizes_above_one_fail_at_start_up(flag):
    from slime.utils.arguments import validate_trainer_args

    args = _parse([flag, "2"])
    with pytest.raises(ValueError, match=f"{flag} 2: .* not implemented yet"):
        validate_trainer_args(args)  # before any file is opened or Ray started


def test_attention_backend_choice_per_device(monkeypatch):
    from slime.backends.megatron_utils import arguments as margs

    assert margs.resolve_attention_backend("flash", cuda=False)[0] == "sdpa"
    assert margs.resolve_attention_backend("fused", cuda=False)[0] == "sdpa"
    assert margs.resolve_attention_backend("unfused", cuda=True)[0] == "sdpa"
    assert margs.resolve_attention_backend("flex", cuda=False)[0] == "flex"  # explicit choices are kept
    monkeypatch.setattr(margs, "_varlen_available", lambda: True)
    assert margs.resolve_attention_backend("flash", cuda=True)[0] == "varlen"
    monkeypatch.setattr(margs, "_varlen_available", lambda: False)
    backend, why = margs.resolve_attention_backend("flash", cuda=True)
    assert backend == "flex" and "no varlen" in why


def test_grads_in_fp32_follow_megatron_lm():
    """Megatron-LM accumulates/all-reduces in fp32 with the flag, and always under bf16."""
    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.utils.arguments import get_parser

    base = script_args("qwen3-4B") + ["--hf-checkpoint", "/nonexistent", "--prompt-data", "x", "--rollout-batch-size", "8"]
    parse = get_parser().parse_args
    assert not actor_config_from_args(parse(base), 1).build.grad_reduce_in_fp32
    assert actor_config_from_args(parse(base + ["--accumulate-allreduce-grads-in-fp32"]), 1).build.grad_reduce_in_fp32
    assert actor_config_from_args(parse(base + ["--bf16"]), 1).build.grad_reduce_in_fp32


def test_attention_softmax_in_fp32_under_bf16():
    """With the flag, sdpa's scores and softmax run in fp32: the bf16 output equals the fp32
    computation rounded once; without it, it equals plain bf16 attention."""
    import torch
    import torch.nn.functional as F
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from slime.backends.megatron_utils.attention import PackedCoreAttention

    torch.manual_seed(0)
    t, h, d = 24, 4, 16
    q, k, v = (torch.randn(t, h, d).to(torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 24], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=t, max_seqlen_kv=t)

    def run(flag):
        config = TransformerConfig(num_layers=1, hidden_size=h * d, num_attention_heads=h, attention_softmax_in_fp32=flag)
        attn = PackedCoreAttention(config, 1, AttnMaskType.causal, "self", backend="sdpa").eval()
        return attn(q, k, v, None, packed_seq_params=params)

    def reference(dtype):
        qi, ki, vi = (x.to(dtype).transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=d**-0.5)
        return out.squeeze(0).transpose(0, 1).reshape(t, -1).to(torch.bfloat16)

    with_flag, without = run(True), run(False)
    assert with_flag.dtype == torch.bfloat16 and without.dtype == torch.bfloat16
    assert torch.equal(with_flag, reference(torch.float32))
    assert torch.equal(without, reference(torch.bfloat16))
    assert not torch.equal(with_flag, without)
