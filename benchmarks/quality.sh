#!/usr/bin/env bash
# The ablation and the Elastic-vs-MDLM comparison of docs/quality.md: train each variant of the main job
# (configs/tiny.yaml at 1500 steps unless a row says otherwise) and score it with benchmarks/quality.py.
# CPU; 4-7 minutes per Elastic run of 1500 steps on one thread, MDLM about 4x that per step.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/quality}
train() {  # name, flags...
  local name=$1; shift
  HF_HUB_OFFLINE=1 .venv/bin/python scripts/train.py configs/tiny.yaml --output_dir "$OUT/$name" \
    --overwrite_output_dir true --report_num_samples 0 --max_steps 1500 "$@"
}
train A-none-schedule  --gap_noise_conditioning false --token_mask_share schedule
train B-gaphead-uniform --gap_noise_conditioning true --token_mask_share uniform
train C-adaln-uniform  --gap_noise_conditioning false --time_conditioning true --token_mask_share uniform
train D-gaphead-schedule --gap_noise_conditioning true --token_mask_share schedule   # the main job's recipe
train F-horizon-2-64 --horizon_max 64
train G-length-share-0.2 --length_share 0.2
train H-gap-weight-0.5 --gap_loss_weight 0.5
train I-anchor-share-0.5 --synthetic_anchor_share 0.5
# Elastic vs MDLM: equal wall time (MDLM encodes 5120 tokens per step, Elastic about 960) and equal updates
MDLM=(--objective mdlm --gap_noise_conditioning false --mdlm_gap_budget 16)
train M-mdlm-375 "${MDLM[@]}" --max_steps 375
train M-mdlm "${MDLM[@]}"
train D-gaphead-schedule-6000 --max_steps 6000
train M-mdlm-6000 "${MDLM[@]}" --max_steps 6000
HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py "$OUT"/*/ --output "$OUT/quality.jsonl"
