#!/usr/bin/env bash
# Set up (or refresh) branchgrpo's Python environment. Idempotent: a second run with unchanged requirements is a
# no-op apart from an import check.
#
#   bash env_setup.sh                      create/refresh .venv in the repository (default)
#   USE_ACTIVE_ENV=1 bash env_setup.sh     install into the python on PATH (an activated venv or conda env)
#   PYTHON=python3.11 bash env_setup.sh    which interpreter creates .venv
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash env_setup.sh
#                                          CUDA nodes: take torch/torchvision from that index first
#   FORCE=1 bash env_setup.sh              reinstall even if nothing changed
#   WITH_REWARDS=1 bash env_setup.sh       also the optional rewards' packages (requirements-rewards.txt: OCR, VLM
#                                          judge); the test command sets it, since their tests need them
#
# No conda activation, no personal paths: callers run "$REPO/.venv/bin/python" (the launchers do this).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"
source scripts/lib/common.sh
bg_bool USE_ACTIVE_ENV 0
bg_bool FORCE 0
bg_bool WITH_REWARDS 0

if [[ "$USE_ACTIVE_ENV" == 1 ]]; then
  PY="$(command -v python || command -v python3)"
  STAMP_DIR="$REPO/.branchgrpo_env"
else
  if [[ ! -x "$REPO/.venv/bin/python" ]]; then
    echo "[env_setup] creating $REPO/.venv"
    "${PYTHON:-python3}" -m venv "$REPO/.venv"
  fi
  PY="$REPO/.venv/bin/python"
  STAMP_DIR="$REPO/.venv"
fi

want="$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)-${TORCH_INDEX_URL:-}"
stamp="$STAMP_DIR/.branchgrpo-setup"
want_rewards="$(sha256sum < requirements-rewards.txt | cut -d' ' -f1)"
stamp_rewards="$STAMP_DIR/.branchgrpo-setup-rewards"  # written once the optional rewards' packages are in
stamped() { [[ "$FORCE" != 1 && -f "$1" && "$(cat "$1")" == "$2" ]]; }

if stamped "$stamp" "$want" && "$PY" -c "import branchgrpo, torch, diffusers, transformers, open_clip" 2>/dev/null; then
  echo "[env_setup] environment up to date ($PY)"
else
  echo "[env_setup] installing into $PY"
  "$PY" -m pip install --quiet --upgrade pip setuptools wheel
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "$PY" -m pip install --quiet torch torchvision --index-url "$TORCH_INDEX_URL"
  fi
  "$PY" -m pip install --quiet -r requirements.txt
  "$PY" -m pip install --quiet --no-deps -e .
  "$PY" - <<'PY'
import torch, diffusers, transformers, open_clip, branchgrpo
cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "CPU only"
print(f"[env_setup] torch {torch.__version__} ({cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, open_clip {open_clip.__version__}, branchgrpo {branchgrpo.__version__}")
PY
  mkdir -p "$STAMP_DIR"
  echo "$want" > "$stamp"
fi

if [[ "$WITH_REWARDS" == 1 ]] && ! stamped "$stamp_rewards" "$want_rewards"; then
  echo "[env_setup] installing the optional rewards' packages (requirements-rewards.txt)"
  "$PY" -m pip install --quiet -r requirements-rewards.txt
  echo "$want_rewards" > "$stamp_rewards"
fi
