# glm4-9B (GLM-Z1-9B-0414, GLM-4-9B-0414): Megatron-LM architecture flags (checked against the HF
# config.json by tests/test_model_scripts.py). slime's own glm4-9B.sh plus the context length.
# GLM4's layer: norms after attention and after the MLP (sandwich), half of each head rotated with
# interleaved pairs, QKV bias only, untied output. `--spec slime_plugins.models.glm4 get_glm_spec`
# (slime's path) resolves to our GLM4 layer, slime.backends.megatron_utils.glm4.get_glm_spec.
MODEL_ARGS=(
   --spec "slime_plugins.models.glm4" "get_glm_spec"
   --swiglu
   --num-layers 40
   --hidden-size 4096
   --ffn-hidden-size 13696
   --num-attention-heads 32
   --group-query-attention
   --num-query-groups 2
   --kv-channels 128
   --use-rotary-position-embeddings
   --disable-bias-linear
   --add-qkv-bias
   --normalization "RMSNorm"
   --norm-epsilon 1e-5
   --rotary-base "${MODEL_ARGS_ROTARY_BASE:-10000}"
   --vocab-size 151552
   --max-position-embeddings 32768
   --post-self-attn-layernorm
   --post-mlp-layernorm
   --rotary-interleaved
   --rotary-percent 0.5
   --no-rope-fusion
   --untie-embeddings-and-output-weights
)
