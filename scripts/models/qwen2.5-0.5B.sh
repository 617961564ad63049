# qwen2.5-0.5B: Megatron-LM architecture flags (checked against the HF config.json by tests/test_model_scripts.py).
MODEL_ARGS=(
   --swiglu
   --num-layers 24
   --hidden-size 896
   --ffn-hidden-size 4864
   --num-attention-heads 14
   --group-query-attention
   --num-query-groups 2
   --kv-channels 64
   --use-rotary-position-embeddings
   --normalization "RMSNorm"
   --norm-epsilon 1e-6
   --rotary-base "${MODEL_ARGS_ROTARY_BASE:-1000000}"
   --vocab-size 151936
   --max-position-embeddings 32768
   --disable-bias-linear
   --add-qkv-bias
)
