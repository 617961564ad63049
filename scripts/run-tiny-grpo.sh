#!/usr/bin/env bash
# Tiny GRPO end to end on CPU (a few minutes, no download), the proof that RL learns:
#   1. tools/make_toy_task.py writes a verifiable toy task (prompts with a one-digit label);
#   2. a warm-start SFT (train_async.py + sft_rollout) teaches the embedded tiny Qwen3 the answer
#      FORMAT only ("\boxed{d}" with every digit equally often for every prompt), so the policy
#      starts at a reward of about 1/10 and knows nothing about which digit is right;
#   3. GRPO (train.py: generate on the CPU engine, reward, dynamic sampling, KL to the warm
#      start, policy update, weight sync to the engine) from that warm start's HF export;
#   4. tools/summarize_run.py prints the first and last rollout reward and the eval reward.
# Environment: OUT (run directory), TASK (secret | copy | add, default secret: see
# tools/make_toy_task.py and docs/rl.md for what each learns in how long), NUM_ROLLOUT
# (default 12), SFT_EPOCHS (default 4 passes over the format set), RAY_ADDRESS (use a running
# cluster), RAY_DASHBOARD_PORT / RAY_GCS_PORT (ports of the private Ray head),
# SLIME_SKIP_INSTALL=1 (use the installed packages as they are).
# DRY_RUN=1 prints the flags of both jobs (SFT, an empty line, GRPO) and runs nothing.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "${ROOT}"
if [ -z "${DRY_RUN:-}" ] && [ -z "${SLIME_SKIP_INSTALL:-}" ]; then
  python -m pip install --quiet torch==2.13.0
  python -m pip install --quiet -e .
fi
OUT=$(mkdir -p "${OUT:-outputs/tiny-grpo}" && cd "${OUT:-outputs/tiny-grpo}" && pwd)
TASK=${TASK:-secret}
DATA=${OUT}/data

source "${ROOT}/scripts/models/tiny-qwen3.sh"

# ---------------------------------------------------------------- 1. warm start (format only)
SFT_ARGS=(
   --hf-checkpoint "${ROOT}/slime/assets/tiny-qwen3"
   --save "${OUT}/warmstart"
   --save-hf "${OUT}/warmstart_hf"
   --rollout-function-path slime.rollout.sft_rollout.generate_rollout
   --prompt-data "${DATA}/sft_format.jsonl"
   --input-key messages
   --apply-chat-template-kwargs '{"enable_thinking": false}'
   --rollout-shuffle
   --num-epoch "${SFT_EPOCHS:-4}"
   --rollout-batch-size 10
   --global-batch-size 10
   --loss-type sft_loss
   --calculate-per-token-loss
   --disable-compute-advantages-and-returns
   --debug-train-only
   --optimizer adam
   --lr 1e-2
   --lr-decay-style constant
   --lr-warmup-iters 1
   --weight-decay 0.0
   --clip-grad 1.0
)

# ---------------------------------------------------------------- 2. GRPO from the warm start
CKPT_ARGS=(
   --hf-checkpoint "${OUT}/warmstart_hf"  # also the KL reference (the initial weights)
   --save "${OUT}/ckpt"
   --save-hf "${OUT}/hf"
)

ROLLOUT_ARGS=(
   --prompt-data "${DATA}/train.jsonl"
   --input-key messages
   --label-key label
   --apply-chat-template
   # the empty think block goes into the prompt, so a response is just "\boxed{d}<|im_end|>"
   --apply-chat-template-kwargs '{"enable_thinking": false}'
   --rollout-shuffle
   --rm-type math
   --num-rollout "${NUM_ROLLOUT:-12}"
   --rollout-batch-size 8
   --n-samples-per-prompt 8
   --rollout-max-response-len 12
   --rollout-temperature 1.0
   --rollout-deterministic-seeds
   # dynamic sampling: 16 prompts per round, groups whose 8 rewards are all equal carry no GRPO
   # signal and are dropped. The _with_fallback variant keeps them once no surplus is left: a
   # solved toy task has only all-correct groups, where the strict check_reward_nonzero_std
   # would sample forever.
   --over-sampling-batch-size 16
   --dynamic-sampling-filter-path slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std_with_fallback
)

EVAL_ARGS=(
   --eval-prompt-data toy "${DATA}/eval.jsonl"
   --eval-interval 4
   --n-samples-per-eval-prompt "${EVAL_SAMPLES:-32}"
   --eval-temperature 1.0  # the policy's success rate, not one greedy guess
)

GRPO_ARGS=(
   --advantage-estimator grpo
   --use-kl-loss
   --kl-loss-coef 0.01
   --kl-loss-type low_var_kl
   --entropy-coef 0.0
   --eps-clip 0.2
   --eps-clip-high 0.28
)

OPTIMIZER_ARGS=(
   --optimizer adam
   --lr 2e-3
   --lr-decay-style constant
   --weight-decay 0.0
   --adam-beta1 0.9
   --adam-beta2 0.98
   --clip-grad 1.0
)

PERF_ARGS=(
   --tensor-model-parallel-size 1
   --pipeline-model-parallel-size 1
   --use-dynamic-batch-size
   --max-tokens-per-gpu 8192
)

# the CPU engine speaks SGLang's /generate; on a GPU box SGLang takes its place
SGLANG_ARGS=(
   --rollout-engine cpu
   --rollout-num-gpus-per-engine 1
   --sglang-server-concurrency 64
)

MISC_ARGS=(
   --attention-dropout 0.0
   --hidden-dropout 0.0
   --actor-num-nodes 1
   --actor-num-gpus-per-node 1
)

SFT_CMD=(python3 "${ROOT}/train_async.py" "${MODEL_ARGS[@]}" "${SFT_ARGS[@]}" "${PERF_ARGS[@]}" "${MISC_ARGS[@]}")
GRPO_CMD=(python3 "${ROOT}/train.py" "${MODEL_ARGS[@]}" "${CKPT_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${EVAL_ARGS[@]}"
          "${GRPO_ARGS[@]}" "${OPTIMIZER_ARGS[@]}" "${PERF_ARGS[@]}" "${SGLANG_ARGS[@]}" "${MISC_ARGS[@]}")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%s\n' "${SFT_CMD[@]:2}"
  echo
  printf '%s\n' "${GRPO_CMD[@]:2}"
  exit 0
fi

python3 "${ROOT}/tools/make_toy_task.py" --out-dir "${DATA}" --task "${TASK}"

source "${ROOT}/scripts/ray_local.sh"
start_local_ray 3 0
RUNTIME_ENV="{\"env_vars\": {\"OMP_NUM_THREADS\": \"1\", \"PYTHONPATH\": \"${ROOT}\"}}"
if [ ! -f "${OUT}/warmstart_hf/config.json" ]; then
  submit_job --runtime-env-json "${RUNTIME_ENV}" -- "${SFT_CMD[@]}"
fi
submit_job --runtime-env-json "${RUNTIME_ENV}" -- "${GRPO_CMD[@]}"

# Where everything is, first and last rollout reward, eval reward, a reply of the final model.
python3 "${ROOT}/tools/summarize_run.py" --save "${OUT}/ckpt" --save-hf "${OUT}/hf" --prompt "$(python3 -c "
import json, sys; print(json.loads(open(sys.argv[1]).readline())['messages'][0]['content'])" "${DATA}/eval.jsonl")"
