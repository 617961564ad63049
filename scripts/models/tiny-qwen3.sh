# tiny-qwen3: the embedded default (slime/assets/tiny-qwen3, ~400k parameters).
MODEL_ARGS=(
   --swiglu
   --num-layers 2
   --hidden-size 128
   --ffn-hidden-size 256
   --num-attention-heads 4
   --group-query-attention
   --num-query-groups 2
   --kv-channels 32
   --use-rotary-position-embeddings
   --normalization "RMSNorm"
   --norm-epsilon 1e-6
   --rotary-base "${MODEL_ARGS_ROTARY_BASE:-1000000}"
   --vocab-size 849
   --max-position-embeddings 4096
   --disable-bias-linear
   --qk-layernorm
)
