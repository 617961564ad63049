"""Tiny HF checkpoints of each supported family, written on demand (random init)."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

FAMILIES = ("qwen3", "qwen2", "llama", "glm4")


def make_hf_checkpoint(family: str, out: Path, seed: int = 0, num_layers: int = 2) -> Path:
    from transformers import (
        Glm4Config,
        Glm4ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    if family == "qwen3":
        cfg, cls = Qwen3Config(**common, head_dim=24, rope_theta=1e6, tie_word_embeddings=True), Qwen3ForCausalLM
    elif family == "qwen2":
        cfg, cls = Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=False), Qwen2ForCausalLM
    elif family == "llama":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
        cfg = LlamaConfig(**common, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=False)
        cls = LlamaForCausalLM
    elif family == "glm4":
        # GLM-Z1-9B-0414 scaled down: hidden = heads x head_dim, 16 query heads per KV group
        # there (here 2), FFN ~3.3x hidden, half of each head rotated, QKV bias, untied output.
        glm = dict(common, intermediate_size=208, rms_norm_eps=1e-5)
        cfg = Glm4Config(
            **glm, head_dim=16, partial_rotary_factor=0.5, rope_theta=10000.0, attention_bias=True,
            tie_word_embeddings=False,
            pad_token_id=None, eos_token_id=None,  # the 151k-vocab ids do not exist in 300 tokens
        )
        cls = Glm4ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    with torch.no_grad():  # non-trivial norms so a swapped norm weight cannot go unnoticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return out


# ------------------------------------------------------------------ RL (policy_loss) helpers
def build_actor(
    hf_dir: Path,
    batching,
    global_batch_size: int,
    loss_type: str = "sft_loss",
    algorithm=None,
    tp: int = 1,
    optim=None,
    cp: int = 1,
    cross_entropy=None,
):
    """A MegatronActor on the HF checkpoint's weights (process group set up by the actor)."""
    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs

    actor = MegatronActor(
        ModelArgs(**hf_model_args(str(hf_dir))),
        ModelBuildArgs(tensor_model_parallel_size=tp, context_parallel_size=cp),
        batching,
        optim or OptimizerArgs(lr=3e-3, weight_decay=0.0),
        TrainArgs(global_batch_size=global_batch_size, total_steps=10, loss_type=loss_type),
        algorithm,
        cross_entropy,
    )
    actor.load_hf(str(hf_dir))
    return actor


def synthetic_samples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Train dicts of random tokens with unequal lengths, prompts and holes in the loss mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(24, 96, (1,), generator=g))
        resp = int(torch.randint(6, length - 4, (1,), generator=g))
        mask = (torch.rand(resp, generator=g) > 0.2).long()
        mask[0] = 1  # every sample supervises something
        tokens = torch.randint(0, vocab, (length,), generator=g).tolist()
        out.append({"tokens": tokens, "loss_mask": mask.tolist(), "response_length": resp})
    return out


def hf_response_log_probs(hf_dir: Path, samples: list[dict], requires_grad: bool = False):
    """(model, per-sample response log-probs, per-sample response entropies) from transformers in float64."""
    from transformers import AutoModelForCausalLM

    from slime.algorithms.policy import entropy_from_logits

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float64)
    log_probs, entropies = [], []
    with torch.set_grad_enabled(requires_grad):
        for s in samples:
            ids = torch.tensor(s["tokens"])[None]
            logits = model(ids).logits[0, :-1]
            resp = slice(len(s["tokens"]) - s["response_length"] - 1, None)
            lp = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            log_probs.append(lp[resp])
            entropies.append(entropy_from_logits(logits)[resp])
    return model, log_probs, entropies


def attach_rl_fields(samples: list[dict], log_probs: list[torch.Tensor], seed: int = 0) -> None:
    """Old / reference / engine log-probs near the true ones (ratios spread over both clip sides)
    and +-1-ish advantages, as float32 tensors of response_length values."""
    g = torch.Generator().manual_seed(seed)
    for s, lp in zip(samples, log_probs):
        lp = lp.detach().float()
        noise = lambda scale: scale * torch.randn(lp.shape, generator=g)  # noqa: E731
        s["log_probs"] = lp + noise(0.4)
        s["ref_log_probs"] = lp + noise(0.3)
        s["rollout_log_probs"] = s["log_probs"] + noise(0.3)
        s["advantages"] = torch.randn(1, generator=g).expand(lp.shape) + noise(0.2)


def hf_policy_reference(hf_dir: Path, samples: list[dict], cfg, per_token: bool):
    """policy_objective applied per sample on transformers' float64 log-probs, normalized by hand:
    (loss, metrics, HF-named gradients)."""
    from slime.algorithms.policy import policy_objective

    model, log_probs, entropies = hf_response_log_probs(hf_dir, samples, requires_grad=True)
    total_sup = sum(sum(s["loss_mask"]) for s in samples)
    loss, metrics = 0, {}
    for s, lp, ent in zip(samples, log_probs, entropies):
        mask = torch.tensor(s["loss_mask"], dtype=torch.float64)
        weights = mask / total_sup if per_token else mask / mask.sum() / len(samples)
        part, m = policy_objective(
            cfg,
            log_probs=lp,
            old_log_probs=s["log_probs"].double(),
            advantages=s["advantages"].double(),
            weights=weights,
            entropy=ent,
            ref_log_probs=s["ref_log_probs"].double(),
            rollout_log_probs=s["rollout_log_probs"].double(),
            segment_ids=torch.zeros(len(lp), dtype=torch.long),
        )
        loss = loss + part
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    if "lm_head.weight" not in grads:  # tied embeddings
        grads["lm_head.weight"] = grads["model.embed_tokens.weight"]
    return float(loss), metrics, grads


def assert_packed_matches_hf(model, ids, ref, vocab_size: int, lens=(5, 17, 11)) -> None:
    """Three samples packed in one THD row (positions restarting per sample) give, per sample,
    the logits of a separate HF call: packing isolates samples (DESIGN invariant 2)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    bounds = [0, *itertools.accumulate(lens)]
    cu = torch.tensor(bounds, dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    packed = model(ids[:1, : bounds[-1]], pos, attention_mask=None, packed_seq_params=psp)[0, :, :vocab_size]
    for s, e in itertools.pairwise(bounds):
        torch.testing.assert_close(packed[s:e], ref(ids[:1, s:e]).logits[0], rtol=1e-5, atol=1e-5)



def local_layer_spec(args, config, vp_stage):
    """A ``--spec`` function as a user writes one: megatron's own local layer spec (its
    DotProductAttention, which the model provider replaces by the packed core attention)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization)
