#!/usr/bin/env bash
# BranchGRPO on FLUX.1-Kontext-dev (instruction-based image editing), one node of 8 GPUs (torchrun, FSDP2, bf16): the
# FLUX BranchGRPO launcher (20 steps, splits 0,3,6,9, K = 2, eta 0.3; lr 1e-5, clip 1e-3; VARIANT=base|widpru|deppru|
# mix) at 512 x 512 with 512 x 512 sources, embedded guidance 2.5, FluxKontextPipeline's resolution-dependent shift,
# and the edit rewards clip_directional + source_consistency. The source image enters every node of the tree and every
# training forward. USE_LORA=1 for LoRA (the planner: LoRA fits 2 x 80 GB, docs/editing.md).
# Environment: scripts/lib/flux_kontext.sh (H, W, SOURCE_SIZE, GUIDANCE, REWARD, DATA_JSON) and scripts/lib/flux.sh
# (NPROC, MODEL_PATH, OUTPUT_DIR, USE_LORA, ...). Extra flags go to the trainer and win. See docs/editing.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/flux_kontext.sh
exec bash scripts/finetune/finetune_flux_branchgrpo_8gpus.sh "${KONTEXT_ARGS[@]}" "$@"
