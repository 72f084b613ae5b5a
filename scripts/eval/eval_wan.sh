#!/usr/bin/env bash
# Evaluate Wan2.1 text-to-video (base, or one of our checkpoints) on a prompt file: fixed seeds, the deterministic ODE
# sampler, every video reward whose checkpoint is in HPS_CKPT_DIR (VideoAlign; frame_reward on HPS-v2.1; the
# checkpoint-free temporal_consistency; absent ones are skipped with a message). One process, one GPU.
# See docs/evaluation.md and docs/wan.md.
#
#   bash scripts/eval/eval_wan.sh                                                     # base Wan2.1-T2V-1.3B
#   CHECKPOINT=outputs/wan_branchgrpo/checkpoints/checkpoint-300 bash scripts/eval/eval_wan.sh
#   SAVE_IMAGES=outputs/eval/wan_media bash scripts/eval/eval_wan.sh --num_prompts 16  # PNG (middle frame) + MP4
#
# Environment (defaults): MODEL_PATH (data/wan, diffusers layout); CHECKPOINT (none: the base model; a checkpoint-N
# folder, a run's output dir, or a weights folder); USE_EMA (0; 1 evaluates ema/); PROMPTS
# (assets/video_prompts.txt); NUM_PROMPTS (0 = all); SAMPLES (4 seeds per prompt); SEED (1234); STEPS (20);
# GUIDANCE (5.0); H, W (480, 832); FRAMES (33); SHIFT (3); HPS_CKPT_DIR (hps_ckpt); REWARDS (all);
# OUTPUT_DIR (outputs/eval/wan_<checkpoint name or base>); SAVE_IMAGES (unset: no per-sample files); PYTHON.
# Use the training run's sizes, guidance, shift and negative prompt (--negative_prompt). Extra arguments are passed
# to `python -m branchgrpo.cli.eval` and win over the defaults.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
source scripts/lib/eval.sh

WAN_BACKBONE="${WAN_BACKBONE:-wan}"  # wan22: scripts/eval/eval_wan22.sh
WAN_CHECKPOINT="${WAN_CHECKPOINT:-Wan2.1-T2V-1.3B}"
MODEL_PATH="${MODEL_PATH:-data/$WAN_BACKBONE}"
PROMPTS="${PROMPTS:-assets/video_prompts.txt}"
bg_eval_setup "$WAN_BACKBONE"

bg_require_int NUM_PROMPTS SAMPLES SEED STEPS H W FRAMES
bg_require_number GUIDANCE SHIFT
bg_python
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put $WAN_CHECKPOINT there in diffusers layout (${WAN_DOC:-docs/$WAN_BACKBONE.md})"
bg_require_parts "$MODEL_PATH" docs/wan.md transformer vae text_encoder tokenizer
bg_require_file "$PROMPTS" "PROMPTS: a prompt file, one prompt per line"
bg_eval_check_checkpoint
bg_check_inputs

ARGS=(
  --model "$WAN_BACKBONE" --pretrained_model_name_or_path "$MODEL_PATH" --prompts "$PROMPTS"
  --num_prompts "${NUM_PROMPTS:-0}" --samples_per_prompt "${SAMPLES:-4}" --seed "${SEED:-1234}"
  --steps "${STEPS:-20}" --guidance_scale "${GUIDANCE:-5.0}" --h "${H:-480}" --w "${W:-832}"
  --num_frames "${FRAMES:-33}" --shift "${SHIFT:-3}"
  --rewards "${REWARDS:-all}" --reward_model_dir "$HPS_CKPT_DIR" --output_dir "$OUTPUT_DIR"
)

bg_eval_run "$WAN_BACKBONE" "${ARGS[@]}" -- "$@"
