#!/usr/bin/env bash
# Encode a JSONL prompt file for Wan2.1 image-to-video into sharded safetensors plus index.json, one share of the
# shards per GPU: per line {"prompt": ..., "image": "path/to/first_frame.png"} (relative paths from the file's folder)
# the UMT5 prompt embedding and the image conditioning - CLIP image tokens, the image resized to the video, and the
# VAE-encoded first-frame latents for the video size H x W x FRAMES (train with the same) - and, once, the
# negative-prompt embedding (extras.safetensors). A killed run resumes: finished shards are skipped. Bad lines (not
# JSON, missing or unreadable image, aspect ratio off the video's) are listed by line number and refused, or left out
# with BAD_LINES=skip.
#
#   bash scripts/preprocess/preprocess_wan_i2v_rl_embeddings.sh                  # defaults below, 8 GPUs
#   NPROC=1 PROMPTS=my_frames.jsonl BAD_LINES=skip bash scripts/preprocess/preprocess_wan_i2v_rl_embeddings.sh
#
# Environment (defaults): NPROC (8) processes; MODEL_PATH (data/wan_i2v) a diffusers-layout Wan2.1-I2V folder;
# PROMPTS (assets/i2v_prompts.jsonl: 6 first frames we rendered, for smoke runs); OUTPUT_DIR (data/wan_i2v_embeddings);
# H (480), W (832), FRAMES (33): the video size, as in the finetune launchers; BAD_LINES (refuse | skip);
# NEGATIVE_PROMPT (unset: Wan's own default negative prompt; set it, even to "", to override); MASTER_ADDR,
# MASTER_PORT for torchrun; PYTHON to force an interpreter. Text is always 512 tokens (Wan I2V's text length).
# Extra arguments are passed to `python -m branchgrpo.cli.preprocess` (e.g. --shard_size, --batch_size, --device cpu).
# See docs/wan.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh

# wan22_i2v (Wan2.2 I2V-A14B, no CLIP image encoder): scripts/preprocess/preprocess_wan22_i2v_rl_embeddings.sh
WAN_BACKBONE="${WAN_BACKBONE:-wan_i2v}"
WAN_CHECKPOINT="${WAN_CHECKPOINT:-Wan2.1-I2V-14B-480P (or -720P)}"
WAN_PARTS="${WAN_PARTS-image_encoder image_processor}"  # set, even empty, by the wan22_i2v script
NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/$WAN_BACKBONE}"
PROMPTS="${PROMPTS:-assets/i2v_prompts.jsonl}"
OUTPUT_DIR="${OUTPUT_DIR:-data/${WAN_BACKBONE}_embeddings}"

bg_require_int H W FRAMES
bg_python
bg_require_file "$PROMPTS" "PROMPTS: JSONL prompt file not found (one {\"prompt\": ..., \"image\": ...} per line, docs/wan.md)"
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put $WAN_CHECKPOINT there in diffusers layout (docs/wan.md)"
# shellcheck disable=SC2086 - WAN_PARTS is a list of folder names
bg_require_parts "$MODEL_PATH" docs/wan.md model_index.json text_encoder tokenizer $WAN_PARTS vae
bg_check_inputs

# Only an explicitly set NEGATIVE_PROMPT (possibly empty) overrides Wan's default.
NEGATIVE_ARGS=()
[[ -n "${NEGATIVE_PROMPT+set}" ]] && NEGATIVE_ARGS=(--negative_prompt "$NEGATIVE_PROMPT")

export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
NPROC="$NPROC" bg_launch branchgrpo.cli.preprocess --model "$WAN_BACKBONE" --model_path "$MODEL_PATH" --prompts "$PROMPTS" \
  --output_dir "$OUTPUT_DIR" --h "${H:-480}" --w "${W:-832}" --num_frames "${FRAMES:-33}" \
  --bad_lines "${BAD_LINES:-refuse}" ${NEGATIVE_ARGS[@]+"${NEGATIVE_ARGS[@]}"} "$@"
