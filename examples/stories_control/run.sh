#!/usr/bin/env bash
# The stories260k controllability replication: the exact ctrlsafe commands a user would run.
#
#   examples/stories_control/run.sh [OUT]          (default OUT: runs/stories_control; `make replication`)
#
# 1. story openings (make_openings.py): train and held-out sets with disjoint characters;
# 2. `ctrlsafe generate`: the base model writes every opening under all 9 control cells, the two
#    scorers in scorers.py (module:function, hence PYTHONPATH) measure sentiment and dialogue,
#    bins.json turns scores into levels 0..2, distillation keeps a balanced set;
# 3. `ctrlsafe train`: CLM and, separately, ExMATE on that set, one run per seed;
# 4. `ctrlsafe eval` on the held-out openings: the base model with untrained (mean-initialised)
#    control tokens, best-of-N reranking of the base model (training-free), CLM, ExMATE; per seed;
# 5. report.py: the table (mean ± std over seeds) and heatmaps -> $REPORT (docs/replication.md).
#
# Sizes come from the environment (the smoke test shrinks them). Finished steps are reused:
# generate resumes its shards, and a train or eval directory that already holds its final
# output is skipped, so delete OUT to start over after changing a size.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${1:-$ROOT/runs/stories_control}"
CTRLSAFE="${CTRLSAFE:-$ROOT/.venv/bin/ctrlsafe}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
POLICY="${POLICY:-/work/shared/models/stories260k}"
REPORT="${REPORT:-$ROOT/docs/replication.md}"

TRAIN_PROMPTS="${TRAIN_PROMPTS:-200}"   # openings sampled for the data set
HELDOUT_PROMPTS="${HELDOUT_PROMPTS:-30}" # openings for evaluation (characters never seen in training)
SAMPLES="${SAMPLES:-2}"                 # generate: samples per opening and cell
MAX_NEW="${MAX_NEW:-80}"                # tokens per story continuation (generate and eval)
STEPS="${STEPS:-300}"                   # train: optimizer steps (batch 16)
LR="${LR:-3e-3}"                        # a 260K-parameter model: pre-training-sized LR, not 7B's 1e-5
ALPHA="${ALPHA:-4}"                     # ExMATE weight of exp(-CE(y|x,c')); at 0.05 (the default) and 0.5 no control emerged
EVAL_SAMPLES="${EVAL_SAMPLES:-2}"       # eval: samples per held-out opening and cell
RERANK_N="${RERANK_N:-8}"               # eval --method rerank: candidates per opening
SEEDS="${SEEDS:-0 1 2}"
JOBS="${JOBS:-2}"                       # commands run at once (2 CPU cores here)

export HF_HUB_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread per job is faster than oversubscribing
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"  # for --rm sentiment=scorers:sentiment

RM=(--rm sentiment=scorers:sentiment --rm dialogue=scorers:dialogue)
mkdir -p "$OUT/logs"

# run NAME CMD...: print the command, run it in the background with its output in logs/NAME.log
run() {
    local name="$1"; shift
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
    echo "+ $*" | sed "s|$ROOT/||g"
    "$@" > "$OUT/logs/$name.log" 2>&1 || { echo "FAILED: $name (see $OUT/logs/$name.log)" >&2; tail -5 "$OUT/logs/$name.log" >&2; exit 1; } &
}
finish() { local pid; for pid in $(jobs -p); do wait "$pid"; done; }

start=$(date +%s)
"$PYTHON" "$HERE/make_openings.py" "$OUT" --train "$TRAIN_PROMPTS" --heldout "$HELDOUT_PROMPTS"

run generate "$CTRLSAFE" generate --prompts "$OUT/train.jsonl" --out "$OUT/data" --policy "$POLICY" "${RM[@]}" \
    --levels 3 --bins "$HERE/bins.json" --samples "$SAMPLES" --max-new-tokens "$MAX_NEW" --seed 0 --resume
finish

for seed in $SEEDS; do
    for objective in clm exmate; do
        dir="$OUT/train/$objective-s$seed"
        [[ -f "$dir/model.safetensors" ]] && continue
        extra=(); [[ $objective == exmate ]] && extra=(--alpha "$ALPHA")
        run "train-$objective-s$seed" "$CTRLSAFE" train --data "$OUT/data" --model "$POLICY" --objective "$objective" \
            --out "$dir" --lr "$LR" --batch-size 16 --max-steps "$STEPS" --warmup 10 --seed "$seed" --no-progress "${extra[@]}"
    done
done
finish

for seed in $SEEDS; do
    for method in base rerank clm exmate; do
        dir="$OUT/eval/$method-s$seed"
        [[ -f "$dir/metrics.json" ]] && continue
        case $method in
            base)   args=(--model "$POLICY" --method tokens --samples "$EVAL_SAMPLES") ;;
            rerank) args=(--model "$POLICY" --method rerank --samples "$RERANK_N") ;;
            *)      args=(--model "$OUT/train/$method-s$seed" --method tokens --samples "$EVAL_SAMPLES") ;;
        esac
        run "eval-$method-s$seed" "$CTRLSAFE" eval "${args[@]}" --prompts "$OUT/heldout.jsonl" "${RM[@]}" \
            --bins "$HERE/bins.json" --max-new-tokens "$MAX_NEW" --seed "$seed" --out "$dir"
    done
done
finish

"$PYTHON" "$HERE/report.py" "$OUT" --out "$REPORT" --reading "$HERE/reading.md" --seconds $(( $(date +%s) - start ))
