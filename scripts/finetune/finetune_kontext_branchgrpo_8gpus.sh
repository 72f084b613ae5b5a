#!/usr/bin/env bash
# BranchGRPO on FLUX.1-Kontext-dev (instruction-based image editing), one node of 8 GPUs (torchrun, FSDP2, bf16): the
# FLUX launcher's tree (20 steps, splits 0,3,6,9, K = 2, eta 0.3; lr 1e-5, clip 1e-3) at 512 x 512 with 512 x 512
# sources, embedded guidance 2.5, FluxKontextPipeline's resolution-dependent shift, and the edit rewards
# clip_directional + source_consistency. The source image enters every node of the tree and every training forward.
# VARIANT=base|widpru|deppru|mix as for FLUX. USE_LORA=1 for LoRA (the planner: LoRA fits 2 x 80 GB, docs/editing.md).
# Environment: scripts/lib/flux_kontext.sh (H, W, SOURCE_SIZE, GUIDANCE, REWARD, DATA_JSON) and scripts/lib/flux.sh
# (NPROC, MODEL_PATH, OUTPUT_DIR, USE_LORA, ...). Extra flags go to the trainer. See docs/editing.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
VARIANT="${VARIANT:-base}"
ALGO_ARGS=(--algo branchgrpo --sampling_steps 20 --tree_split_points "${SPLIT_POINTS:-0,3,6,9}" --branch_factor 2
           --eta 0.3 --sde_kernel dance --clip_range 1e-3 --init_same_noise --tree_split_noise_scale 1.0)
source scripts/lib/common.sh
bg_branchgrpo_variant "$VARIANT"
NAME="branchgrpo_${VARIANT}"
source scripts/lib/flux_kontext.sh
source scripts/lib/flux.sh
