#!/usr/bin/env bash
# BranchGRPO on FLUX.1-dev with the paper's settings (20 steps, splits 0,3,6,9, K = 2, eta 0.3, shift 3, 720x720,
# lr 1e-5, clip 1e-3, advantages clipped to 5, HPS-v2.1), on one node of 8 GPUs (torchrun, FSDP2, bf16).
#
#   VARIANT=base    BranchGRPO                       (default)
#   VARIANT=widpru  BranchGRPO-WidPru: width pruning, Parent-Top1 at the last split
#   VARIANT=deppru  BranchGRPO-DepPru: depths 15,16,17,18 pruned, sliding every 30 iterations down to depth 9
#   VARIANT=mix     BranchGRPO-Mix: ODE outside the splits and a 4-step SDE window moving every 30 iterations
#
# Other environment variables: see scripts/lib/flux.sh (NPROC, MODEL_PATH, DATA_JSON, HPS_CKPT_DIR, OUTPUT_DIR, ...).
# Extra flags go to the trainer and override these, e.g. `... --fusion_alpha 1 --branch_innovation 0.5`.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_branchgrpo_tree --clip_range 1e-3 --tree_split_noise_scale 1.0
source scripts/lib/flux.sh
