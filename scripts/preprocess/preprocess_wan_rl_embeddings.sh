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
# MASTER_ADDR (127.0.0.1) and MASTER_PORT (29514) for torchrun; PYTHON to force an interpreter.
# Extra arguments are passed to `python -m branchgrpo.cli.preprocess` (e.g. --shard_size, --batch_size, --device cpu).
# See docs/wan.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

NPROC="${NPROC:-8}"
MODEL_PATH="${MODEL_PATH:-data/wan}"
PROMPTS="${PROMPTS:-assets/video_prompts.txt}"
OUTPUT_DIR="${OUTPUT_DIR:-data/wan_embeddings}"
MAX_SEQUENCE_LENGTH="${MAX_SEQUENCE_LENGTH:-512}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29514}"

missing=0
if [[ ! -f "$PROMPTS" ]]; then
  echo "error: prompt file PROMPTS=$PROMPTS not found (one prompt per line)" >&2
  missing=1
fi
if [[ ! -d "$MODEL_PATH" ]]; then
  echo "error: MODEL_PATH=$MODEL_PATH not found: put Wan2.1-T2V (e.g. Wan2.1-T2V-1.3B-Diffusers) there in diffusers layout (docs/wan.md)" >&2
  missing=1
else
  for part in model_index.json text_encoder tokenizer; do
    if [[ ! -e "$MODEL_PATH/$part" ]]; then
      echo "error: $MODEL_PATH/$part missing; expected a diffusers-layout Wan2.1-T2V folder (docs/wan.md)" >&2
      missing=1
    fi
  done
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NPROC must be a positive integer, got '$NPROC'" >&2
  missing=1
fi
[[ "$missing" == 0 ]] || exit 2

# Only an explicitly set NEGATIVE_PROMPT (possibly empty) overrides Wan's default.
NEGATIVE_ARGS=()
if [[ -n "${NEGATIVE_PROMPT+set}" ]]; then
  NEGATIVE_ARGS=(--negative_prompt "$NEGATIVE_PROMPT")
fi

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
  --model wan \
  --model_path "$MODEL_PATH" \
  --prompts "$PROMPTS" \
  --output_dir "$OUTPUT_DIR" \
  --max_sequence_length "$MAX_SEQUENCE_LENGTH" \
  ${NEGATIVE_ARGS[@]+"${NEGATIVE_ARGS[@]}"} \
  "$@"
