#!/usr/bin/env bash
# Encode a prompt file with Wan2.1's UMT5 text encoder into sharded safetensors plus index.json, one share of the
# shards per GPU, and the negative-prompt embedding used for classifier-free guidance once (extras.safetensors).
# A killed run resumes: finished shards are skipped.
#
#   bash scripts/preprocess/preprocess_wan_rl_embeddings.sh                  # defaults below, 8 GPUs
#   NPROC=1 NEGATIVE_PROMPT="" OUTPUT_DIR=data/wan_embeddings_test bash scripts/preprocess/preprocess_wan_rl_embeddings.sh
#
# Environment (defaults): NPROC (8) processes; MODEL_PATH (data/wan) a diffusers-layout Wan2.1-T2V folder;
# PROMPTS (assets/video_prompts.txt) one prompt per line; OUTPUT_DIR (data/wan_embeddings); MAX_SEQUENCE_LENGTH (512,
# Wan's text length); NEGATIVE_PROMPT (unset: Wan's own default negative prompt; set it, even to "", to override);
# MASTER_ADDR, MASTER_PORT for torchrun; PYTHON to force an interpreter.
# Extra arguments are passed to `python -m branchgrpo.cli.preprocess` (e.g. --shard_size, --batch_size, --device cpu).
# See docs/wan.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh

WAN_BACKBONE="${WAN_BACKBONE:-wan}"  # wan22: scripts/preprocess/preprocess_wan22_rl_embeddings.sh
WAN_CHECKPOINT="${WAN_CHECKPOINT:-Wan2.1-T2V (e.g. Wan2.1-T2V-1.3B-Diffusers)}"
NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/$WAN_BACKBONE}"
PROMPTS="${PROMPTS:-assets/video_prompts.txt}"
OUTPUT_DIR="${OUTPUT_DIR:-data/${WAN_BACKBONE}_embeddings}"
MAX_SEQUENCE_LENGTH="${MAX_SEQUENCE_LENGTH:-512}"

bg_require_int MAX_SEQUENCE_LENGTH
bg_python
bg_require_file "$PROMPTS" "PROMPTS: prompt file not found (one prompt per line; docs/wan.md says where to get prompts)"
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put $WAN_CHECKPOINT there in diffusers layout (docs/$WAN_BACKBONE.md)"
bg_require_parts "$MODEL_PATH" docs/wan.md model_index.json text_encoder tokenizer
bg_check_inputs

# Only an explicitly set NEGATIVE_PROMPT (possibly empty) overrides Wan's default.
NEGATIVE_ARGS=()
[[ -n "${NEGATIVE_PROMPT+set}" ]] && NEGATIVE_ARGS=(--negative_prompt "$NEGATIVE_PROMPT")

export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
NPROC="$NPROC" bg_launch branchgrpo.cli.preprocess --model "$WAN_BACKBONE" --model_path "$MODEL_PATH" --prompts "$PROMPTS" \
  --output_dir "$OUTPUT_DIR" --max_sequence_length "$MAX_SEQUENCE_LENGTH" ${NEGATIVE_ARGS[@]+"${NEGATIVE_ARGS[@]}"} "$@"
