#!/usr/bin/env bash
# Encode a prompt file with Qwen-Image's Qwen2.5-VL text encoder (the pipeline's system template, its 34 tokens
# dropped; each prompt zero-padded to MAX_SEQUENCE_LENGTH and stored with its mask) into sharded safetensors plus
# index.json, one share of the shards per GPU, and the negative-prompt embedding used for true CFG once
# (extras.safetensors). A killed run resumes: finished shards are skipped.
#
#   bash scripts/preprocess/preprocess_qwen_image_rl_embeddings.sh                 # defaults below, 8 GPUs
#   NPROC=1 NEGATIVE_PROMPT="blurry" OUTPUT_DIR=data/qwen_test bash scripts/preprocess/preprocess_qwen_image_rl_embeddings.sh
#
# Environment (defaults): NPROC (8) processes; MODEL_PATH (data/qwen_image) a diffusers-layout Qwen-Image folder;
# PROMPTS (assets/prompts.txt) one prompt per line; OUTPUT_DIR (data/qwen_image_embeddings); MAX_SEQUENCE_LENGTH
# (512, the pipeline's default; at most 1024); NEGATIVE_PROMPT (unset: " ", as Qwen-Image's own example; set it, even
# to "", to override); MASTER_ADDR, MASTER_PORT for torchrun; PYTHON to force an interpreter.
# Extra arguments are passed to `python -m branchgrpo.cli.preprocess` (e.g. --shard_size, --batch_size, --device cpu).
# See docs/qwen_image.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh

NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/qwen_image}"
PROMPTS="${PROMPTS:-assets/prompts.txt}"
OUTPUT_DIR="${OUTPUT_DIR:-data/qwen_image_embeddings}"
MAX_SEQUENCE_LENGTH="${MAX_SEQUENCE_LENGTH:-512}"

bg_require_int MAX_SEQUENCE_LENGTH
bg_python
bg_require_file "$PROMPTS" "PROMPTS: prompt file not found (one prompt per line; docs/qwen_image.md says where to get prompts)"
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put Qwen/Qwen-Image there in diffusers layout (docs/qwen_image.md)"
bg_require_parts "$MODEL_PATH" docs/qwen_image.md model_index.json text_encoder tokenizer
bg_check_inputs

# Only an explicitly set NEGATIVE_PROMPT (possibly empty) overrides the default " ".
NEGATIVE_ARGS=()
[[ -n "${NEGATIVE_PROMPT+set}" ]] && NEGATIVE_ARGS=(--negative_prompt "$NEGATIVE_PROMPT")

export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
NPROC="$NPROC" bg_launch branchgrpo.cli.preprocess --model qwen_image --model_path "$MODEL_PATH" --prompts "$PROMPTS" \
  --output_dir "$OUTPUT_DIR" --max_sequence_length "$MAX_SEQUENCE_LENGTH" ${NEGATIVE_ARGS[@]+"${NEGATIVE_ARGS[@]}"} "$@"
