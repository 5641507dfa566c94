#!/usr/bin/env bash
# Issue 14's equal-trial searches on a converged-protocol trunk: FreeLB's own knobs, CARL's and RAR's, the same
# number of trials each, every choice on validation (the 872 examples the protocol carves from training), the
# objective validation accuracy under 10-step k-PGD at ε = 0.1 (carlrar search --objective robust; the methods
# exist for robustness). Each trial is a branch exactly as `carlrar reproduce --protocol converged` makes it (from
# the trunk's checkpoint: weights, optimiser, schedule, RNG, data order; 250 more steps; protocol settings).
# CARL and RAR are FreeLB plus a term, so their searches keep FreeLB's adversarial knobs and tune only their own: the
# protocol's (α 0.1, γ 0.6, ε 0, n 2), because on seed 0 FreeLB's best searched trial scored 74.08 % on this
# objective and the protocol's FreeLB 76.03 % (carlrar attack --split validation --eps 0.1), above all six trials.
# Resumable: run it again to continue. The winners then run as protocol variants on every seed, reported on dev.
#   scripts/converged-search.sh [SEED=0] [TRIALS=6] [RESULTS=results/converged-sst2]
set -euo pipefail
seed=${1:-0}; trials=${2:-6}; results=${3:-results/converged-sst2}
trunk=$results/models/sst2-trunk-s$seed
[ -d "$trunk/checkpoint" ] || {
  echo "error: $trunk has no checkpoint: run carlrar reproduce --protocol converged --seeds $seed first" >&2; exit 2; }
carlrar=${CARLRAR:-carlrar}
common=(--model minilm --dataset sst2 --train_subset 8000 --validation_size 872 --lr 2e-5 --lr_schedule constant
        --warmup_ratio 0.05 --max_steps 1000 --eval_steps 125 --diagnostics_steps 0 --init_from "$trunk"
        --seed "$seed" --threads 2 --objective robust --objective-eps 0.1 --trials "$trials")
studies=$results/search-s$seed
"$carlrar" search --study-dir "$studies/freelb" --method freelb --params adv_lr,adv_init_mag,adv_max_norm "${common[@]}"
"$carlrar" search --study-dir "$studies/carl" --method carl --params carl_weight_ratio,carl_temperature,carl_proj_dim \
  --carl_start_step 750 --carl_negatives 1900 "${common[@]}"
# RAR's search tunes on top of the RAR family's choice on validation, rar-warm (the reconstructor warmed for 300
# batches on the trunk's clean token states: MiniLM has no MLM head, the paper's ALBERT has one), as CARL's kept
# FreeLB's knobs; decided before the RAR study's first trial.
"$carlrar" search --study-dir "$studies/rar" --method rar --params rar_weight,rar_ascent --rar_warmup_steps 300 \
  "${common[@]}"
