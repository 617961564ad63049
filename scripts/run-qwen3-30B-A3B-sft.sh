#!/usr/bin/env bash
# SFT of Qwen3-30B-A3B (MoE: 128 experts, top-8) on one node of GPUs (slime's layout). Paths come
# from the environment:
#   HF_DIR     HF checkpoint of Qwen3-30B-A3B (tokenizer + weights)
#   DATA       SFT data (.jsonl / .parquet; OpenAI messages, see docs/sft_data.md)
#   OUT        run directory (torch_dist conversion, checkpoints, metrics, HF export)
#   NUM_GPUS   GPUs to train on (default 8); RAY_ADDRESS to use a running cluster instead
#   EP         expert-parallel size (default NUM_GPUS; must divide NUM_GPUS and 128 experts)
# Run `DRY_RUN=1 bash scripts/run-qwen3-30B-A3B-sft.sh` to print the training flags only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HF_DIR=${HF_DIR:-/root/Qwen3-30B-A3B}
DATA=${DATA:-/root/sft-data/train.jsonl}
OUT=$(mkdir -p "${OUT:-${ROOT}/outputs/qwen3-30B-A3B-sft}" && cd "${OUT:-${ROOT}/outputs/qwen3-30B-A3B-sft}" && pwd)
NUM_GPUS=${NUM_GPUS:-8}

source "${ROOT}/scripts/models/qwen3-30B-A3B.sh"

CKPT_ARGS=(
   --hf-checkpoint "${HF_DIR}"
   --ref-load "${OUT}/Qwen3-30B-A3B_torch_dist"
   --load "${OUT}/ckpt"
   --save "${OUT}/ckpt"
   --save-interval 100
   --save-hf "${OUT}/hf"
)

SFT_ARGS=(
   --rollout-function-path slime.rollout.sft_rollout.generate_rollout
   --prompt-data "${DATA}"
   --input-key messages
   --tool-key tools
   --multi-turn-policy full
   --rollout-max-context-len 8192
   --rollout-shuffle
   --num-epoch 3
   --rollout-batch-size 128
   --global-batch-size 128
   --loss-type sft_loss
   --calculate-per-token-loss
   --disable-compute-advantages-and-returns
   --debug-train-only
)

# slime's layout for this model: attention at TP 4, experts at EP (default: every GPU) with
# expert TP 1; EP takes its ranks from data parallelism. megatron-core trains MoE at TP > 1
# only with --sequence-parallel.
PERF_ARGS=(
   --tensor-model-parallel-size 4
   --pipeline-model-parallel-size 1
   --context-parallel-size 1
   --expert-model-parallel-size "${EP:-${NUM_GPUS}}"
   --expert-tensor-parallel-size 1
   --sequence-parallel
   --bf16
   --recompute-granularity full
   --recompute-method uniform
   --recompute-num-layers 1
   --use-dynamic-batch-size
   --max-tokens-per-gpu 8192
)

OPTIMIZER_ARGS=(
   --optimizer adam
   --lr 1e-5
   --lr-decay-style cosine
   --min-lr 1e-6
   --lr-warmup-fraction 0.03
   --weight-decay 0.1
   --adam-beta1 0.9
   --adam-beta2 0.95
   --clip-grad 1.0
)

WANDB_ARGS=(
   # --use-wandb --wandb-project slime-sft --wandb-group qwen3-30B-A3B-sft   (key: WANDB_API_KEY)
   --use-tensorboard
)

MISC_ARGS=(
   --attention-dropout 0.0
   --hidden-dropout 0.0
   --accumulate-allreduce-grads-in-fp32
   --attention-softmax-in-fp32
   # the fastest exact packed attention on the device (CPU: sdpa; CUDA: flash varlen); the log says which
   --attention-backend flash
   --actor-num-nodes 1
   --actor-num-gpus-per-node "${NUM_GPUS}"
)

TRAIN_CMD=(python3 "${ROOT}/train_async.py" "${MODEL_ARGS[@]}" "${CKPT_ARGS[@]}" "${SFT_ARGS[@]}" "${PERF_ARGS[@]}"
           "${OPTIMIZER_ARGS[@]}" "${WANDB_ARGS[@]}" "${MISC_ARGS[@]}")
if [ -n "${DRY_RUN:-}" ]; then printf '%s\n' "${TRAIN_CMD[@]:2}"; exit 0; fi

if [ ! -f "${OUT}/Qwen3-30B-A3B_torch_dist/latest_checkpointed_iteration.txt" ]; then
  python3 "${ROOT}/tools/convert_hf_to_torch_dist.py" --hf-checkpoint "${HF_DIR}" --save "${OUT}/Qwen3-30B-A3B_torch_dist" "${MODEL_ARGS[@]}"
fi

source "${ROOT}/scripts/ray_local.sh"
start_local_ray "$(nproc)" "${NUM_GPUS}"
submit_job \
   --runtime-env-json "{\"env_vars\": {\"PYTHONPATH\": \"${ROOT}\", \"CUDA_DEVICE_MAX_CONNECTIONS\": \"1\"}}" \
   -- "${TRAIN_CMD[@]}"
