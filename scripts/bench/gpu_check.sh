#!/usr/bin/env bash
# One-command GPU check: FLUX.1-dev's transformer from the shipped config with random bf16 weights (no download), on
# every visible GPU (torchrun, FSDP2 over them): a 16-leaf tree rollout at 720 px (time, forward passes/s, MFU), the
# update over its trained edges with activation checkpointing (time, MFU), the bf16 first-ratio deviation (with and
# without --recompute_old_log_prob), peak memory against the memory planner, eager vs --compile. Sized for < 8 min
# on one H100/H200 (an estimate: no GPU has run it yet; docs/benchmarks.md section 3).
#
#   bash scripts/bench/gpu_check.sh                          # FLUX.1-dev geometry, all visible GPUs
#   bash scripts/bench/gpu_check.sh --num_single_layers 10 --steps 12   # cut blocks / steps to go faster
#   bash scripts/bench/gpu_check.sh --skip_compile          # eager only (half the time)
#   bash scripts/bench/gpu_check.sh --tiny                   # the same code on the tiny config on CPU (about 4
#                                                            # min; with --skip_compile under 1 min)
#
# Environment (defaults): OUTPUT_DIR (outputs/gpu_check): gpu_check.json and gpu_check.md; NPROC (the number of
# visible GPUs, 1 with --tiny or without GPUs); PYTHON. Extra arguments go to python -m branchgrpo.bench.gpu_check.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_python
OUTPUT_DIR="${OUTPUT_DIR:-outputs/gpu_check}"
if [[ " $* " == *" --tiny "* ]]; then
  NPROC="${NPROC:-1}"
else
  NPROC="${NPROC:-$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
fi
export NPROC
BG_MISSING=0
bg_check_inputs
bg_launch branchgrpo.bench.gpu_check --output_dir "$OUTPUT_DIR" "$@"
