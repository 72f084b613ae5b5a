#!/usr/bin/env bash
# Evaluate Stable Diffusion 3.5 Medium or Large (base, or one of our checkpoints) on a prompt file at the peers'
# evaluation settings (40 steps, CFG 4.5, 512 x 512, shift 3): fixed seeds, the deterministic ODE sampler, every reward
# whose checkpoint is in HPS_CKPT_DIR (HPS-v2.1, PickScore, CLIP score, ImageReward; absent ones are skipped with a
# message). One process, one GPU. See docs/sd3.md and docs/evaluation.md.
#
#   bash scripts/eval/eval_sd3.sh                                                     # base SD3.5
#   CHECKPOINT=outputs/sd3_branchgrpo_base/checkpoints/checkpoint-300 USE_EMA=1 bash scripts/eval/eval_sd3.sh
#
# Environment (defaults): MODEL_PATH (data/sd3, diffusers layout); CHECKPOINT (none: the base model; a checkpoint-N
# folder, a run's output dir, or a weights folder); USE_EMA (0; 1 evaluates ema/); PROMPTS (assets/prompts.txt);
# NUM_PROMPTS (0 = all); SAMPLES (4 seeds per prompt); SEED (1234); STEPS (40); GUIDANCE (4.5); H, W (512); SHIFT (3);
# T5_SEQUENCE_LENGTH (128: use the one the run's embeddings were encoded with); NEGATIVE_PROMPT (empty); SKIP_LAYERS
# (unset: plain CFG; e.g. 7,8,9: skip-layer guidance on those layers, SLG_SCALE 2.8);
# HPS_CKPT_DIR (hps_ckpt); REWARDS (all); OUTPUT_DIR (outputs/eval/sd3_<checkpoint name or base>); SAVE_IMAGES
# (unset: no per-sample PNGs); PYTHON. Extra arguments are passed to `python -m branchgrpo.cli.eval` and win.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
source scripts/lib/eval.sh

MODEL_PATH="${MODEL_PATH:-data/sd3}"
bg_eval_setup sd3

bg_require_int NUM_PROMPTS SAMPLES SEED STEPS H W T5_SEQUENCE_LENGTH
bg_require_number GUIDANCE SHIFT SLG_SCALE
bg_python
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put Stable Diffusion 3.5 there in diffusers layout (docs/sd3.md)"
bg_require_parts "$MODEL_PATH" docs/sd3.md vae text_encoder text_encoder_2 text_encoder_3 tokenizer tokenizer_2 \
  tokenizer_3
bg_require_file "$PROMPTS" "PROMPTS: a prompt file, one prompt per line"
bg_eval_check_checkpoint
bg_check_inputs

ARGS=(
  --model sd3 --pretrained_model_name_or_path "$MODEL_PATH" --prompts "$PROMPTS"
  --num_prompts "${NUM_PROMPTS:-0}" --samples_per_prompt "${SAMPLES:-4}" --seed "${SEED:-1234}"
  --steps "${STEPS:-40}" --guidance_scale "${GUIDANCE:-4.5}" --h "${H:-512}" --w "${W:-512}" --shift "${SHIFT:-3}"
  --t5_sequence_length "${T5_SEQUENCE_LENGTH:-128}"
  --rewards "${REWARDS:-all}" --reward_model_dir "$HPS_CKPT_DIR" --output_dir "$OUTPUT_DIR"
)
[[ -n "${NEGATIVE_PROMPT:-}" ]] && ARGS+=(--negative_prompt "$NEGATIVE_PROMPT")
[[ -n "${SKIP_LAYERS:-}" ]] && ARGS+=(--skip_layer_guidance "$SKIP_LAYERS"
                                     --skip_layer_guidance_scale "${SLG_SCALE:-2.8}")

bg_eval_run sd3 "${ARGS[@]}" -- "$@"
