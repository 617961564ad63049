# llama3.1-8B: Megatron-LM architecture flags (checked against the HF config.json by tests/test_model_scripts.py).
MODEL_ARGS=(
   --swiglu
   --num-layers 32
   --hidden-size 4096
   --ffn-hidden-size 14336
   --num-attention-heads 32
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
   --untie-embeddings-and-output-weights
   --use-rope-scaling
   --rope-scaling-factor 8.0
)
