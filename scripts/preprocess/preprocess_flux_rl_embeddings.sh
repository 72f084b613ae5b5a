#!/usr/bin/env bash
# Encode a prompt file with FLUX.1-dev's text encoders (CLIP-L pooled + T5-XXL sequence) into sharded safetensors
# plus index.json, one share of the shards per GPU. A killed run resumes: finished shards are skipped.
#
#   bash scripts/preprocess/preprocess_flux_rl_embeddings.sh                 # defaults below, 8 GPUs
#   NPROC=1 OUTPUT_DIR=data/rl_embeddings_test bash scripts/preprocess/preprocess_flux_rl_embeddings.sh --shard_size 256
#
# Environment (defaults): NPROC (8) processes; MODEL_PATH (data/flux) a diffusers-layout FLUX.1-dev folder;
# PROMPTS (assets/prompts.txt) one prompt per line; OUTPUT_DIR (data/rl_embeddings); MAX_SEQUENCE_LENGTH (512);
# MASTER_ADDR, MASTER_PORT for torchrun; PYTHON to force an interpreter.
# Extra arguments are passed to `python -m branchgrpo.cli.preprocess` (e.g. --shard_size, --batch_size, --device cpu).
# See docs/flux.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh

NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/flux}"
PROMPTS="${PROMPTS:-assets/prompts.txt}"
OUTPUT_DIR="${OUTPUT_DIR:-data/rl_embeddings}"
MAX_SEQUENCE_LENGTH="${MAX_SEQUENCE_LENGTH:-512}"

bg_require_int MAX_SEQUENCE_LENGTH
bg_python
bg_require_file "$PROMPTS" "PROMPTS: prompt file not found (one prompt per line; docs/flux.md says where to get prompts)"
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put FLUX.1-dev there in diffusers layout (docs/flux.md)"
bg_require_parts "$MODEL_PATH" docs/flux.md model_index.json text_encoder text_encoder_2 tokenizer tokenizer_2
bg_check_inputs

export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
NPROC="$NPROC" bg_launch branchgrpo.cli.preprocess --model flux --model_path "$MODEL_PATH" --prompts "$PROMPTS" \
  --output_dir "$OUTPUT_DIR" --max_sequence_length "$MAX_SEQUENCE_LENGTH" "$@"
