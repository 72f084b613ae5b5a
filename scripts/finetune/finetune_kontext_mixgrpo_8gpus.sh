#!/usr/bin/env bash
# MixGRPO baseline on FLUX.1-Kontext-dev (instruction-based image editing): the FLUX MixGRPO launcher (a sliding SDE
# window in an ODE trajectory, only window steps trained) with the Kontext settings of scripts/lib/flux_kontext.sh
# (512 x 512, guidance 2.5, the pipeline's dynamic shift, the edit rewards). Environment: scripts/lib/flux_kontext.sh
# and scripts/lib/flux.sh. Extra flags go to the trainer and win. See docs/editing.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/flux_kontext.sh
exec bash scripts/finetune/finetune_flux_mixgrpo_8gpus.sh "${KONTEXT_ARGS[@]}" "$@"
