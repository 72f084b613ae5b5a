#!/usr/bin/env bash
# Evaluate Qwen-Image (base, or one of our checkpoints) on a prompt file: fixed seeds, the deterministic ODE sampler,
# every reward whose checkpoint is in HPS_CKPT_DIR (HPS-v2.1, PickScore, CLIP score, ImageReward; absent ones are
# skipped with a message). One process, one GPU. See docs/evaluation.md.
#
#   bash scripts/eval/eval_qwen_image.sh                                                    # base Qwen-Image
#   CHECKPOINT=outputs/qwen_image_branchgrpo_base/checkpoints/checkpoint-300 USE_EMA=1 bash scripts/eval/eval_qwen_image.sh
#   SAVE_IMAGES=outputs/eval/branchgrpo_png bash scripts/eval/eval_qwen_image.sh --num_prompts 100   # PNGs for diversity_cli
#
# Environment (defaults): MODEL_PATH (data/qwen_image, diffusers layout); CHECKPOINT (none: the base model; a
# checkpoint-N folder, a run's output dir, or a weights folder); USE_EMA (0; 1 evaluates ema/); PROMPTS
# (assets/prompts.txt); NUM_PROMPTS (0 = all); SAMPLES (4 seeds per prompt); SEED (1234); STEPS (20);
# GUIDANCE (4.0, true CFG with NEGATIVE_PROMPT, unset: " "); H, W (512, the training launchers'); SHIFT (3);
# TIME_SHIFT (dynamic: the checkpoint's own schedule, as the training launchers use); HPS_CKPT_DIR (hps_ckpt);
# REWARDS (all);
# OUTPUT_DIR (outputs/eval/qwen_image_<checkpoint name or base>); SAVE_IMAGES (unset: no per-sample PNGs); PYTHON.
# Extra arguments are passed to `python -m branchgrpo.cli.eval` and win over the defaults.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
source scripts/lib/eval.sh

MODEL_PATH="${MODEL_PATH:-data/qwen_image}"
bg_eval_setup qwen_image

bg_require_int NUM_PROMPTS SAMPLES SEED STEPS H W FRAMES
bg_require_number GUIDANCE SHIFT
bg_python
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put Qwen/Qwen-Image there in diffusers layout (docs/qwen_image.md)"
bg_require_parts "$MODEL_PATH" docs/qwen_image.md vae text_encoder tokenizer
bg_require_file "$PROMPTS" "PROMPTS: a prompt file, one prompt per line"
bg_eval_check_checkpoint
bg_check_inputs

ARGS=(
  --model qwen_image --pretrained_model_name_or_path "$MODEL_PATH" --prompts "$PROMPTS"
  --num_prompts "${NUM_PROMPTS:-0}" --samples_per_prompt "${SAMPLES:-4}" --seed "${SEED:-1234}"
  --steps "${STEPS:-20}" --guidance_scale "${GUIDANCE:-4.0}" --h "${H:-512}" --w "${W:-512}"
  --shift "${SHIFT:-3}" --time_shift "${TIME_SHIFT:-dynamic}"
  --rewards "${REWARDS:-all}" --reward_model_dir "$HPS_CKPT_DIR" --output_dir "$OUTPUT_DIR"
)
[[ -n "${NEGATIVE_PROMPT+set}" ]] && ARGS+=(--negative_prompt "$NEGATIVE_PROMPT")

bg_eval_run qwen_image "${ARGS[@]}" -- "$@"
