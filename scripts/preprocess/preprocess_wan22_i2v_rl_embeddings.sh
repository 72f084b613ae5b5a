#!/usr/bin/env bash
# Encode a JSONL prompt file for Wan2.2 I2V-A14B: Wan2.1 image-to-video's preprocessing
# (scripts/preprocess/preprocess_wan_i2v_rl_embeddings.sh: the UMT5 prompt embedding, the first frame resized to the
# video and its VAE latents for H x W x FRAMES, the negative prompt once; torchrun, resumable, sharded safetensors)
# without CLIP image tokens (the checkpoint has no image encoder), recorded for --model wan22_i2v. Its environment,
# with MODEL_PATH (data/wan22_i2v) a diffusers-layout Wan2.2-I2V-A14B folder and OUTPUT_DIR (data/wan22_i2v_embeddings).
# See docs/wan22.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WAN_BACKBONE=wan22_i2v WAN_CHECKPOINT=Wan2.2-I2V-A14B-Diffusers WAN_PARTS="" \
  exec bash "$REPO_ROOT/scripts/preprocess/preprocess_wan_i2v_rl_embeddings.sh" "$@"
