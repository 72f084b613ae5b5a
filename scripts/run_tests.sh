#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite (CPU, offline). Extra arguments go to pytest,
# e.g. `bash scripts/run_tests.sh -k rollout -x`. The tests run on TEST_WORKERS pytest-xdist workers (default: one per
# core, at most 4; 0 runs them in this process), a test file per worker (module fixtures are built once), the
# longest files first (tests/conftest.py; xdist would otherwise start the files with the most tests first).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
source scripts/lib/common.sh
bg_bool USE_ACTIVE_ENV 0
WITH_REWARDS=1 bash env_setup.sh  # the optional rewards' packages too: their tests run, never skip, in CI
PY="$REPO/.venv/bin/python"
[[ "$USE_ACTIVE_ENV" == 1 ]] && PY="$(command -v python || command -v python3)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
WORKERS="${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
PARALLEL=()
[[ "$WORKERS" != "0" ]] && PARALLEL=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder)
exec "$PY" -m pytest "${PARALLEL[@]}" "$@"
