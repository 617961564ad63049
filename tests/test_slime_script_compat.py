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
    # slime's TP-1 script passes --sequence-parallel: off at TP 1 as in Megatron-LM, since
    # megatron-core's own config refuses it there.
    from slime.backends.megatron_utils.model_provider import transformer_config

    assert args.sequence_parallel and not cfg.build.sequence_parallel
    assert transformer_config(cfg.model, cfg.build).sequence_parallel is False


@pytest.mark.parametrize("flag", ["--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank"])
def test_virtual_pipeline_flags_need_pipeline_parallelism(flag):
    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.utils.arguments import validate_trainer_args

    with pytest.raises(ValueError, match=f"{flag} 2: virtual pipeline stages need --pipeline-model-parallel-size > 1"):
        validate_trainer_args(_parse([flag, "2"]))  # before any file is opened or Ray started
    # Qwen3-4B's 36 layers at PP=2: 18 per rank, in 2 chunks either way (9 layers each)
    cfg = actor_config_from_args(_parse(["--pipeline-model-parallel-size", "2", flag, "9" if "layers" in flag else "2"]), 10)
    assert cfg.build.virtual_pipeline_model_parallel_size == 2
    with pytest.raises(ValueError, match="does not split into --pipeline-model-parallel-size 2 x 4 virtual stages"):
        actor_config_from_args(_parse(["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "4"]), 10)


def test_expert_parallel_flags_checked_at_start_up():
    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.utils.arguments import validate_trainer_args

    with pytest.raises(ValueError, match="8 ranks are not divisible by --expert-model-parallel-size x"):
        validate_trainer_args(_parse(["--expert-model-parallel-size", "3"]))  # 8 ranks
    with pytest.raises(ValueError, match="--expert-model-parallel-size 2 needs a MoE model"):
        actor_config_from_args(_parse(["--expert-model-parallel-size", "2"]), total_steps=10)  # Qwen3-4B is dense


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


def test_transformer_impl_is_accepted_and_said_at_start_up():
    """slime's scripts may pass Megatron-LM's --transformer-impl; both values parse, and
    transformer_engine says in the start-up note that the local spec is built."""
    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.utils.arguments import get_parser

    base = script_args("qwen3-4B") + ["--hf-checkpoint", "/nonexistent", "--prompt-data", "x", "--rollout-batch-size", "8"]
    parse = get_parser().parse_args
    assert "transformer" not in actor_config_from_args(parse(base + ["--transformer-impl", "local"]), 1).attention_note
    note = actor_config_from_args(parse(base + ["--transformer-impl", "transformer_engine"]), 1).attention_note
    assert "--transformer-impl transformer_engine: megatron-core's local layer spec is built" in note
    with pytest.raises(SystemExit):
        parse(base + ["--transformer-impl", "te"])


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


# THUDM/slime's scripts/run-qwen3-4B.sh (GRPO on dapo-math, deepscaler reward, eval on AIME, colocated
# SGLang), its ROLLOUT/EVAL/PERF/GRPO/OPTIMIZER/SGLANG/MISC groups and placement, in its order.
SLIME_GRPO_FLAGS = [
    "--hf-checkpoint", "/root/Qwen3-4B", "--ref-load", "/root/Qwen3-4B_torch_dist", "--load", "/root/Qwen3-4B_slime/",
    "--save", "/root/Qwen3-4B_slime/", "--save-interval", "20",
    "--prompt-data", "/root/dapo-math-17k/dapo-math-17k.jsonl", "--input-key", "prompt", "--label-key", "label",
    "--apply-chat-template", "--rollout-shuffle", "--rm-type", "deepscaler", "--num-rollout", "3000",
    "--rollout-batch-size", "32", "--n-samples-per-prompt", "8", "--rollout-max-response-len", "8192",
    "--rollout-temperature", "0.8", "--global-batch-size", "256", "--balance-data",
    "--eval-interval", "20", "--eval-prompt-data", "aime", "/root/aime-2024/aime-2024.jsonl",
    "--n-samples-per-eval-prompt", "16", "--eval-max-response-len", "16384", "--eval-top-p", "0.7",
    "--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "1",
    "--context-parallel-size", "1", "--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "1",
    "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
    "--use-dynamic-batch-size", "--max-tokens-per-gpu", "9216",
    "--advantage-estimator", "grpo", "--use-kl-loss", "--kl-loss-coef", "0.00", "--kl-loss-type", "low_var_kl",
    "--entropy-coef", "0.00", "--eps-clip", "0.2", "--eps-clip-high", "0.28",
    "--optimizer", "adam", "--lr", "1e-6", "--lr-decay-style", "constant", "--weight-decay", "0.1",
    "--adam-beta1", "0.9", "--adam-beta2", "0.98",
    "--rollout-num-gpus-per-engine", "2", "--sglang-mem-fraction-static", "0.7",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--accumulate-allreduce-grads-in-fp32",
    "--attention-softmax-in-fp32", "--attention-backend", "flash",
    "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "8", "--colocate",
]


def test_slime_grpo_script_flags_parse_and_pass_every_config_check():
    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.utils.arguments import parse_args, validate_trainer_args

    args = parse_args(script_args("qwen3-4B") + SLIME_GRPO_FLAGS)
    assert args.sglang_server_args == {"mem_fraction_static": "0.7"}
    cfg = actor_config_from_args(args, total_steps=3000)
    assert cfg.train.loss_type == "policy_loss" and cfg.train.global_batch_size == 256
    assert cfg.algorithm.eps_clip_high == 0.28 and cfg.algorithm.kl_loss_type == "low_var_kl"
    # Every flag combination check passes; what stops it here is the data this machine lacks.
    with pytest.raises(FileNotFoundError, match="--prompt-data"):
        validate_trainer_args(args)


def test_sglang_flags_pass_through_without_sglang():
    from slime.ray.sglang_flags import split_sglang_flags

    flags, rest = split_sglang_flags(
        ["--sglang-mem-fraction-static", "0.7", "--sglang-enable-dp-attention", "--sglang-cuda-graph-bs", "1", "2", "4",
         "--sglang-log-level=warning", "--unknown", "x"]
    )
    assert flags == {"mem_fraction_static": "0.7", "enable_dp_attention": True, "cuda_graph_bs": ["1", "2", "4"], "log_level": "warning"}
    assert rest == ["--unknown", "x"]


def test_unknown_non_sglang_flag_is_still_an_error(capsys):
    from slime.utils.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--hf-checkpoint", "x", "--prompt-data", "y", "--no-such-flag"])
    assert "--no-such-flag" in capsys.readouterr().err


def test_sglang_flags_follow_sglangs_own_parser_when_installed(monkeypatch):
    """With SGLang importable, --sglang-* flags come from ServerArgs.add_cli_args: typed, checked."""
    import importlib.machinery
    import sys
    import types

    server_args = types.ModuleType("sglang.srt.server_args")

    class ServerArgs:
        @staticmethod
        def add_cli_args(parser):
            parser.add_argument("--mem-fraction-static", type=float, default=None)
            parser.add_argument("--enable-dp-attention", action="store_true")
            parser.add_argument("--router-ip", default=None)  # clashes with ours: ours wins

    server_args.ServerArgs = ServerArgs
    for name in ("sglang", "sglang.srt"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "sglang.srt.server_args", server_args)
    from slime.utils.arguments import parse_args

    base = ["--hf-checkpoint", "x", "--prompt-data", "y"]
    args = parse_args(base + ["--sglang-mem-fraction-static", "0.7", "--sglang-enable-dp-attention", "--sglang-router-ip", "10.0.0.1"])
    assert args.sglang_server_args == {"mem_fraction_static": 0.7, "enable_dp_attention": True}
    assert args.sglang_router_ip == "10.0.0.1"
    with pytest.raises(SystemExit):
        parse_args(base + ["--sglang-mem-fraction-statik", "0.7"])  # a typo is caught by SGLang's names
