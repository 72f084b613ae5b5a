# Shared body of the Stable Diffusion 3.5 launchers (like scripts/lib/flux.sh): documented defaults, input checks,
# torchrun. The sourcing launcher sets NAME and ALGO_ARGS (its algorithm's flags) before sourcing; everything here can
# be overridden by environment variables, and the launcher's own arguments ("$@") come last, so they win.
#
# The defaults follow the SD3.5 recipes of the peers (Flow-GRPO): 512 x 512, classifier-free guidance 4.5 with the
# empty negative prompt in rollout and training, 10 sampling steps, static shift 3, LoRA rank 32 / alpha 64 at lr 3e-4
# (USE_LORA=0: a full fine-tune, lr 1e-5). Medium or Large is whatever MODEL_PATH holds (docs/sd3.md).
#
# Environment (defaults): NPROC (8) per node; NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29517);
# MODEL_PATH (data/sd3, diffusers layout); DATA_JSON (data/sd3_embeddings/index.json); EVAL_DATA_JSON (optional);
# HPS_CKPT_DIR (hps_ckpt, holding HPS_v2.1_compressed.pt); REWARD (hps=1.0); OUTPUT_DIR (outputs/sd3_$NAME);
# H, W (512); GUIDANCE (4.5); SHIFT (3); TRAIN_BATCH_SIZE (2 prompts per GPU); LR (3e-4 with LoRA, 1e-5 without);
# MAX_STEPS (300); MAX_GRAD_NORM (1.0); MICRO (4 parents per training forward); GRAD_ACCUM (3 micro-batches per
# optimizer step); ROLLOUT_BATCH (8 latents per rollout forward); USE_LORA (1; 0 trains every weight: booleans are
# 1/true/yes/on or 0/false/no/off, anything else is refused); LORA_RANK (32), LORA_ALPHA (64); PYTHON.
source "$REPO_ROOT/scripts/lib/common.sh"

NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/sd3}"
DATA_JSON="${DATA_JSON:-data/sd3_embeddings/index.json}"
HPS_CKPT_DIR="${HPS_CKPT_DIR:-hps_ckpt}"
REWARD="${REWARD:-hps=1.0}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/sd3_${NAME}}"

bg_bool USE_LORA 1
bg_require_int H W TRAIN_BATCH_SIZE MAX_STEPS MICRO GRAD_ACCUM ROLLOUT_BATCH LORA_RANK
bg_require_number GUIDANCE SHIFT LR MAX_GRAD_NORM LORA_ALPHA
bg_python
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put SD3.5 Medium or Large there in diffusers layout (docs/sd3.md)"
bg_require_parts "$MODEL_PATH" docs/sd3.md transformer vae
bg_require_file "$DATA_JSON" "DATA_JSON: run scripts/preprocess/preprocess_sd3_rl_embeddings.sh first"
if [[ "$REWARD" == *hps* ]]; then
  bg_require_file "$HPS_CKPT_DIR/HPS_v2.1_compressed.pt" "HPS_CKPT_DIR: HPS-v2.1 checkpoint missing (hps_ckpt/README.md)"
fi
[[ -n "${EVAL_DATA_JSON:-}" ]] && bg_require_file "$EVAL_DATA_JSON" "EVAL_DATA_JSON not found"
bg_check_inputs

if [[ -z "${LR:-}" ]]; then
  LR=1e-5
  [[ "$USE_LORA" == 1 ]] && LR=3e-4
fi
COMMON_ARGS=(
  --model sd3 --pretrained_model_name_or_path "$MODEL_PATH" --data_json_path "$DATA_JSON"
  --reward "$REWARD" --reward_model_dir "$HPS_CKPT_DIR" --output_dir "$OUTPUT_DIR"
  --h "${H:-512}" --w "${W:-512}" --guidance_scale "${GUIDANCE:-4.5}" --shift "${SHIFT:-3}" --seed 42
  --train_batch_size "${TRAIN_BATCH_SIZE:-2}" --learning_rate "$LR" --weight_decay 1e-4
  --max_train_steps "${MAX_STEPS:-300}" --max_grad_norm "${MAX_GRAD_NORM:-1.0}" --adv_clip_max 5
  --rollout_batch_size "${ROLLOUT_BATCH:-8}" --train_micro_batch_size "${MICRO:-4}"
  --gradient_accumulation_steps "${GRAD_ACCUM:-3}" --reward_batch_size 4
  --gradient_checkpointing --mixed_precision bf16 --allow_tf32 --parallel fsdp
  --use_ema --ema_decay 0.995 --checkpointing_steps 40 --validation_steps 20 --save_rollout_samples 20
)
[[ -n "${EVAL_DATA_JSON:-}" ]] && COMMON_ARGS+=(--eval_data_json_path "$EVAL_DATA_JSON")
[[ "$USE_LORA" == 1 ]] && COMMON_ARGS+=(--use_lora --lora_rank "${LORA_RANK:-32}" --lora_alpha "${LORA_ALPHA:-64}")

export TOKENIZERS_PARALLELISM=false
echo "[$NAME] $NPROC process(es) x $(( ${NNODES:-1} )) node(s) -> $OUTPUT_DIR"
bg_launch branchgrpo.cli.train "${COMMON_ARGS[@]}" "${ALGO_ARGS[@]}" "$@"
