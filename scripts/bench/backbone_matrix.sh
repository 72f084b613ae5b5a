#!/usr/bin/env bash
# Every registered algorithm on every registered backbone that has a tiny checkpoint, measured: per backbone the tiny
# checkpoint, a reward and embeddings once, then one torchrun job of NPROC processes that trains each algorithm for
# ITERATIONS iterations (FSDP2; full model and LoRA) and checks finite loss and rewards, the first ratio at theta_old
# and that the export reloads. Writes matrix.json and matrix.md (pass/fail with the error line, median iteration
# time, commit, load average) to OUTPUT_DIR and prints the table. On the CPU: 12 minutes measured on 2 busy cores.
#
#   bash scripts/bench/backbone_matrix.sh                                # every backbone x every algorithm
#   BACKBONES=sd3,wan22 ALGOS=branchgrpo,diffusion_nft MODES=lora bash scripts/bench/backbone_matrix.sh
#
# Environment (defaults): OUTPUT_DIR (outputs/bench/matrix); BACKBONES, ALGOS (all; comma lists of registered
# names); MODES (both | alternate | full | lora); ITERATIONS (2); NPROC (2, processes per backbone); TIMEOUT_S (1800,
# per backbone); OMP_NUM_THREADS (1); PYTHON. Extra arguments go to python -m branchgrpo.bench.matrix.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_python
ITERATIONS="${ITERATIONS:-2}"
NPROC="${NPROC:-2}"
TIMEOUT_S="${TIMEOUT_S:-1800}"
bg_require_int ITERATIONS
bg_require_number TIMEOUT_S
bg_check_inputs
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
exec "$PY" -m branchgrpo.bench.matrix --output_dir "${OUTPUT_DIR:-outputs/bench/matrix}" \
  --backbones "${BACKBONES:-}" --algos "${ALGOS:-}" --modes "${MODES:-both}" --iterations "$ITERATIONS" \
  --nproc "$NPROC" --timeout_s "$TIMEOUT_S" "$@"
