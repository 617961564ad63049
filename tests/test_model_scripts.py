"""scripts/models/*.sh define MODEL_ARGS that agree with the models' HF config.json, and
alone (without a HF config) describe the whole architecture."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest

from conftest import ROOT, SHARED

BASE = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000}
# Public HF config.json values of each model (architecture keys only).
HF_CONFIGS = {
    "qwen3-0.6B": dict(BASE, model_type="qwen3", num_hidden_layers=28, hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960),
    "qwen3-1.7B": dict(BASE, model_type="qwen3", num_hidden_layers=28, hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960),
    "qwen3-4B": dict(BASE, model_type="qwen3", num_hidden_layers=36, hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960),
    "qwen3-8B": dict(BASE, model_type="qwen3", num_hidden_layers=36, hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=40960),
    "qwen2.5-0.5B": dict(BASE, model_type="qwen2", num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen3-30B-A3B": dict(
        BASE, model_type="qwen3_moe", num_hidden_layers=48, hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=40960,
        attention_bias=False, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[],
    ),
    # GLM-Z1-9B-0414 (GLM-4-9B-0414 has the same architecture keys).
    "glm4-9B": dict(
        model_type="glm4", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, num_hidden_layers=40,
        hidden_size=4096, intermediate_size=13696, num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
        attention_bias=True, vocab_size=151552, tie_word_embeddings=False, max_position_embeddings=32768,
    ),
    "llama3.1-8B": dict(
        model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, num_hidden_layers=32, hidden_size=4096,
        intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, attention_bias=False, mlp_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "llama3.2-3B": dict(
        model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, num_hidden_layers=28, hidden_size=3072,
        intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        tie_word_embeddings=True, max_position_embeddings=131072, attention_bias=False, mlp_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
}


def script_args(name: str) -> list[str]:
    out = subprocess.run(
        ["bash", "-c", f'source "{ROOT}/scripts/models/{name}.sh" && printf "%s\\n" "${{MODEL_ARGS[@]}}"'],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    return [line for line in out.splitlines() if line]


def resolve(argv):
    from slime.backends.megatron_utils.model_config import add_model_arguments, resolve_model_args

    p = argparse.ArgumentParser()
    p.add_argument("--hf-checkpoint")
    add_model_arguments(p)
    return resolve_model_args(p.parse_args(argv))


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_model_script_matches_hf_config(tmp_path, name):
    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args

    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS[name]))
    flags = script_args(name)
    derived = hf_model_args(str(tmp_path))
    ModelArgs(**derived)  # a valid architecture
    alone = resolve(flags)
    assert resolve(["--hf-checkpoint", str(tmp_path), *flags]) == alone  # no conflict
    # The script alone is the whole architecture (routing/training flags such as
    # --moe-router-dtype are not in config.json and not compared).
    assert {k: getattr(alone, k) for k in derived} == derived


@pytest.mark.parametrize("size", ["0.6B", "1.7B", "4B", "8B"])
def test_embedded_qwen3_configs_match_shared_assets(size):
    path = SHARED / "assets" / "qwen3-configs" / f"Qwen3-{size}.json"
    if not path.exists():
        pytest.skip("../shared/assets/qwen3-configs not present")
    real = json.loads(path.read_text())
    for key, value in HF_CONFIGS[f"qwen3-{size}"].items():
        assert real[key] == value, key


def test_wrong_script_value_is_caught(tmp_path):
    from slime.backends.megatron_utils.model_config import ModelConfigError

    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS["qwen3-4B"]))
    flags = script_args("qwen3-4B")
    flags[flags.index("--num-query-groups") + 1] = "4"
    with pytest.raises(ModelConfigError, match="--num-query-groups is 4"):
        resolve(["--hf-checkpoint", str(tmp_path), *flags])


def test_slime_spellings_of_model_flags(tmp_path):
    """slime's Llama 3.x scripts spell the llama3 RoPE factor --rotary-scaling-factor: it is
    --rope-scaling-factor, checked against config.json (Llama 3.2's 32 is not 3.1's 8);
    glm4-32B.sh's --seq-length is accepted and changes nothing."""
    from slime.backends.megatron_utils.model_config import ModelConfigError

    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS["llama3.1-8B"]))
    flags = script_args("llama3.2-3B")
    assert resolve(flags).rope_scaling_factor == 32.0
    with pytest.raises(ModelConfigError, match="--rope-scaling-factor is 32.0"):
        resolve(["--hf-checkpoint", str(tmp_path), "--rotary-scaling-factor", "32.0"])
    assert resolve(["--hf-checkpoint", str(tmp_path), "--seq-length", "32768"]) == resolve(["--hf-checkpoint", str(tmp_path)])
