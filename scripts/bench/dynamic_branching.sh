#!/usr/bin/env bash
# Dynamic branching benchmark (issue 13): fixed BranchGRPO (today's default flags) against each dynamic-branching
# policy of the branchgrpo unit and one combination, same iterations, several seeds; writes table.{json,md,csv} and
# reward_vs_compute.png (eval reward against rollout + training forward passes, and against wall time, with 95%
# bands over seeds) to OUTPUT_DIR and prints the table. Finished runs are reused: an interrupted benchmark resumes.
#
#   bash scripts/bench/dynamic_branching.sh                                  # toy, outputs/dynamic_branching/
#   ITERATIONS=2 SEEDS=0 METHODS=branchgrpo_guided bash scripts/bench/dynamic_branching.sh
#   MODEL=flux NPROC=8 MODEL_PATH=data/flux DATA_JSON=data/rl_embeddings/index.json bash scripts/bench/dynamic_branching.sh
#
# Environment (defaults): MODEL (toy | flux); ITERATIONS (30); SEEDS (0,1,2); METHODS (all: branchgrpo,
# branchgrpo_allocation, branchgrpo_splits, branchgrpo_innovation, branchgrpo_guided, branchgrpo_guided_allocation,
# branchgrpo_guided_splits;
# the baseline branchgrpo is always added); EVAL_EVERY (ITERATIONS / 6); OUTPUT_DIR (outputs/dynamic_branching);
# NUM_THREADS (1); SKIP_SETUP=1 skips env_setup.sh; PYTHON.
# flux only: NPROC (8), MODEL_PATH (data/flux), DATA_JSON (data/rl_embeddings/index.json), HPS_CKPT_DIR (hps_ckpt),
# MASTER_PORT (29517); the flux run uses scripts/lib/flux.sh's settings through extra arguments you pass.
# Extra arguments go to every run's trainer (after the harness's flags, so they win).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh

MODEL="${MODEL:-toy}"
ITERATIONS="${ITERATIONS:-30}"
SEEDS="${SEEDS:-0,1,2}"
METHODS="${METHODS:-all}"
NUM_THREADS="${NUM_THREADS:-1}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/dynamic_branching}"
bg_bool SKIP_SETUP 0
bg_require_int NUM_THREADS
bg_check_inputs  # before env_setup.sh: a bad variable installs nothing
[[ "$SKIP_SETUP" == 1 ]] || bash env_setup.sh
bg_python
[[ "$ITERATIONS" =~ ^[1-9][0-9]*$ ]] || { echo "error: ITERATIONS must be a positive integer, got '$ITERATIONS'" >&2; BG_MISSING=1; }
[[ "$SEEDS" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "error: SEEDS must be a comma list of integers, got '$SEEDS'" >&2; BG_MISSING=1; }
ARGS=(--model "$MODEL" --iterations "$ITERATIONS" --seeds "$SEEDS" --methods "$METHODS" --num_threads "$NUM_THREADS")
[[ -n "${EVAL_EVERY:-}" ]] && ARGS+=(--eval_every "$EVAL_EVERY")
TRAINER_ARGS=()
case "$MODEL" in
  toy) ;;
  flux)
    MODEL_PATH="${MODEL_PATH:-data/flux}"
    DATA_JSON="${DATA_JSON:-data/rl_embeddings/index.json}"
    bg_require_dir "$MODEL_PATH" "MODEL_PATH: put FLUX.1-dev there in diffusers layout (docs/flux.md)"
    bg_require_file "$DATA_JSON" "DATA_JSON: run scripts/preprocess/preprocess_flux_rl_embeddings.sh first"
    ARGS+=(--launcher torchrun --nproc "${NPROC:-8}")
    TRAINER_ARGS+=(--pretrained_model_name_or_path "$MODEL_PATH" --data_json_path "$DATA_JSON"
                   --reward_model_dir "${HPS_CKPT_DIR:-hps_ckpt}")
    export MASTER_PORT="${MASTER_PORT:-29517}" TOKENIZERS_PARALLELISM=false ;;
  *) echo "error: MODEL must be toy or flux (got '$MODEL')" >&2; BG_MISSING=1 ;;
esac
bg_check_inputs

echo "[dynamic] $MODEL, $ITERATIONS iterations, seeds $SEEDS, methods: $METHODS -> $OUTPUT_DIR"
"$PY" -m branchgrpo.bench.dynamic "${ARGS[@]}" --output_dir "$OUTPUT_DIR" -- "${TRAINER_ARGS[@]}" "$@"
