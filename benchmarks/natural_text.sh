#!/usr/bin/env bash
# docs/quality.md "Natural text": every row, on one CPU thread, in order (about 85 minutes of training here).
#   apt-get install bible-kjv; bash benchmarks/natural_text.sh [train|score|all]
# Budgets are wall time on this machine, set as steps from the measured rates at batch 64 x L = 128 on one thread
# (Elastic 0.18 s/step with the schedule mask share, 0.24 s/step with the uniform one; MDLM 1.35 s/step):
# X = MDLM's 360 steps (8 minutes). The tables quote each run's own train_runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/kjv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
train() {  # name, flags...
  local name=$1; shift
  [ -f "$OUT/$name/model.safetensors" ] && return 0  # done already
  $PY scripts/train.py configs/bible-kjv.yaml --output_dir "$OUT/$name" --overwrite_output_dir true "$@" \
    > "$OUT/$name.log" 2>&1
}
prepare() {
  [ -f "$OUT/corpus.json" ] || $PY -m benchmarks.bible_corpus "$OUT"
  [ -f "$OUT/scorer/scorer.json" ] || $PY -m benchmarks.scorer "$OUT/verses" "$OUT/scorer" \
    --tokenizer "$OUT/tokenizer" --layers 4 --width 128 --max_steps 800 --learning_rate 0.002 > "$OUT/scorer.log" 2>&1
}
training() {
  MDLM=(--objective mdlm)
  SCHEDULE=(--token_mask_share schedule)                  # the main job's mask share, before the ablation below
  train M-X "${MDLM[@]}" --max_steps 360                  # the retrofit's source: MDLM for X
  train E-1.25X "${SCHEDULE[@]}" --max_steps 3400         # Elastic from scratch, 1.25 X
  train M-1.25X "${MDLM[@]}" --max_steps 450              # MDLM, 1.25 X
  train E-1.25X-gap0.5 "${SCHEDULE[@]}" --max_steps 3400 --gap_loss_weight 0.5  # ablation rows: a lighter gap loss,
  train E-1.25X-uniform --max_steps 3400                  # more token targets per example (uniform mask share)
  train EU-1.25X                                          # the winner at 1.25 X of wall time (its 2770 steps)
  for lr in 0.001 0.0003; do                              # the retrofit: M-X fine-tuned as Elastic for X / 4
    train "R-lr$lr" "${SCHEDULE[@]}" --model_name_or_path "$OUT/M-X" --max_steps 680 --learning_rate $lr \
      --warmup_steps 20 --save_strategy steps --save_steps 100 --save_only_model true
  done
  train RU --model_name_or_path "$OUT/M-X" --max_steps 550 --warmup_steps 20 --save_strategy steps \
    --save_steps 100 --save_only_model true               # the retrofit with the uniform mask share (X / 4: 550 steps)
  # L = 1024 (Fig. 4): chapters, chunked at 1024 tokens
  train E-1024 "${SCHEDULE[@]}" --train_files "$OUT/chapters/train.txt" --eval_files "$OUT/chapters/validation.txt" \
    --max_position_embeddings 1024 --horizon_max 1024 --per_device_train_batch_size 8 --max_steps 300 --warmup_steps 30
}
score() {  # docs/quality.md's tables and chart from the checkpoints above
  local NT=("$PY" -m benchmarks.natural_text --scorer "$OUT/scorer" --test_file "$OUT/verses/test.txt")
  "${NT[@]}" steps "$OUT/E-1.25X" "$OUT/M-1.25X" "$OUT/EU-1.25X" --output "$OUT/fig2.jsonl"
  "${NT[@]}" curve "$OUT/M-X" "$OUT"/R-lr0.001/checkpoint-{200,400,600} "$OUT/R-lr0.001" \
    "$OUT"/R-lr0.0003/checkpoint-{200,400,600} "$OUT/R-lr0.0003" "$OUT"/RU/checkpoint-{200,400} "$OUT/RU" \
    --steps 64 --output "$OUT/curve.jsonl"
  "${NT[@]}" curve "$OUT/E-1.25X" "$OUT/E-1.25X-gap0.5" "$OUT/E-1.25X-uniform" --steps 64 --output "$OUT/ablation.jsonl"
  "${NT[@]}" schedules "$OUT/E-1024" --steps 128 --repeats 2 --output "$OUT/fig4.jsonl"
  "${NT[@]}" chart "$OUT/fig2.jsonl" --output docs/natural_text/pareto.png
}
case "${1:-all}" in
  train) prepare; training ;;
  score) score ;;
  all) prepare; training; score ;;
esac
