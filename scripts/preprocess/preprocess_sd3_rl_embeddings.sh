#!/usr/bin/env bash
# Encode a prompt file with Stable Diffusion 3.5's three text encoders (CLIP-L and OpenCLIP bigG penultimate states +
# pooled projections, T5-XXL sequence) into sharded safetensors plus index.json, one share of the shards per GPU, and
# the negative prompt's embeddings once (the classifier-free guidance of rollout and training). A killed run resumes:
# finished shards are skipped.
#
#   bash scripts/preprocess/preprocess_sd3_rl_embeddings.sh                 # defaults below, 8 GPUs
#   NPROC=1 OUTPUT_DIR=data/sd3_embeddings_test bash scripts/preprocess/preprocess_sd3_rl_embeddings.sh --shard_size 256
#
# Environment (defaults): NPROC (8) processes; MODEL_PATH (data/sd3) a diffusers-layout SD3.5 Medium or Large folder
# (their text encoders are the same); PROMPTS (assets/prompts.txt) one prompt per line; OUTPUT_DIR
# (data/sd3_embeddings); T5_SEQUENCE_LENGTH (128, the peers' recipes; diffusers' default is 256); NEGATIVE_PROMPT
# (empty, the pipeline's default); MASTER_ADDR, MASTER_PORT for torchrun; PYTHON to force an interpreter.
# Extra arguments are passed to `python -m branchgrpo.cli.preprocess` (e.g. --shard_size, --batch_size, --device cpu).
# See docs/sd3.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh

NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/sd3}"
PROMPTS="${PROMPTS:-assets/prompts.txt}"
OUTPUT_DIR="${OUTPUT_DIR:-data/sd3_embeddings}"
T5_SEQUENCE_LENGTH="${T5_SEQUENCE_LENGTH:-128}"

bg_require_int T5_SEQUENCE_LENGTH
bg_python
bg_require_file "$PROMPTS" "PROMPTS: prompt file not found (one prompt per line)"
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put Stable Diffusion 3.5 there in diffusers layout (docs/sd3.md)"
bg_require_parts "$MODEL_PATH" docs/sd3.md model_index.json text_encoder text_encoder_2 text_encoder_3 tokenizer \
  tokenizer_2 tokenizer_3
bg_check_inputs

ARGS=(--model sd3 --model_path "$MODEL_PATH" --prompts "$PROMPTS" --output_dir "$OUTPUT_DIR"
      --t5_sequence_length "$T5_SEQUENCE_LENGTH")
[[ -n "${NEGATIVE_PROMPT:-}" ]] && ARGS+=(--negative_prompt "$NEGATIVE_PROMPT")
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
NPROC="$NPROC" bg_launch branchgrpo.cli.preprocess "${ARGS[@]}" "$@"
