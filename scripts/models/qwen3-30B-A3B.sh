# qwen3-30B-A3B: Megatron-LM architecture and MoE flags (checked against the HF config.json by
# tests/test_model_scripts.py). 48 layers, every one MoE: 128 experts of FFN 768, top-8 with the
# top-k weights renormalized (HF norm_topk_prob: softmax over the top-k logits, no
# --moe-router-pre-softmax), no shared expert.
MODEL_ARGS=(
   --swiglu
   --num-layers 48
   --hidden-size 2048
   --ffn-hidden-size 6144
   --num-attention-heads 32
   --group-query-attention
   --num-query-groups 4
   --kv-channels 128
   --use-rotary-position-embeddings
   --position-embedding-type rope
   --rotary-percent 1.0
   --normalization "RMSNorm"
   --norm-epsilon 1e-6
   --rotary-base "${MODEL_ARGS_ROTARY_BASE:-1000000}"
   --vocab-size 151936
   --max-position-embeddings 40960
   --disable-bias-linear
   --qk-layernorm
   --untie-embeddings-and-output-weights

   # MoE
   --num-experts 128
   --moe-ffn-hidden-size 768
   --moe-router-topk 8
   --moe-router-score-function softmax
   --moe-layer-freq 1
   --moe-router-dtype fp32
   --moe-router-load-balancing-type aux_loss
   --moe-aux-loss-coeff 0
   --moe-token-dispatcher-type alltoall
   --moe-token-drop-policy probs
   # accepted for Megatron-LM parity; the local (non-TE) layer spec runs experts sequentially
   --moe-grouped-gemm
   --moe-permute-fusion
)
