#!/usr/bin/env bash
# Encode a prompt file for Wan2.2 T2V-A14B: Wan2.1's preprocessing (scripts/preprocess/preprocess_wan_rl_embeddings.sh:
# the same UMT5 text encoder, 512 tokens, the negative-prompt embedding once; torchrun, resumable, sharded
# safetensors), recorded for --model wan22. Its environment, with MODEL_PATH (data/wan22) a diffusers-layout
# Wan2.2-T2V-A14B folder and OUTPUT_DIR (data/wan22_embeddings). See docs/wan22.md.
#
#   bash scripts/preprocess/preprocess_wan22_rl_embeddings.sh                 # 8 GPUs
#   NPROC=1 OUTPUT_DIR=data/wan22_embeddings_test bash scripts/preprocess/preprocess_wan22_rl_embeddings.sh
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WAN_BACKBONE=wan22 WAN_CHECKPOINT=Wan2.2-T2V-A14B-Diffusers exec bash "$REPO_ROOT/scripts/preprocess/preprocess_wan_rl_embeddings.sh" "$@"
