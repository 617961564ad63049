# llama3.2-3B (Llama-3.2-3B, -Instruct): Megatron-LM architecture flags (checked against the HF
# config.json by tests/test_model_scripts.py). Tied embeddings; llama3 RoPE scaling with factor 32,
# given in slime's spelling --rotary-scaling-factor (an alias of --rope-scaling-factor here).
MODEL_ARGS=(
   --swiglu
   --num-layers 28
   --hidden-size 3072
   --ffn-hidden-size 8192
   --num-attention-heads 24
   --group-query-attention
   --num-query-groups 8
   --kv-channels 128
   --use-rotary-position-embeddings
   --normalization "RMSNorm"
   --norm-epsilon 1e-5
   --rotary-base "${MODEL_ARGS_ROTARY_BASE:-500000}"
   --vocab-size 128256
   --max-position-embeddings 131072
   --disable-bias-linear
   --use-rope-scaling
   --rotary-scaling-factor 32.0
)
