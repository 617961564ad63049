#!/usr/bin/env bash
# Tiny SFT end to end on CPU (a few minutes, no download): install, convert the embedded tiny
# Qwen3 HF checkpoint to torch_dist, train with train_async.py on 2 CPU ranks (DP=2) through
# `ray job submit`, save, export HF, and load the export with transformers to generate a reply.
# Environment: OUT (run directory), NUM_EPOCH (default 20), RAY_ADDRESS (use a running cluster),
# RAY_DASHBOARD_PORT / RAY_GCS_PORT (ports of the private Ray head), SLIME_SKIP_INSTALL=1 (use the
# installed packages as they are).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "${ROOT}"
if [ -z "${DRY_RUN:-}" ] && [ -z "${SLIME_SKIP_INSTALL:-}" ]; then
  python -m pip install --quiet torch==2.13.0
  python -m pip install --quiet -e .
fi
OUT=$(mkdir -p "${OUT:-outputs/tiny-sft}" && cd "${OUT:-outputs/tiny-sft}" && pwd)
HF=${ROOT}/slime/assets/tiny-qwen3

source "${ROOT}/scripts/models/tiny-qwen3.sh"

CKPT_ARGS=(
   --hf-checkpoint "${HF}"
   --ref-load "${OUT}/tiny-qwen3_torch_dist"
   --load "${OUT}/ckpt"
   --save "${OUT}/ckpt"
   --save-interval 25
   --save-hf "${OUT}/hf"
)

SFT_ARGS=(
   --rollout-function-path slime.rollout.sft_rollout.generate_rollout
   --prompt-data "${ROOT}/slime/assets/tiny_sft.jsonl"
   --input-key messages
   --tool-key tools
   --multi-turn-policy full
   --rollout-shuffle
   --num-epoch "${NUM_EPOCH:-20}"
   --rollout-batch-size 16
   --global-batch-size 16
   --loss-type sft_loss
   --calculate-per-token-loss
   --disable-compute-advantages-and-returns
   --debug-train-only
   --eval-prompt-data tiny "${ROOT}/slime/assets/tiny_sft.jsonl"
   --eval-interval 25
)

PERF_ARGS=(
   --tensor-model-parallel-size 1
   --pipeline-model-parallel-size 1
   --context-parallel-size 1
   --expert-model-parallel-size 1
   --expert-tensor-parallel-size 1
   --use-dynamic-batch-size
   --max-tokens-per-gpu 2048
)

OPTIMIZER_ARGS=(
   --optimizer adam
   --lr 5e-3
   --lr-decay-style cosine
   --min-lr 5e-4
   --lr-warmup-iters 1
   --weight-decay 0.0
   --adam-beta1 0.9
   --adam-beta2 0.98
   --clip-grad 1.0
)

WANDB_ARGS=(
   # --use-wandb --wandb-project slime-sft --wandb-group tiny --wandb-mode offline
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
   --actor-num-gpus-per-node 2
)

TRAIN_CMD=(python3 "${ROOT}/train_async.py" "${MODEL_ARGS[@]}" "${CKPT_ARGS[@]}" "${SFT_ARGS[@]}" "${PERF_ARGS[@]}"
           "${OPTIMIZER_ARGS[@]}" "${WANDB_ARGS[@]}" "${MISC_ARGS[@]}")
if [ -n "${DRY_RUN:-}" ]; then printf '%s\n' "${TRAIN_CMD[@]:2}"; exit 0; fi

if [ ! -f "${OUT}/tiny-qwen3_torch_dist/latest_checkpointed_iteration.txt" ]; then
  python3 tools/convert_hf_to_torch_dist.py --hf-checkpoint "${HF}" --save "${OUT}/tiny-qwen3_torch_dist" "${MODEL_ARGS[@]}"
fi

source "${ROOT}/scripts/ray_local.sh"
start_local_ray 3 0
submit_job \
   --runtime-env-json "{\"env_vars\": {\"OMP_NUM_THREADS\": \"1\", \"PYTHONPATH\": \"${ROOT}\"}}" \
   -- "${TRAIN_CMD[@]}"

# Where everything is, first and last loss, and a reply of the exported model.
python3 "${ROOT}/tools/summarize_run.py" --save "${OUT}/ckpt" --save-hf "${OUT}/hf"
