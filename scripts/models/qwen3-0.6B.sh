# qwen3-0.6B: Megatron-LM architecture flags (checked against the HF config.json by tests/test_model_scripts.py).
MODEL_ARGS=(
   --swiglu
   --num-layers 28
   --hidden-size 1024
   --ffn-hidden-size 3072
   --num-attention-heads 16
   --group-query-attention
   --num-query-groups 8
   --kv-channels 128
   --use-rotary-position-embeddings
   --normalization "RMSNorm"
   --norm-epsilon 1e-6
   --rotary-base "${MODEL_ARGS_ROTARY_BASE:-1000000}"
   --vocab-size 151936
   --max-position-embeddings 40960
   --disable-bias-linear
   --qk-layernorm
)
