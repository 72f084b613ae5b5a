#!/usr/bin/env bash
# Encode an edit JSONL file for Qwen-Image-Edit into sharded safetensors plus index.json, one share of the shards per
# GPU: per line {"prompt": <instruction>, "image": "path/to/source.png"} (relative paths from the file's folder;
# optionally "mask": an image whose white pixels mark the region the edit may change) the instruction and the
# negative prompt, each with the source, through Qwen2.5-VL in the pipeline's edit template (its 64 tokens dropped;
# zero-padded to the source's vision tokens + MAX_SEQUENCE_LENGTH, with their masks), and the source - resized to the
# source size, its pixels, and its VAE latents (mode, normalised per channel, packed) - for the size H x W and
# SOURCE_SIZE (train with the same). A killed run resumes: finished shards are skipped. Bad lines (not JSON, empty
# instruction, missing or unreadable image, aspect ratio more than 10% off the source size) are listed by line
# number and refused, or left out with BAD_LINES=skip. Edit-2509 (EDIT_MODEL=qwen_image_edit_plus) takes 1 to 3
# sources per line as "images": [...] (the same number on every line; "Picture i:" each, the first is the one the
# rewards compare with).
#
#   bash scripts/preprocess/preprocess_qwen_image_edit_rl_embeddings.sh                 # defaults below, 8 GPUs
#   NPROC=1 PROMPTS=my_edits.jsonl BAD_LINES=skip bash scripts/preprocess/preprocess_qwen_image_edit_rl_embeddings.sh
#
# Environment (defaults): NPROC (8) processes; EDIT_MODEL (qwen_image_edit; qwen_image_edit_plus for
# Qwen-Image-Edit-2509); MODEL_PATH (data/$EDIT_MODEL) the release in diffusers layout; PROMPTS (assets/edit_prompts.jsonl: 6 edits of 4 rendered sources, for smoke runs);
# OUTPUT_DIR (data/${EDIT_MODEL}_embeddings); H, W (512), SOURCE_SIZE (generation | preferred), as in the finetune
# launchers; MAX_SEQUENCE_LENGTH (512: the instruction's tokens besides the source's); NEGATIVE_PROMPT (unset: " ";
# set it, even to "", to override); BAD_LINES (refuse | skip); MASTER_ADDR, MASTER_PORT for torchrun; PYTHON to
# force an interpreter. Extra arguments are passed to `python -m branchgrpo.cli.preprocess` (e.g. --shard_size,
# --batch_size, --device cpu). See docs/editing.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
source scripts/lib/common.sh

NPROC="${NPROC:-8}"
EDIT_MODEL="${EDIT_MODEL:-qwen_image_edit}"
MODEL_PATH="${MODEL_PATH:-data/$EDIT_MODEL}"
PROMPTS="${PROMPTS:-assets/edit_prompts.jsonl}"
OUTPUT_DIR="${OUTPUT_DIR:-data/${EDIT_MODEL}_embeddings}"
MAX_SEQUENCE_LENGTH="${MAX_SEQUENCE_LENGTH:-512}"

bg_require_int H W MAX_SEQUENCE_LENGTH
bg_python
bg_require_file "$PROMPTS" "PROMPTS: JSONL edit file not found (one {\"prompt\": ..., \"image\": ...} per line, docs/editing.md)"
bg_require_dir "$MODEL_PATH" "MODEL_PATH: put Qwen-Image-Edit ($EDIT_MODEL) there in diffusers layout (docs/editing.md)"
bg_require_parts "$MODEL_PATH" docs/editing.md model_index.json text_encoder processor vae
bg_check_inputs

# Only an explicitly set NEGATIVE_PROMPT (possibly empty) overrides the default " ".
NEGATIVE_ARGS=()
[[ -n "${NEGATIVE_PROMPT+set}" ]] && NEGATIVE_ARGS=(--negative_prompt "$NEGATIVE_PROMPT")

export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
NPROC="$NPROC" bg_launch branchgrpo.cli.preprocess --model "$EDIT_MODEL" --model_path "$MODEL_PATH" \
  --prompts "$PROMPTS" --output_dir "$OUTPUT_DIR" --h "${H:-512}" --w "${W:-512}" \
  --source_size "${SOURCE_SIZE:-generation}" --max_sequence_length "$MAX_SEQUENCE_LENGTH" \
  --bad_lines "${BAD_LINES:-refuse}" ${NEGATIVE_ARGS[@]+"${NEGATIVE_ARGS[@]}"} "$@"
