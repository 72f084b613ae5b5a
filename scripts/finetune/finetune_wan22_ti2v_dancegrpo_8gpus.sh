#!/usr/bin/env bash
# DanceGRPO on Wan2.2 TI2V-5B, one node of 8 GPUs: NUM_GENERATIONS (16) videos per prompt, 20 steps, eta 0.3, a
# fraction TF (1.0) of the timesteps trained, at the release's 704 x 1280, shift 5 and guidance 5.0, 33 frames.
# IMAGE_TO_VIDEO=1 trains image-to-video from the same checkpoint. Environment and defaults:
# scripts/lib/wan22_ti2v.sh and scripts/lib/wan.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_dancegrpo_group 16 20
source scripts/lib/wan22_ti2v.sh
