#!/usr/bin/env bash
# Evaluate FLUX.1-dev (base, or one of our checkpoints) on a prompt file: fixed seeds, the deterministic ODE sampler,
# every reward whose checkpoint is in HPS_CKPT_DIR (HPS-v2.1, PickScore, CLIP score, ImageReward; absent ones are
# skipped with a message). One process, one GPU. See docs/evaluation.md.
#
#   bash scripts/eval/eval_flux.sh                                                    # base FLUX.1-dev
#   CHECKPOINT=outputs/flux_branchgrpo_base/checkpoints/checkpoint-300 USE_EMA=1 bash scripts/eval/eval_flux.sh
#   SAVE_IMAGES=outputs/eval/branchgrpo_png bash scripts/eval/eval_flux.sh --num_prompts 100   # PNGs for diversity_cli
#   SUITE=geneval SUITE_PATH=geneval/prompts/evaluation_metadata.jsonl bash scripts/eval/eval_flux.sh  # per-task table
#
# Environment (defaults): MODEL_PATH (data/flux, diffusers layout); CHECKPOINT (none: the base model; a
# checkpoint-N folder, a run's output dir, or a weights folder); USE_EMA (0; 1 evaluates ema/); PROMPTS
# (assets/prompts.txt); NUM_PROMPTS (0 = all); SAMPLES (4 seeds per prompt); SEED (1234); STEPS (20);
# GUIDANCE (3.5); H, W (720); SHIFT (3); TIME_SHIFT (static); HPS_CKPT_DIR (hps_ckpt); REWARDS (all);
# OUTPUT_DIR (outputs/eval/flux_<checkpoint name or base>); SAVE_IMAGES (unset: no per-sample PNGs); SUITE
# (unset; geneval | ocr | drawbench | hpsv2: the suite's prompts from SUITE_PATH instead of PROMPTS, REWARDS default
# the suite's own, NUM_PROMPTS per task); PYTHON.
# Extra arguments are passed to `python -m branchgrpo.cli.eval` and win over the defaults.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
source scripts/lib/eval.sh

MODEL_PATH="${MODEL_PATH:-data/flux}"
bg_eval_setup flux

bg_require_int NUM_PROMPTS SAMPLES SEED STEPS H W FRAMES
bg_require_number GUIDANCE SHIFT
bg_python
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put FLUX.1-dev there in diffusers layout (docs/flux.md)"
bg_require_parts "$MODEL_PATH" docs/flux.md vae text_encoder text_encoder_2 tokenizer tokenizer_2
SUITE="${SUITE:-}"
if [[ -n "$SUITE" ]]; then
  [[ -e "${SUITE_PATH:-}" ]] || { echo "error: SUITE=$SUITE needs SUITE_PATH, its prompt file or folder (docs/evaluation.md)" >&2; BG_MISSING=1; }
  PROMPT_ARGS=(--suite "$SUITE" --suite_path "${SUITE_PATH:-}")
  REWARDS="${REWARDS:-default}"
else
  bg_require_file "$PROMPTS" "PROMPTS: a prompt file, one prompt per line"
  PROMPT_ARGS=(--prompts "$PROMPTS")
fi
bg_eval_check_checkpoint
bg_check_inputs

ARGS=(
  --model flux --pretrained_model_name_or_path "$MODEL_PATH" "${PROMPT_ARGS[@]}"
  --num_prompts "${NUM_PROMPTS:-0}" --samples_per_prompt "${SAMPLES:-4}" --seed "${SEED:-1234}"
  --steps "${STEPS:-20}" --guidance_scale "${GUIDANCE:-3.5}" --h "${H:-720}" --w "${W:-720}"
  --shift "${SHIFT:-3}" --time_shift "${TIME_SHIFT:-static}"
  --rewards "${REWARDS:-all}" --reward_model_dir "$HPS_CKPT_DIR" --output_dir "$OUTPUT_DIR"
)

bg_eval_run flux "${ARGS[@]}" -- "$@"
