# Shared body of the Qwen-Image launchers (like scripts/lib/flux.sh): documented defaults, input checks, torchrun.
# The sourcing launcher sets ALGO_ARGS (its algorithm's flags) and NAME; its own arguments ("$@") come last and win.
# A Qwen-Image-family backbone (Qwen-Image-Edit, scripts/lib/qwen_image_edit.sh) runs these with QWEN_BACKBONE (the
# --model; default qwen_image), QWEN_CHECKPOINT and QWEN_DOC (what the messages name), QWEN_DATA_JSON and QWEN_REWARD
# (its defaults for DATA_JSON and REWARD) set in the environment.
#
# Environment (defaults): NPROC (8) per node; NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for multi-node;
# MODEL_PATH (data/qwen_image: Qwen/Qwen-Image in diffusers layout); DATA_JSON (data/qwen_image_embeddings/index.json);
# EVAL_DATA_JSON (optional); HPS_CKPT_DIR (hps_ckpt, holding HPS_v2.1_compressed.pt); REWARD (hps=1.0);
# OUTPUT_DIR (outputs/qwen_image_$NAME); H, W (512); GUIDANCE (4.0: true CFG with the stored negative prompt, in rollout
# and training; 1 turns it off); TIME_SHIFT (dynamic: the checkpoint's own schedule, exponential shift from the image
# tokens stretched to shift_terminal 0.02; static uses SHIFT, 3); USE_LORA (1: LoRA is how Qwen-Image's 20.4B weights
# are usually aligned; 0 fine-tunes all of them); LORA_RANK (64), LORA_ALPHA (128); LR (3e-4 with LoRA, 1e-5
# without); TRAIN_BATCH_SIZE (1 prompt per GPU); MAX_STEPS (300); MAX_GRAD_NORM (1.0); MICRO (2 parents per training
# forward); GRAD_ACCUM (3 with LoRA; 1 without: a full fine-tune cannot also hold unsharded accumulated gradients on
# 80 GB, docs/qwen_image.md); ROLLOUT_BATCH (4 latents per rollout forward, x2 rows with CFG); booleans are
# 1/true/yes/on or 0/false/no/off, anything else is refused; PYTHON.
source "$REPO_ROOT/scripts/lib/common.sh"

QWEN_BACKBONE="${QWEN_BACKBONE:-qwen_image}"
QWEN_CHECKPOINT="${QWEN_CHECKPOINT:-Qwen/Qwen-Image}"
QWEN_DOC="${QWEN_DOC:-docs/qwen_image.md}"
NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/$QWEN_BACKBONE}"
DATA_JSON="${DATA_JSON:-${QWEN_DATA_JSON:-data/qwen_image_embeddings/index.json}}"
HPS_CKPT_DIR="${HPS_CKPT_DIR:-hps_ckpt}"
REWARD="${REWARD:-${QWEN_REWARD:-hps=1.0}}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/${QWEN_BACKBONE}_${NAME}}"
TIME_SHIFT="${TIME_SHIFT:-dynamic}"

bg_bool USE_LORA 1
bg_require_int H W TRAIN_BATCH_SIZE MAX_STEPS MICRO GRAD_ACCUM ROLLOUT_BATCH LORA_RANK
bg_require_number GUIDANCE SHIFT LR MAX_GRAD_NORM LORA_ALPHA
if [[ "$TIME_SHIFT" != static && "$TIME_SHIFT" != dynamic ]]; then
  echo "error: TIME_SHIFT must be static or dynamic, got '$TIME_SHIFT'" >&2
  exit 2
fi
bg_python
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put $QWEN_CHECKPOINT there in diffusers layout ($QWEN_DOC)"
bg_require_parts "$MODEL_PATH" "$QWEN_DOC" transformer vae
bg_require_file "$DATA_JSON" "DATA_JSON: run scripts/preprocess/preprocess_${QWEN_BACKBONE}_rl_embeddings.sh first"
if [[ "$REWARD" == *hps* ]]; then
  bg_require_file "$HPS_CKPT_DIR/HPS_v2.1_compressed.pt" "HPS_CKPT_DIR: HPS-v2.1 checkpoint missing (hps_ckpt/README.md)"
fi
[[ -n "${EVAL_DATA_JSON:-}" ]] && bg_require_file "$EVAL_DATA_JSON" "EVAL_DATA_JSON not found"
bg_check_inputs

if [[ "$USE_LORA" == 1 ]]; then
  DEFAULT_LR=3e-4 DEFAULT_ACCUM=3
else
  DEFAULT_LR=1e-5 DEFAULT_ACCUM=1
fi
COMMON_ARGS=(
  --model "$QWEN_BACKBONE" --pretrained_model_name_or_path "$MODEL_PATH" --data_json_path "$DATA_JSON"
  --reward "$REWARD" --reward_model_dir "$HPS_CKPT_DIR" --output_dir "$OUTPUT_DIR"
  --h "${H:-512}" --w "${W:-512}" --guidance_scale "${GUIDANCE:-4.0}" --time_shift "$TIME_SHIFT" --shift "${SHIFT:-3}"
  --seed 42 --train_batch_size "${TRAIN_BATCH_SIZE:-1}" --learning_rate "${LR:-$DEFAULT_LR}" --weight_decay 1e-4
  --max_train_steps "${MAX_STEPS:-300}" --max_grad_norm "${MAX_GRAD_NORM:-1.0}" --adv_clip_max 5
  --rollout_batch_size "${ROLLOUT_BATCH:-4}" --train_micro_batch_size "${MICRO:-2}"
  --gradient_accumulation_steps "${GRAD_ACCUM:-$DEFAULT_ACCUM}" --reward_batch_size 4
  --gradient_checkpointing --mixed_precision bf16 --allow_tf32 --parallel fsdp
  --use_ema --ema_decay 0.995 --checkpointing_steps 25 --validation_steps 25 --num_eval_prompts 8
  --eval_samples_per_prompt 2 --save_rollout_samples 10
)
[[ -n "${EVAL_DATA_JSON:-}" ]] && COMMON_ARGS+=(--eval_data_json_path "$EVAL_DATA_JSON")
[[ "$USE_LORA" == 1 ]] && COMMON_ARGS+=(--use_lora --lora_rank "${LORA_RANK:-64}" --lora_alpha "${LORA_ALPHA:-128}")

export TOKENIZERS_PARALLELISM=false
echo "[$NAME] $NPROC process(es) x ${NNODES:-1} node(s) -> $OUTPUT_DIR"
bg_launch branchgrpo.cli.train "${COMMON_ARGS[@]}" "${ALGO_ARGS[@]}" "$@"
