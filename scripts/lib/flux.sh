# Shared body of the FLUX launchers: documented defaults, input checks, then torchrun. The launcher that sources it
# sets ALGO_ARGS (its algorithm's flags) and NAME before sourcing; everything here can be overridden by environment
# variables, and the launcher's own arguments ("$@") are appended last, so they win. The launchers of another
# FLUX-family backbone (FLUX.1-Kontext, scripts/lib/flux_kontext.sh) run these with FLUX_BACKBONE (the --model;
# default flux), FLUX_CHECKPOINT and FLUX_DOC (what the messages name), FLUX_DATA_JSON, FLUX_REWARD and FLUX_SIZE (the
# defaults of DATA_JSON, REWARD and H/W) in the environment and the backbone's own flags before theirs.
#
# Environment (defaults): NPROC (8) per node; NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29517);
# MODEL_PATH (data/flux, diffusers layout); DATA_JSON (data/rl_embeddings/index.json); EVAL_DATA_JSON (optional);
# HPS_CKPT_DIR (hps_ckpt, holding HPS_v2.1_compressed.pt); REWARD (hps=1.0); OUTPUT_DIR (outputs/flux_$NAME);
# H, W (720); TRAIN_BATCH_SIZE (2 prompts per GPU); LR (1e-5); MAX_STEPS (300); MAX_GRAD_NORM (0.01, the paper's
# Table 2); MICRO (4 parents per training forward); GRAD_ACCUM (3 micro-batches per optimizer step);
# ROLLOUT_BATCH (8 latents per rollout forward); USE_LORA (0; 1 adds --use_lora: booleans are 1/true/yes/on or
# 0/false/no/off, anything else is refused); LORA_RANK (32), LORA_ALPHA (64); PYTHON.
source "$REPO_ROOT/scripts/lib/common.sh"

FLUX_BACKBONE="${FLUX_BACKBONE:-flux}"
FLUX_CHECKPOINT="${FLUX_CHECKPOINT:-FLUX.1-dev}"
FLUX_DOC="${FLUX_DOC:-docs/flux.md}"
NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/$FLUX_BACKBONE}"
DATA_JSON="${DATA_JSON:-${FLUX_DATA_JSON:-data/rl_embeddings/index.json}}"
HPS_CKPT_DIR="${HPS_CKPT_DIR:-hps_ckpt}"
REWARD="${REWARD:-${FLUX_REWARD:-hps=1.0}}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/${FLUX_BACKBONE}_${NAME}}"

bg_bool USE_LORA 0
bg_require_int H W TRAIN_BATCH_SIZE MAX_STEPS MICRO GRAD_ACCUM ROLLOUT_BATCH LORA_RANK
bg_require_number LR MAX_GRAD_NORM LORA_ALPHA
bg_python
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put $FLUX_CHECKPOINT there in diffusers layout ($FLUX_DOC)"
bg_require_parts "$MODEL_PATH" "$FLUX_DOC" transformer vae
bg_require_file "$DATA_JSON" "DATA_JSON: run scripts/preprocess/preprocess_${FLUX_BACKBONE}_rl_embeddings.sh first"
if [[ "$REWARD" == *hps* ]]; then
  bg_require_file "$HPS_CKPT_DIR/HPS_v2.1_compressed.pt" "HPS_CKPT_DIR: HPS-v2.1 checkpoint missing (hps_ckpt/README.md)"
fi
[[ -n "${EVAL_DATA_JSON:-}" ]] && bg_require_file "$EVAL_DATA_JSON" "EVAL_DATA_JSON not found"
bg_check_inputs

COMMON_ARGS=(
  --model "$FLUX_BACKBONE" --pretrained_model_name_or_path "$MODEL_PATH" --data_json_path "$DATA_JSON"
  --reward "$REWARD" --reward_model_dir "$HPS_CKPT_DIR" --output_dir "$OUTPUT_DIR"
  --h "${H:-${FLUX_SIZE:-720}}" --w "${W:-${FLUX_SIZE:-720}}" --shift 3 --seed 42 --sampler_seed 1223627
  --train_batch_size "${TRAIN_BATCH_SIZE:-2}" --learning_rate "${LR:-1e-5}" --weight_decay 1e-4
  --max_train_steps "${MAX_STEPS:-300}" --max_grad_norm "${MAX_GRAD_NORM:-0.01}" --adv_clip_max 5
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
