#!/usr/bin/env bash
# DanceGRPO on Wan2.2 I2V-A14B (two experts), one node of 8 GPUs: the Wan2.2 T2V DanceGRPO settings (20 steps, 16
# videos per prompt, eta 0.3, timestep fraction TF) at the I2V-A14B recipe's shift 5 and guidance 3.5 / 3.5.
# Environment and defaults: scripts/lib/wan22.sh and scripts/lib/wan.sh (MODEL_PATH data/wan22_i2v). See
# docs/wan22.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh
bg_dancegrpo_group 16 20
WAN_BACKBONE=wan22_i2v  # scripts/lib/wan22.sh then takes the I2V-A14B recipe's defaults
source scripts/lib/wan22.sh
