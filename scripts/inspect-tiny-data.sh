#!/usr/bin/env bash
# The main job on the embedded tiny default (CPU, no download): install slime, then render the
# embedded SFT data with the tiny Qwen3 tokenizer's chat template, validate every row, write
# token ids + loss masks and print the data summary and one coloured sample.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e .
OUT=${OUT:-outputs/tiny-data}
mkdir -p "$OUT"
python tools/inspect_sft_data.py \
  --hf-checkpoint slime/assets/tiny-qwen3 \
  --prompt-data slime/assets/tiny_sft.jsonl \
  --multi-turn-policy "${POLICY:-full}" \
  --rollout-max-context-len 512 \
  --dump "$OUT/samples.jsonl" \
  --show 4 "$@"
