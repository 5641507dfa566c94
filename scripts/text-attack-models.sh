#!/usr/bin/env bash
# The README's text-attack table: every finished model of a results folder attacked by TextAttack recipes on the
# same seeded 200-example SST-2 dev subset, one process and one thread at a time (the machine is shared).
#   usage: scripts/text-attack-models.sh MODELS_DIR OUT_DIR RECIPES [RUN...]
#   e.g.   scripts/text-attack-models.sh ../main/results/converged-sst2/models results/text-attacks deepwordbug,pwws
# RAR's text-form samples: SAMPLES=FILE (carlrar generate --limit 200 --seed 0 on the RAR model) with RECIPES
# rar-samples.
# A run's attack is skipped when OUT_DIR/<run>-<recipes>_summary.json exists (resumable); a model without
# final_metrics.json is still training and is left out.
set -euo pipefail
models=$1; out=$2; recipes=$3; shift 3
runs=("$@"); [ ${#runs[@]} -gt 0 ] || runs=($(ls "$models"))
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
tag=${recipes//,/-}
for run in "${runs[@]}"; do
  [ -f "$models/$run/final_metrics.json" ] || continue
  [ -f "$out/$run-${tag}_summary.json" ] && continue
  echo "== $run: $recipes ($(date -u +%H:%M:%S))"
  nice -n 10 carlrar attack --model "$models/$run" --dataset sst2 --split dev --limit 200 --seed 0 \
    --recipe "$recipes" ${SAMPLES:+--samples "$SAMPLES"} --output "$out/$run-$tag.jsonl"
done
