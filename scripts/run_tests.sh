#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite (CPU, offline). Extra arguments go to pytest,
# e.g. `bash scripts/run_tests.sh -k rollout -x`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash env_setup.sh
PY="$REPO/.venv/bin/python"
[[ "${USE_ACTIVE_ENV:-0}" == "1" ]] && PY="$(command -v python || command -v python3)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
exec "$PY" -m pytest "$@"
