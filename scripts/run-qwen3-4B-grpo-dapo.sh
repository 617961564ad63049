#!/usr/bin/env bash
# DAPO-style GRPO of Qwen3-4B on dapo-math: dapo reward, dynamic sampling (over-sample prompts, drop
# groups whose rewards all agree, refill), clip-higher, no KL term, partial rollout, token-level
# loss; trainer and SGLang engines on separate GPUs of one node, generation of rollout k+1
# overlapping training on rollout k (train_async.py, one step of staleness, as slime does).
# Paths come from the environment:
#   HF_DIR     HF checkpoint of Qwen3-4B (tokenizer + weights; also the KL reference)
#   DATA       RL prompts (.jsonl with "prompt" and "label", e.g. dapo-math-17k.jsonl)
#   EVAL_DATA  eval prompts (.jsonl, e.g. aime-2024.jsonl)
#   OUT        run directory (torch_dist conversion, checkpoints, metrics, HF export)
#   NUM_GPUS   GPUs of the node (default 8): half train, half generate
#   RAY_ADDRESS  submit to a running cluster instead of a private head
# Needs `pip install -e .[sglang]` on the GPU machine (docs/engines.md).
# Run `DRY_RUN=1 bash scripts/run-qwen3-4B-grpo-dapo.sh` to print the training flags only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HF_DIR=${HF_DIR:-/root/Qwen3-4B}
DATA=${DATA:-/root/dapo-math-17k/dapo-math-17k.jsonl}
EVAL_DATA=${EVAL_DATA:-/root/aime-2024/aime-2024.jsonl}
OUT=$(mkdir -p "${OUT:-${ROOT}/outputs/qwen3-4B-dapo}" && cd "${OUT:-${ROOT}/outputs/qwen3-4B-dapo}" && pwd)
NUM_GPUS=${NUM_GPUS:-8}

source "${ROOT}/scripts/models/qwen3-4B.sh"

CKPT_ARGS=(
   --hf-checkpoint "${HF_DIR}"
   --ref-load "${OUT}/Qwen3-4B_torch_dist"
   --load "${OUT}/ckpt"
   --save "${OUT}/ckpt"
   --save-interval 20
)

ROLLOUT_ARGS=(
   --prompt-data "${DATA}"
   --input-key prompt
   --label-key label
   --apply-chat-template
   --rollout-shuffle
   --rm-type dapo
   --num-rollout 3000
   --rollout-batch-size 32
   --n-samples-per-prompt 8
   --rollout-max-response-len 8192
   --rollout-temperature 0.8
   # 32 prompts x 8 samples = 256 = one optimizer step per rollout
   --global-batch-size 256
   --balance-data
   # dynamic sampling: 64 prompts per round, groups with zero reward variance carry no GRPO signal
   --over-sampling-batch-size 64
   --dynamic-sampling-filter-path slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std
   # requests aborted once 32 groups passed are kept and continued in the next rollout
   --partial-rollout
)

EVAL_ARGS=(
   --eval-interval 20
   --eval-prompt-data aime "${EVAL_DATA}"
   --n-samples-per-eval-prompt 16
   --eval-max-response-len 16384
   --eval-top-p 0.7
)

PERF_ARGS=(
   --tensor-model-parallel-size 2
   --sequence-parallel
   --pipeline-model-parallel-size 1
   --context-parallel-size 1
   --expert-model-parallel-size 1
   --expert-tensor-parallel-size 1
   --recompute-granularity full
   --recompute-method uniform
   --recompute-num-layers 1
   --use-dynamic-batch-size
   --max-tokens-per-gpu 9216
)

GRPO_ARGS=(
   --advantage-estimator grpo
   # DAPO: no KL term (so no reference model is kept), clip-higher, per-token loss
   --entropy-coef 0.00
   --eps-clip 0.2
   --eps-clip-high 0.28
   --calculate-per-token-loss
)

OPTIMIZER_ARGS=(
   --optimizer adam
   --lr 1e-6
   --lr-decay-style constant
   --weight-decay 0.1
   --adam-beta1 0.9
   --adam-beta2 0.98
)

WANDB_ARGS=(
   # --use-wandb --wandb-project slime-dev --wandb-group qwen3-4B-grpo   (key: WANDB_API_KEY)
   --use-tensorboard
)

SGLANG_ARGS=(
   --rollout-num-gpus-per-engine 2
   --sglang-mem-fraction-static 0.7
)

MISC_ARGS=(
   --attention-dropout 0.0
   --hidden-dropout 0.0
   --accumulate-allreduce-grads-in-fp32
   --attention-softmax-in-fp32
   --attention-backend flash
   --actor-num-nodes 1
   --actor-num-gpus-per-node "$((NUM_GPUS / 2))"
   --rollout-num-gpus "$((NUM_GPUS / 2))"
)

TRAIN_CMD=(python3 "${ROOT}/train_async.py" "${MODEL_ARGS[@]}" "${CKPT_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${EVAL_ARGS[@]}"
           "${PERF_ARGS[@]}" "${GRPO_ARGS[@]}" "${OPTIMIZER_ARGS[@]}" "${WANDB_ARGS[@]}" "${SGLANG_ARGS[@]}" "${MISC_ARGS[@]}")
if [ -n "${DRY_RUN:-}" ]; then printf '%s\n' "${TRAIN_CMD[@]:2}"; exit 0; fi

if [ ! -f "${OUT}/Qwen3-4B_torch_dist/latest_checkpointed_iteration.txt" ]; then
  python3 "${ROOT}/tools/convert_hf_to_torch_dist.py" --hf-checkpoint "${HF_DIR}" --save "${OUT}/Qwen3-4B_torch_dist" "${MODEL_ARGS[@]}"
fi

source "${ROOT}/scripts/ray_local.sh"
start_local_ray "$(nproc)" "${NUM_GPUS}"
submit_job \
   --runtime-env-json "{\"env_vars\": {\"PYTHONPATH\": \"${ROOT}\", \"CUDA_DEVICE_MAX_CONNECTIONS\": \"1\"}}" \
   -- "${TRAIN_CMD[@]}"
