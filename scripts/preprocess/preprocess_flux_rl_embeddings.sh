#!/usr/bin/env bash
# Encode a prompt file with FLUX.1-dev's text encoders (CLIP-L pooled + T5-XXL sequence) into sharded safetensors
# plus index.json, one share of the shards per GPU. A killed run resumes: finished shards are skipped.
#
#   bash scripts/preprocess/preprocess_flux_rl_embeddings.sh                 # defaults below, 8 GPUs
#   NPROC=1 OUTPUT_DIR=data/rl_embeddings_test bash scripts/preprocess/preprocess_flux_rl_embeddings.sh --shard_size 256
#
# Environment (defaults): NPROC (8) processes; MODEL_PATH (data/flux) a diffusers-layout FLUX.1-dev folder;
# PROMPTS (assets/prompts.txt) one prompt per line; OUTPUT_DIR (data/rl_embeddings); MAX_SEQUENCE_LENGTH (512);
# MASTER_ADDR (127.0.0.1) and MASTER_PORT (29513) for torchrun; PYTHON to force an interpreter.
# Extra arguments are passed to `python -m branchgrpo.cli.preprocess` (e.g. --shard_size, --batch_size, --device cpu).
# See docs/flux.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/flux}"
PROMPTS="${PROMPTS:-assets/prompts.txt}"
OUTPUT_DIR="${OUTPUT_DIR:-data/rl_embeddings}"
MAX_SEQUENCE_LENGTH="${MAX_SEQUENCE_LENGTH:-512}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29513}"

missing=0
if [[ ! -f "$PROMPTS" ]]; then
  echo "error: prompt file PROMPTS=$PROMPTS not found (one prompt per line; docs/flux.md says where to get HPDv2's)" >&2
  missing=1
fi
if [[ ! -d "$MODEL_PATH" ]]; then
  echo "error: MODEL_PATH=$MODEL_PATH not found: put FLUX.1-dev there in diffusers layout (docs/flux.md)" >&2
  missing=1
else
  for part in model_index.json text_encoder text_encoder_2 tokenizer tokenizer_2; do
    if [[ ! -e "$MODEL_PATH/$part" ]]; then
      echo "error: $MODEL_PATH/$part missing; expected a diffusers-layout FLUX.1-dev folder (docs/flux.md)" >&2
      missing=1
    fi
  done
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NPROC must be a positive integer, got '$NPROC'" >&2
  missing=1
fi
[[ "$missing" == 0 ]] || exit 2

# The repo's virtualenv when there is one, else whatever python is on PATH (or $PYTHON).
if [[ -n "${PYTHON:-}" ]]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run)
elif [[ -x "$REPO_ROOT/.venv/bin/torchrun" ]]; then
  LAUNCH=("$REPO_ROOT/.venv/bin/torchrun")
else
  LAUNCH=(python -m torch.distributed.run)
fi

export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

"${LAUNCH[@]}" --nnodes 1 --nproc_per_node "$NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m branchgrpo.cli.preprocess \
  --model flux \
  --model_path "$MODEL_PATH" \
  --prompts "$PROMPTS" \
  --output_dir "$OUTPUT_DIR" \
  --max_sequence_length "$MAX_SEQUENCE_LENGTH" \
  "$@"
