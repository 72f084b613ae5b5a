# Shared by the launchers (source it; it defines functions only).
#   bg_python            -> sets PY: $PYTHON, else the repo's .venv, else python3 on PATH
#   bg_launch ARGS...    -> runs `python -m ARGS` under torchrun with NPROC processes per node (plain python when
#                           NPROC=1 and NNODES=1); multi-node through torchrun's standard variables:
#                           NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
#   bg_require_file / bg_require_dir PATH WHAT  -> record a missing input; bg_check_inputs exits 2 if any
BG_MISSING=0

bg_python() {
  if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
  elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"
  else PY="$(command -v python3 || command -v python)"; fi
  export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

bg_require_file() { [[ -f "$1" ]] || { echo "error: $2 ($1 not found)" >&2; BG_MISSING=1; }; }
bg_require_dir() { [[ -d "$1" ]] || { echo "error: $2 ($1 not found)" >&2; BG_MISSING=1; }; }
bg_check_inputs() {
  [[ "${NPROC:-1}" =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC must be a positive integer, got '${NPROC:-}'" >&2; BG_MISSING=1; }
  [[ "$BG_MISSING" == 0 ]] || exit 2
}

bg_launch() {
  local nproc="${NPROC:-1}" nnodes="${NNODES:-1}"
  if [[ "$nproc" == 1 && "$nnodes" == 1 ]]; then
    "$PY" -m "$@"
  else
    "$PY" -m torch.distributed.run --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$nproc" \
      --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29517}" -m "$@"
  fi
}

# BranchGRPO variants of the paper's table -> trainer flags (appended to ALGO_ARGS); VARIANT=base|widpru|deppru|mix
bg_branchgrpo_variant() {
  case "$1" in
    base) ;;
    widpru) ALGO_ARGS+=(--width_pruning_mode 1) ;;
    deppru) ALGO_ARGS+=(--depth_pruning 15,16,17,18 --depth_pruning_slide --depth_pruning_slide_interval 30
                        --depth_pruning_stop_depth 9) ;;
    mix) ALGO_ARGS+=(--mix_ode_sde_tree --mix_sde_window_size 4 --mix_window_interval 30) ;;
    *) echo "error: VARIANT must be base, widpru, deppru or mix (got '$1')" >&2; exit 2 ;;
  esac
}
