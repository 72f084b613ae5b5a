# Shared by the launchers (source it; it defines functions only).
#   bg_python            -> sets PY: $PYTHON, else the repo's .venv, else python3 on PATH
#   bg_launch ARGS...    -> runs `python -m ARGS` under torchrun with NPROC processes per node (plain python when
#                           NPROC=1 and NNODES=1); multi-node through torchrun's standard variables:
#                           NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT. Under torchrun every rank's output is
#                           shown with a "[rank N]:" prefix and kept in LOG_DIR (default: a new folder under
#                           $TMPDIR or /tmp); when a rank fails, the output ends with where its log is and its first
#                           error line (torchrun's ChildFailedError report comes before them). Exit code: torchrun's.
#                           It must be the launcher's last command. Stop signals reach every process: one process
#                           replaces the shell (`exec`), so SIGTERM/SIGINT to the launcher's pid reach the trainer;
#                           under torchrun the shell forwards SIGTERM/SIGINT to torchrun, which forwards them to
#                           every rank and waits TORCHRUN_GRACE_S (300) seconds for them to write their checkpoint
#                           before it SIGKILLs them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; torch versions without it: 30 s).
#                           A run that torchrun stopped for a signal exits 128 + the signal's number (143: SIGTERM).
#   bg_require_file / bg_require_dir PATH WHAT  -> record a missing input; bg_check_inputs exits 2 if any
#   bg_bool NAME DEFAULT -> the boolean variable NAME as 1 or 0, in place: 1, true, yes, on / 0, false, no, off (any
#                           case); unset or empty: DEFAULT; anything else exits 2 with one line naming NAME
#   bg_require_int NAME... / bg_require_number NAME... -> record each variable that is set but is not an integer
#                           (>= 0) / a number (bg_check_inputs exits 2), so that H=abc is named as H, not as --h
# bg_check_inputs also checks the torchrun variables: NPROC and NNODES positive integers, NODE_RANK below NNODES,
# MASTER_PORT a port number.
BG_MISSING=0

bg_python() {
  if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
  elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"
  else PY="$(command -v python3 || command -v python)"; fi
  export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

bg_require_file() { [[ -f "$1" ]] || { echo "error: $2 ($1 not found)" >&2; BG_MISSING=1; }; }
bg_require_dir() { [[ -d "$1" ]] || { echo "error: $2 ($1 not found)" >&2; BG_MISSING=1; }; }
# bg_require_parts DIR DOC PART...: each PART (file or folder) of a diffusers-layout checkpoint folder exists in DIR
# (checked only when DIR exists; its absence is bg_require_dir's to report); DOC names where the layout is described.
bg_require_parts() {
  local dir="$1" doc="$2" part
  shift 2
  [[ -d "$dir" ]] || return 0
  for part in "$@"; do
    [[ -e "$dir/$part" ]] || { echo "error: MODEL_PATH=$dir lacks $part (diffusers layout expected, $doc)" >&2; BG_MISSING=1; }
  done
}
bg_bool() {
  local name="$1" value="${!1:-$2}"
  case "${value,,}" in
    1|true|yes|on) printf -v "$name" 1 ;;
    0|false|no|off) printf -v "$name" 0 ;;
    *) echo "error: $name must be a boolean (1, true, yes, on or 0, false, no, off), got '$value'" >&2; exit 2 ;;
  esac
}
bg_require_int() {
  local name
  for name in "$@"; do
    [[ -z "${!name:-}" || "${!name}" =~ ^[0-9]+$ ]] \
      || { echo "error: $name must be an integer (>= 0), got '${!name}'" >&2; BG_MISSING=1; }
  done
}
bg_require_number() {
  local name
  for name in "$@"; do
    [[ -z "${!name:-}" || "${!name}" =~ ^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$ ]] \
      || { echo "error: $name must be a number, got '${!name}'" >&2; BG_MISSING=1; }
  done
}
bg_check_inputs() {
  local name
  for name in NPROC NNODES; do
    [[ "${!name:-1}" =~ ^[1-9][0-9]*$ ]] || { echo "error: $name must be a positive integer, got '${!name:-}'" >&2; BG_MISSING=1; }
  done
  if [[ ! "${NODE_RANK:-0}" =~ ^[0-9]+$ ]]; then
    echo "error: NODE_RANK must be an integer >= 0, got '${NODE_RANK:-}'" >&2; BG_MISSING=1
  elif [[ "${NNODES:-1}" =~ ^[1-9][0-9]*$ ]] && (( 10#${NODE_RANK:-0} >= 10#${NNODES:-1} )); then
    echo "error: NODE_RANK must be below NNODES (${NNODES:-1}), got '$NODE_RANK'" >&2; BG_MISSING=1
  fi
  [[ "${MASTER_PORT:-29517}" =~ ^[1-9][0-9]{0,4}$ ]] && (( ${MASTER_PORT:-29517} <= 65535 )) \
    || { echo "error: MASTER_PORT must be a port number (1-65535), got '${MASTER_PORT:-}'" >&2; BG_MISSING=1; }
  [[ "$BG_MISSING" == 0 ]] || exit 2
}

bg_launch() {
  local nproc="${NPROC:-1}" nnodes="${NNODES:-1}"
  if [[ "$nproc" == 1 && "$nnodes" == 1 ]]; then
    exec "$PY" -m "$@"  # the trainer takes the shell's pid: a signal to the launcher is a signal to it
  fi
  local log_dir="${LOG_DIR:-}" rc=0 err_fd tee_pid pid signalled=""
  if [[ -z "$log_dir" ]]; then log_dir="$(mktemp -d "${TMPDIR:-/tmp}/branchgrpo_logs.XXXXXX")"; fi
  mkdir -p "$log_dir"
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCHRUN_GRACE_S:-${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}}"
  # Every rank's stdout/stderr go to files under $log_dir (and, prefixed, to the console); torchrun's own stderr is
  # kept too, for the rank it names as the first failure. The tee ignores stop signals: it ends with torchrun's
  # output, so that what the ranks say while they checkpoint still reaches the console.
  exec {err_fd}> >(trap '' INT TERM; exec tee "$log_dir/torchrun.stderr" >&2)
  tee_pid=$!
  "$PY" -m torch.distributed.run --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$nproc" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29517}" \
    --log-dir "$log_dir" --redirects 3 --tee 3 --log-line-prefix-template '[rank ${rank}]: ' \
    -m "$@" 2>&"$err_fd" &
  pid=$!
  trap 'signalled=15; kill -TERM "$pid" 2>/dev/null || true' TERM
  trap 'signalled=2; kill -INT "$pid" 2>/dev/null || true' INT
  while :; do  # a trapped signal interrupts `wait`: forward it (the trap), then wait again
    rc=0; wait "$pid" || rc=$?
    if (( rc > 128 )) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if (( rc > 128 )) && [[ -n "$signalled" ]]; then rc=0; wait "$pid" || rc=$?; fi  # torchrun's own status
  trap - TERM INT
  exec {err_fd}>&-
  wait "$tee_pid" 2>/dev/null || true  # torchrun's report is complete on the console before the summary below
  if [[ -z "$signalled" ]] && (( rc != 0 )); then  # torchrun itself may have received the signal
    signalled="$(sed -n 's/.*Received \(SIG[A-Z]*\|Signals\.SIG[A-Z]*\|[0-9]*\) death signal.*/\1/p' \
      "$log_dir/torchrun.stderr" 2>/dev/null | head -n 1)"
    case "$signalled" in *TERM) signalled=15 ;; *INT) signalled=2 ;; *[!0-9]*) signalled=15 ;; esac
  fi
  if [[ -n "$signalled" ]] && (( rc != 0 )); then
    echo "[bg_launch] torchrun stopped by signal $signalled: each rank wrote a checkpoint before exiting (their logs" \
      "under $log_dir say which); continue with --resume_from_checkpoint latest" >&2
    return $(( 128 + signalled ))
  fi
  if (( rc != 0 )); then bg_report_failure "$log_dir"; fi
  return "$rc"
}

# After a failed torchrun: where the failing rank's log is and its first error line, as the last lines of output.
# The rank is the one torchrun reports as "Root Cause (first observed failure)"; its first error line is the first
# `error: ...` line (the entry points' one-line input errors), else the exception line that ends its traceback.
bg_report_failure() {
  local log_dir="$1" local_rank rank log line
  read -r rank local_rank < <(awk '/Root Cause/ {found = 1}
    found && /rank *:/ {gsub(/[():]/, " "); for (i = 1; i <= NF; i++) { if ($i == "rank") r = $(i + 1);
      if ($i == "local_rank") { print r, $(i + 1); exit } } }' "$log_dir/torchrun.stderr" 2>/dev/null) || true
  local_rank="${local_rank:-0}"
  log="$(ls -d "$log_dir"/*/attempt_*/"$local_rank"/stderr.log 2>/dev/null | sort -V | tail -n 1)"
  if [[ -z "$log" || ! -s "$log" ]]; then
    echo "[bg_launch] rank ${rank:-?} failed without output on stderr; torchrun's report: $log_dir/torchrun.stderr" >&2
    return
  fi
  line="$(grep -m 1 '^error: ' "$log" || true)"
  [[ -n "$line" ]] || line="$(grep -E '^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt|Exit)(:|$)' "$log" | tail -n 1 || true)"
  [[ -n "$line" ]] || line="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)"
  echo "[bg_launch] rank ${rank:-$local_rank} failed first; its full log: $log" >&2
  echo "$line" >&2
}

# DanceGRPO's group for a launcher: GENERATIONS (the backbone's default; NUM_GENERATIONS overrides it) independent
# SDE trajectories per prompt over STEPS sampling steps, eta 0.3, the dance kernel, one shared initial noise, the
# first TF (1.0) of the steps trained, then the arguments given (a backbone's additions); sets ALGO_ARGS and NAME.
bg_dancegrpo_group() {
  local generations="$1" steps="$2"; shift 2
  TF="${TF:-1.0}"
  ALGO_ARGS=(--algo dancegrpo --sampling_steps "$steps" --num_generations "${NUM_GENERATIONS:-$generations}" --eta 0.3
             --sde_kernel dance --timestep_fraction "$TF" --init_same_noise "$@")
  NAME="dancegrpo_tf${TF}"
}

# The paper's BranchGRPO tree for a launcher: 20 steps, splits SPLIT_POINTS (0,3,6,9: 16 leaves per prompt), K = 2,
# eta 0.3, the dance kernel, one shared initial noise per prompt, then the arguments given (a backbone's additions)
# and VARIANT's flags (base | widpru | deppru | mix, the paper's variants); sets ALGO_ARGS and NAME.
bg_branchgrpo_tree() {
  VARIANT="${VARIANT:-base}"
  ALGO_ARGS=(--algo branchgrpo --sampling_steps 20 --tree_split_points "${SPLIT_POINTS:-0,3,6,9}" --branch_factor 2
             --eta 0.3 --sde_kernel dance --init_same_noise "$@")
  case "$VARIANT" in
    base) ;;
    widpru) ALGO_ARGS+=(--width_pruning_mode 1) ;;
    deppru) ALGO_ARGS+=(--depth_pruning 15,16,17,18 --depth_pruning_slide --depth_pruning_slide_interval 30
                        --depth_pruning_stop_depth 9) ;;
    mix) ALGO_ARGS+=(--mix_ode_sde_tree --mix_sde_window_size 4 --mix_window_interval 30) ;;
    *) echo "error: VARIANT must be base, widpru, deppru or mix (got '$VARIANT')" >&2; exit 2 ;;
  esac
  NAME="branchgrpo_${VARIANT}"
}
