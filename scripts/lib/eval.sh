# What every scripts/eval/eval_<model>.sh shares: the checkpoint to evaluate and its output folder's name, the checks
# of CHECKPOINT, USE_EMA and HPS_CKPT_DIR, and the command. Source after scripts/lib/common.sh.
#
#   bg_eval_setup KIND              # KIND names outputs/eval/KIND_<checkpoint name or base>; sets PROMPTS,
#                                   # HPS_CKPT_DIR, CHECKPOINT, USE_EMA, NAME, OUTPUT_DIR from the environment
#   ... the script's own checks (bg_require_*), then:
#   bg_eval_check_checkpoint        # CHECKPOINT exists, USE_EMA=1 has one, HPS_CKPT_DIR (a warning)
#   bg_eval_run KIND "${ARGS[@]}" -- "$@"   # + --checkpoint / --use_ema / --save_images, then the eval CLI

bg_eval_setup() {
  PROMPTS="${PROMPTS:-assets/prompts.txt}"
  HPS_CKPT_DIR="${HPS_CKPT_DIR:-hps_ckpt}"
  CHECKPOINT="${CHECKPOINT:-}"
  bg_bool USE_EMA 0
  NAME="base"
  [[ -n "$CHECKPOINT" ]] && NAME="$(basename "$(dirname "$(dirname "$CHECKPOINT")")")_$(basename "$CHECKPOINT")"
  [[ "$USE_EMA" == 1 ]] && NAME="${NAME}_ema"
  OUTPUT_DIR="${OUTPUT_DIR:-outputs/eval/$1_${NAME}}"
}

bg_eval_check_checkpoint() {
  if [[ -n "$CHECKPOINT" && ! -e "$CHECKPOINT" ]]; then
    echo "error: CHECKPOINT=$CHECKPOINT not found" >&2; BG_MISSING=1
  fi
  if [[ "$USE_EMA" == 1 && -z "$CHECKPOINT" ]]; then
    echo "error: USE_EMA=1 needs CHECKPOINT" >&2; BG_MISSING=1
  fi
  [[ -d "$HPS_CKPT_DIR" ]] || echo "warning: HPS_CKPT_DIR=$HPS_CKPT_DIR not found: every reward with a checkpoint" \
    "will be skipped" >&2
}

bg_eval_run() {
  local kind="$1"; shift
  local args=()
  while [[ $# -gt 0 && "$1" != -- ]]; do args+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift  # the --
  [[ -n "$CHECKPOINT" ]] && args+=(--checkpoint "$CHECKPOINT")
  [[ "$USE_EMA" == 1 ]] && args+=(--use_ema)
  [[ -n "${SAVE_IMAGES:-}" ]] && args+=(--save_images "$SAVE_IMAGES")
  export TOKENIZERS_PARALLELISM=false
  echo "[eval $kind] $NAME -> $OUTPUT_DIR"
  exec "$PY" -m branchgrpo.cli.eval "${args[@]}" "$@"
}
