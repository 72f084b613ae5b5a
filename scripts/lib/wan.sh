# Shared body of the Wan2.1 launchers (like scripts/lib/flux.sh): documented defaults, input checks, torchrun.
# The sourcing launcher sets NAME and ALGO_ARGS, and for image-to-video WAN_BACKBONE=wan_i2v (default wan: the
# defaults below then read data/wan_i2v*, outputs/wan_i2v_*) and WAN_CHECKPOINT (the checkpoint its messages name);
# its own arguments ("$@") come last and win.
#
# Environment (defaults): NPROC (8) per node; NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for multi-node;
# MODEL_PATH (data/$WAN_BACKBONE: Wan2.1-T2V-1.3B, or Wan2.1-I2V-14B-480P, in diffusers layout);
# DATA_JSON (data/${WAN_BACKBONE}_embeddings/index.json);
# EVAL_DATA_JSON (optional); HPS_CKPT_DIR (hps_ckpt: reward checkpoints, VideoReward/ for VideoAlign);
# REWARD (videoalign=1.0, i.e. VideoAlign motion quality, the paper's video reward);
# OUTPUT_DIR (outputs/${WAN_BACKBONE}_$NAME);
# H (480), W (832), FRAMES (33 = 4k + 1); GUIDANCE (5.0, classifier-free guidance in rollout and training); SHIFT (3);
# TRAIN_BATCH_SIZE (1 prompt per GPU); LR (1e-5); MAX_STEPS (300); MICRO (2); GRAD_ACCUM (4); ROLLOUT_BATCH (4);
# USE_LORA (0; 1 adds --use_lora: booleans are 1/true/yes/on or 0/false/no/off, anything else is refused);
# LORA_RANK (64), LORA_ALPHA (128); PYTHON.
source "$REPO_ROOT/scripts/lib/common.sh"

WAN_BACKBONE="${WAN_BACKBONE:-wan}"
WAN_CHECKPOINT="${WAN_CHECKPOINT:-Wan2.1-T2V-1.3B}"
NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/$WAN_BACKBONE}"
DATA_JSON="${DATA_JSON:-data/${WAN_BACKBONE}_embeddings/index.json}"
HPS_CKPT_DIR="${HPS_CKPT_DIR:-hps_ckpt}"
REWARD="${REWARD:-videoalign=1.0}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/${WAN_BACKBONE}_${NAME}}"

bg_bool USE_LORA 0
bg_require_int H W FRAMES TRAIN_BATCH_SIZE MAX_STEPS MICRO GRAD_ACCUM ROLLOUT_BATCH LORA_RANK
bg_require_number GUIDANCE GUIDANCE_2 SHIFT LR MAX_GRAD_NORM LORA_ALPHA  # GUIDANCE_2: scripts/lib/wan22.sh
bg_python
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put $WAN_CHECKPOINT there in diffusers layout (docs/wan.md)"
bg_require_parts "$MODEL_PATH" docs/wan.md transformer vae
bg_require_file "$DATA_JSON" "DATA_JSON: run scripts/preprocess/preprocess_${WAN_BACKBONE}_rl_embeddings.sh first"
if [[ "$REWARD" == *videoalign* ]]; then
  bg_require_dir "$HPS_CKPT_DIR/VideoReward" "HPS_CKPT_DIR: VideoAlign checkpoint folder VideoReward/ missing (docs/wan.md)"
fi
[[ -n "${EVAL_DATA_JSON:-}" ]] && bg_require_file "$EVAL_DATA_JSON" "EVAL_DATA_JSON not found"
bg_check_inputs

COMMON_ARGS=(
  --model "$WAN_BACKBONE" --pretrained_model_name_or_path "$MODEL_PATH" --data_json_path "$DATA_JSON"
  --reward "$REWARD" --reward_model_dir "$HPS_CKPT_DIR" --output_dir "$OUTPUT_DIR"
  --h "${H:-480}" --w "${W:-832}" --num_frames "${FRAMES:-33}" --guidance_scale "${GUIDANCE:-5.0}"
  --shift "${SHIFT:-3}" --seed 42 --train_batch_size "${TRAIN_BATCH_SIZE:-1}" --learning_rate "${LR:-1e-5}"
  --weight_decay 1e-4 --max_train_steps "${MAX_STEPS:-300}" --max_grad_norm "${MAX_GRAD_NORM:-1.0}"
  --adv_clip_max 5 --clip_range 1e-3 --rollout_batch_size "${ROLLOUT_BATCH:-4}"
  --train_micro_batch_size "${MICRO:-2}" --gradient_accumulation_steps "${GRAD_ACCUM:-4}" --reward_batch_size 1
  --gradient_checkpointing --mixed_precision bf16 --allow_tf32 --parallel fsdp
  --checkpointing_steps 25 --validation_steps 25 --num_eval_prompts 4 --eval_samples_per_prompt 1
  --save_rollout_samples 10
)
[[ -n "${EVAL_DATA_JSON:-}" ]] && COMMON_ARGS+=(--eval_data_json_path "$EVAL_DATA_JSON")
[[ "$USE_LORA" == 1 ]] && COMMON_ARGS+=(--use_lora --lora_rank "${LORA_RANK:-64}" --lora_alpha "${LORA_ALPHA:-128}")

export TOKENIZERS_PARALLELISM=false
echo "[$NAME] $NPROC process(es) x ${NNODES:-1} node(s) -> $OUTPUT_DIR"
bg_launch branchgrpo.cli.train "${COMMON_ARGS[@]}" "${ALGO_ARGS[@]}" "$@"
