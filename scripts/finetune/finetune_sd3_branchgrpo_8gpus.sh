#!/usr/bin/env bash
# BranchGRPO on Stable Diffusion 3.5 (Medium or Large, whatever MODEL_PATH holds) at the peers' SD3.5 settings: 10
# steps, splits 0,2,4,6, K = 2 (16 leaves per prompt), eta 0.3, shift 3, 512 x 512, CFG 4.5, LoRA (lr 3e-4),
# clip 1e-4, advantages clipped to 5, HPS-v2.1, on one node of 8 GPUs (torchrun, FSDP2, bf16).
#
#   VARIANT=base    BranchGRPO                       (default)
#   VARIANT=widpru  BranchGRPO-WidPru: width pruning, Parent-Top1 at the last split
#   VARIANT=deppru  BranchGRPO-DepPru: depths 7,8 pruned, sliding every 30 iterations down to depth 6 (the paper's
#                   15-18 -> 9 of 20 steps, on 10)
#   VARIANT=mix     BranchGRPO-Mix: ODE outside the splits and a 2-step SDE window moving every 30 iterations
#
# Other environment variables: see scripts/lib/sd3.sh (NPROC, MODEL_PATH, DATA_JSON, HPS_CKPT_DIR, OUTPUT_DIR, ...).
# Extra flags go to the trainer and override these, e.g. `... --sampling_steps 20 --tree_split_points 0,3,6,9`.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
VARIANT="${VARIANT:-base}"
ALGO_ARGS=(--algo branchgrpo --sampling_steps 10 --tree_split_points "${SPLIT_POINTS:-0,2,4,6}" --branch_factor 2
           --eta 0.3 --sde_kernel dance --clip_range 1e-4 --init_same_noise --tree_split_noise_scale 1.0)
case "$VARIANT" in
  base) ;;
  widpru) ALGO_ARGS+=(--width_pruning_mode 1) ;;
  deppru) ALGO_ARGS+=(--depth_pruning 7,8 --depth_pruning_slide --depth_pruning_slide_interval 30
                      --depth_pruning_stop_depth 6) ;;
  mix) ALGO_ARGS+=(--mix_ode_sde_tree --mix_sde_window_size 2 --mix_window_interval 30) ;;
  *) echo "error: VARIANT must be base, widpru, deppru or mix (got '$VARIANT')" >&2; exit 2 ;;
esac
NAME="branchgrpo_${VARIANT}"
source scripts/lib/sd3.sh
