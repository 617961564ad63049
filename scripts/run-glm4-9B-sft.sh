#!/usr/bin/env bash
# SFT of GLM-Z1-9B-0414 (GLM4, dense 9B) on one node of GPUs (slime's layout). Paths come
# from the environment:
#   HF_DIR     HF checkpoint of GLM-Z1-9B-0414 (tokenizer + weights)
#   DATA       SFT data (.jsonl / .parquet; OpenAI messages, see docs/sft_data.md)
#   OUT        run directory (torch_dist conversion, checkpoints, metrics, HF export)
#   NUM_GPUS   GPUs to train on (default 8); RAY_ADDRESS to use a running cluster instead
# Run `DRY_RUN=1 bash scripts/run-glm4-9B-sft.sh` to print the training flags only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HF_DIR=${HF_DIR:-/root/GLM-Z1-9B-0414}
DATA=${DATA:-/root/sft-data/train.jsonl}
OUT=$(mkdir -p "${OUT:-${ROOT}/outputs/glm4-9B-sft}" && cd "${OUT:-${ROOT}/outputs/glm4-9B-sft}" && pwd)
NUM_GPUS=${NUM_GPUS:-8}

source "${ROOT}/scripts/models/glm4-9B.sh"

CKPT_ARGS=(
   --hf-checkpoint "${HF_DIR}"
   --ref-load "${OUT}/GLM-Z1-9B-0414_torch_dist"
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

# slime's GLM4 script runs TP 2 x CP 2 with --sequence-parallel; context parallelism is not built
# yet, so TP 2 and data parallelism over the other GPUs. No --sequence-parallel: megatron-core's
# local layer spec norms (torch RMSNorm) refuse it. Optimizer states can go to host memory
# (--optimizer-cpu-offload, megatron-core's HybridDeviceOptimizer) when GPU memory is short.
PERF_ARGS=(
   --tensor-model-parallel-size 2
   --pipeline-model-parallel-size 1
   --context-parallel-size 1
   --expert-model-parallel-size 1
   --expert-tensor-parallel-size 1
   --bf16
   --recompute-granularity full
   --recompute-method uniform
   --recompute-num-layers 1
   --use-dynamic-batch-size
   --max-tokens-per-gpu 4608
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
   # --use-wandb --wandb-project slime-sft --wandb-group glm4-9B-sft   (key: WANDB_API_KEY)
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

if [ ! -f "${OUT}/GLM-Z1-9B-0414_torch_dist/latest_checkpointed_iteration.txt" ]; then
  python3 "${ROOT}/tools/convert_hf_to_torch_dist.py" --hf-checkpoint "${HF_DIR}" \
     --save "${OUT}/GLM-Z1-9B-0414_torch_dist" "${MODEL_ARGS[@]}"
fi

source "${ROOT}/scripts/ray_local.sh"
start_local_ray "$(nproc)" "${NUM_GPUS}"
submit_job \
   --runtime-env-json "{\"env_vars\": {\"PYTHONPATH\": \"${ROOT}\", \"CUDA_DEVICE_MAX_CONNECTIONS\": \"1\"}}" \
   -- "${TRAIN_CMD[@]}"
