#!/usr/bin/env bash
# Encode prompts for Wan2.2 TI2V-5B into sharded safetensors plus index.json (torchrun, one share of the shards per
# GPU, resumable: finished shards are skipped): Wan2.1's UMT5 prompt embedding (512 tokens, padding zeroed) and, once,
# the negative prompt's. IMAGE_TO_VIDEO=1 (--model wan22_ti2v_i2v): a JSONL prompt file, per line {"prompt": ...,
# "image": "path/to/first_frame.png"}, and per prompt also the image resized to H x W (`first_frame`) and its Wan2.2
# VAE latents (`image_latents`, the frame encoded alone, as WanImageToVideoPipeline does): train with the same H, W.
#
#   bash scripts/preprocess/preprocess_wan22_ti2v_rl_embeddings.sh                     # text-to-video, 8 GPUs
#   IMAGE_TO_VIDEO=1 NPROC=1 PROMPTS=my_frames.jsonl bash scripts/preprocess/preprocess_wan22_ti2v_rl_embeddings.sh
#
# Environment (defaults): IMAGE_TO_VIDEO (0); NPROC (8); MODEL_PATH (data/wan22_ti2v) a diffusers-layout
# Wan2.2-TI2V-5B folder; PROMPTS (assets/video_prompts.txt [assets/i2v_prompts.jsonl]); OUTPUT_DIR
# (data/wan22_ti2v_embeddings [data/wan22_ti2v_i2v_embeddings]); MAX_SEQUENCE_LENGTH (512); H (704), W (1280):
# image-to-video's size; BAD_LINES (refuse | skip: JSONL lines without a usable image); NEGATIVE_PROMPT (unset: Wan's
# own; set it, even to "", to override); MASTER_ADDR, MASTER_PORT; PYTHON. Extra arguments are passed to
# `python -m branchgrpo.cli.preprocess` (e.g. --shard_size, --batch_size, --device cpu). See docs/wan22.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh

bg_bool IMAGE_TO_VIDEO 0
BACKBONE=wan22_ti2v
DEFAULT_PROMPTS=assets/video_prompts.txt
PARTS=()
[[ "$IMAGE_TO_VIDEO" == 1 ]] && { BACKBONE=wan22_ti2v_i2v; DEFAULT_PROMPTS=assets/i2v_prompts.jsonl; PARTS=(vae); }
NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/wan22_ti2v}"
PROMPTS="${PROMPTS:-$DEFAULT_PROMPTS}"
OUTPUT_DIR="${OUTPUT_DIR:-data/${BACKBONE}_embeddings}"

bg_require_int MAX_SEQUENCE_LENGTH H W
bg_python
bg_require_file "$PROMPTS" "PROMPTS: prompt file not found (text: one prompt per line; IMAGE_TO_VIDEO=1: JSONL)"
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put Wan2.2-TI2V-5B-Diffusers there in diffusers layout (docs/wan22.md)"
bg_require_parts "$MODEL_PATH" docs/wan22.md model_index.json text_encoder tokenizer ${PARTS[@]+"${PARTS[@]}"}
bg_check_inputs

ARGS=(--model "$BACKBONE" --model_path "$MODEL_PATH" --prompts "$PROMPTS" --output_dir "$OUTPUT_DIR"
      --max_sequence_length "${MAX_SEQUENCE_LENGTH:-512}")
[[ "$IMAGE_TO_VIDEO" == 1 ]] && ARGS+=(--h "${H:-704}" --w "${W:-1280}" --bad_lines "${BAD_LINES:-refuse}")
# Only an explicitly set NEGATIVE_PROMPT (possibly empty) overrides Wan's default.
[[ -n "${NEGATIVE_PROMPT+set}" ]] && ARGS+=(--negative_prompt "$NEGATIVE_PROMPT")

export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
NPROC="$NPROC" bg_launch branchgrpo.cli.preprocess "${ARGS[@]}" "$@"
