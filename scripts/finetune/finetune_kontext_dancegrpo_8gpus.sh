#!/usr/bin/env bash
# DanceGRPO baseline on FLUX.1-Kontext-dev (instruction-based image editing): the FLUX DanceGRPO launcher (12
# independent SDE trajectories per edit, 20 steps, eta 0.3, TF 1.0) with the settings of the BranchGRPO Kontext
# launcher (512 x 512, guidance 2.5, the pipeline's dynamic shift, the edit rewards). Environment:
# scripts/lib/flux_kontext.sh and scripts/lib/flux.sh. Extra flags go to the trainer and win. See docs/editing.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/flux_kontext.sh
exec bash scripts/finetune/finetune_flux_dancegrpo_8gpus.sh "${KONTEXT_ARGS[@]}" "$@"
