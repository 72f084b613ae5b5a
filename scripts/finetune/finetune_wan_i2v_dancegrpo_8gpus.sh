#!/usr/bin/env bash
# DanceGRPO baseline on Wan2.1 image-to-video (Wan2.1-I2V-14B-480P): 16 independent SDE trajectories per prompt (the
# tree's leaf count), 20 steps, eta 0.3, CFG 5.0, VideoAlign motion quality (DanceGRPO's image-to-video reward);
# TF (timestep fraction, 1.0) trains a random share of the steps. Prompts: preprocess_wan_i2v_rl_embeddings.sh.
# Environment and defaults: scripts/lib/wan.sh. Extra flags go to the trainer. See docs/wan.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_dancegrpo_group 16 20
WAN_BACKBONE=wan_i2v
WAN_CHECKPOINT="Wan2.1-I2V-14B-480P (or -720P)"
source scripts/lib/wan.sh
