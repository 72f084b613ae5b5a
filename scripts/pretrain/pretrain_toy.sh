#!/usr/bin/env bash
# Pretrain the embedded toy model (text-conditioned flow matching on sklearn's real 8x8 digits) and its reward
# classifier; writes the checkpoint, reward files, prompt lists and pretrain_report.json to OUT_DIR.
# About 2.5 minutes on 2 CPU cores; no GPU, no download. A single process on purpose: the model is tiny, and one
# process with a fixed thread count is what makes the run reproducible bit for bit.
#
#   bash scripts/pretrain/pretrain_toy.sh                         # refresh the shipped model in branchgrpo/toy/assets
#   OUT_DIR=data/toy_seed1 SEED=1 bash scripts/pretrain/pretrain_toy.sh --lr 1e-3
#
# Every variable below can be overridden from the environment; extra flags go to the python entry point
# (python -m branchgrpo.cli.pretrain_toy --help lists them).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/scripts/lib/common.sh"

PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-branchgrpo/toy/assets}   # where the checkpoint goes
SEED=${SEED:-0}                             # seed of everything random
STEPS=${STEPS:-1500}                        # flow-matching optimizer steps
BATCH_SIZE=${BATCH_SIZE:-256}               # real digits per step
THREADS=${THREADS:-0}                       # torch CPU threads (0: torch's default)
bg_require_int SEED STEPS BATCH_SIZE THREADS
bg_check_inputs

exec "$PYTHON" -m branchgrpo.cli.pretrain_toy \
    --out "$OUT_DIR" \
    --seed "$SEED" \
    --steps "$STEPS" \
    --batch_size "$BATCH_SIZE" \
    --threads "$THREADS" \
    "$@"
