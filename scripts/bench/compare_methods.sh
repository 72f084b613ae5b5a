#!/usr/bin/env bash
# Train every method of the paper's Table 1 (DanceGRPO tf 1.0 / 0.6, MixGRPO, BranchGRPO and its WidPru, DepPru and
# Mix variants) plus G2RPO on the same model, prompts and seeds for the same number of iterations, one after another,
# then write table.{json,md,csv}, methods.json and reward_vs_time.png to OUTPUT_DIR and print the table.
# Default: the embedded toy on the CPU, all methods in one process (12.5 minutes measured on 2 cores).
#
#   bash scripts/bench/compare_methods.sh                                    # toy, outputs/compare/
#   ITERATIONS=20 METHODS=branchgrpo,dancegrpo_tf1.0 bash scripts/bench/compare_methods.sh
#   MODEL=flux NPROC=8 MODEL_PATH=data/flux DATA_JSON=data/rl_embeddings/index.json ITERATIONS=100 \
#     bash scripts/bench/compare_methods.sh                                  # FLUX.1-dev, one torchrun per method
#
#   MODEL=toy_edit SEEDS=1,2,3,4,5 ITERATIONS=40 METHODS=dancegrpo_tf1.0,branchgrpo bash scripts/bench/compare_methods.sh
#                                                                            # the edit toy (docs/editing.md)
#
# Environment (defaults): MODEL (toy | toy_edit | flux); ITERATIONS (100); METHODS (all; comma list of dancegrpo_tf1.0,
# dancegrpo_tf0.6, mixgrpo, branchgrpo, branchgrpo_widpru, branchgrpo_deppru, branchgrpo_mix, g2rpo, flow_grpo,
# flow_grpo_fast, flow_grpo_fast_cps, diffusion_nft, diffusion_nft_tree); SEEDS (empty: one run per method; "1,2,3":
# one per seed, with means and 95% intervals, eval reward against forward-pass equivalents and time, compute to reach
# DanceGRPO's final reward); OUTPUT_DIR (outputs/compare for the toy, outputs/compare_<MODEL> otherwise); EVAL_EVERY
# (ITERATIONS / 5); NUM_THREADS (1); SKIP_SETUP=1 skips env_setup.sh; PYTHON.
# flux only: NPROC (8 processes per method, torchrun), MODEL_PATH (data/flux), DATA_JSON
# (data/rl_embeddings/index.json), EVAL_DATA_JSON (optional), HPS_CKPT_DIR (hps_ckpt), REWARD (hps=1.0), H, W (720),
# MASTER_PORT (29517). Extra arguments go to every method's trainer (after the harness's flags, so they win).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh

MODEL="${MODEL:-toy}"
ITERATIONS="${ITERATIONS:-100}"
METHODS="${METHODS:-all}"
NUM_THREADS="${NUM_THREADS:-1}"
bg_bool SKIP_SETUP 0
bg_require_int NUM_THREADS
bg_check_inputs  # before env_setup.sh: a bad variable installs nothing
[[ "$SKIP_SETUP" == 1 ]] || bash env_setup.sh
bg_python
[[ "$ITERATIONS" =~ ^[1-9][0-9]*$ ]] || { echo "error: ITERATIONS must be a positive integer, got '$ITERATIONS'" >&2; BG_MISSING=1; }
[[ -z "${EVAL_EVERY:-}" || "${EVAL_EVERY}" =~ ^[1-9][0-9]*$ ]] || { echo "error: EVAL_EVERY must be a positive integer" >&2; BG_MISSING=1; }

ARGS=(--model "$MODEL" --iterations "$ITERATIONS" --methods "$METHODS" --num_threads "$NUM_THREADS")
[[ -z "${SEEDS:-}" || "${SEEDS}" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  { echo "error: SEEDS must be a comma list of integers, got '$SEEDS'" >&2; BG_MISSING=1; }
[[ -n "${EVAL_EVERY:-}" ]] && ARGS+=(--eval_every "$EVAL_EVERY")
[[ -n "${SEEDS:-}" ]] && ARGS+=(--seeds "$SEEDS")
TRAINER_ARGS=()
case "$MODEL" in
  toy)
    OUTPUT_DIR="${OUTPUT_DIR:-outputs/compare}" ;;
  toy_edit)
    OUTPUT_DIR="${OUTPUT_DIR:-outputs/compare_toy_edit}" ;;
  flux)
    OUTPUT_DIR="${OUTPUT_DIR:-outputs/compare_flux}"
    NPROC="${NPROC:-8}"
    MODEL_PATH="${MODEL_PATH:-data/flux}"
    DATA_JSON="${DATA_JSON:-data/rl_embeddings/index.json}"
    HPS_CKPT_DIR="${HPS_CKPT_DIR:-hps_ckpt}"
    REWARD="${REWARD:-hps=1.0}"
    bg_require_dir "$MODEL_PATH" "MODEL_PATH: put FLUX.1-dev there in diffusers layout (docs/flux.md)"
    bg_require_file "$DATA_JSON" "DATA_JSON: run scripts/preprocess/preprocess_flux_rl_embeddings.sh first"
    [[ "$REWARD" == *hps* ]] && bg_require_file "$HPS_CKPT_DIR/HPS_v2.1_compressed.pt" \
      "HPS_CKPT_DIR: HPS-v2.1 checkpoint missing (hps_ckpt/README.md)"
    [[ -n "${EVAL_DATA_JSON:-}" ]] && bg_require_file "$EVAL_DATA_JSON" "EVAL_DATA_JSON not found"
    ARGS+=(--launcher torchrun --nproc "$NPROC")
    TRAINER_ARGS+=(--pretrained_model_name_or_path "$MODEL_PATH" --data_json_path "$DATA_JSON"
                   --reward "$REWARD" --reward_model_dir "$HPS_CKPT_DIR" --h "${H:-720}" --w "${W:-720}")
    [[ -n "${EVAL_DATA_JSON:-}" ]] && TRAINER_ARGS+=(--eval_data_json_path "$EVAL_DATA_JSON")
    export MASTER_PORT="${MASTER_PORT:-29517}" TOKENIZERS_PARALLELISM=false ;;
  *) echo "error: MODEL must be toy, toy_edit or flux (got '$MODEL')" >&2; BG_MISSING=1 ;;
esac
bg_check_inputs

echo "[compare] $MODEL, $ITERATIONS iterations per method, methods: $METHODS -> ${OUTPUT_DIR}"
"$PY" -m branchgrpo.cli.compare "${ARGS[@]}" --output_dir "$OUTPUT_DIR" -- "${TRAINER_ARGS[@]}" "$@"
