# The Qwen-Image-Edit settings of its launchers, which run the Qwen-Image launchers (scripts/lib/qwen_image.sh's
# body) with them: instruction-based editing from the JSONL embeddings of
# scripts/preprocess/preprocess_qwen_image_edit_rl_embeddings.sh (the same H, W and SOURCE_SIZE there and here).
#
# Environment (defaults), besides scripts/lib/qwen_image.sh's: EDIT_MODEL (qwen_image_edit; qwen_image_edit_plus for
# Qwen-Image-Edit-2509); MODEL_PATH (data/$EDIT_MODEL, the release in diffusers layout); DATA_JSON
# (data/${EDIT_MODEL}_embeddings/index.json); H, W (512: 1024 source + 1024
# generated tokens per forward); SOURCE_SIZE (generation: the sources at H x W; preferred: the pipeline's choice,
# about 1024 x 1024, 4096 source tokens); GUIDANCE (4.0, the pipeline's true CFG with the per-prompt negative
# embedding); REWARD (clip_directional=1.0,source_consistency=0.5: the instruction's CLIP direction, kept in check by
# pixel consistency with the source - docs/editing.md; clip_directional reads HPS_CKPT_DIR/clip-vit-large-patch14);
# OUTPUT_DIR (outputs/qwen_image_edit_<run name>).
source "$REPO_ROOT/scripts/lib/common.sh"
EDIT_MODEL="${EDIT_MODEL:-qwen_image_edit}"
if [[ "$EDIT_MODEL" != qwen_image_edit && "$EDIT_MODEL" != qwen_image_edit_plus ]]; then
  echo "error: EDIT_MODEL must be qwen_image_edit or qwen_image_edit_plus, got '$EDIT_MODEL'" >&2
  exit 2
fi
export QWEN_BACKBONE="$EDIT_MODEL" QWEN_CHECKPOINT="Qwen-Image-Edit ($EDIT_MODEL)" QWEN_DOC=docs/editing.md
export QWEN_DATA_JSON="data/${EDIT_MODEL}_embeddings/index.json"
export QWEN_REWARD="clip_directional=1.0,source_consistency=0.5"
EDIT_ARGS=(--source_size "${SOURCE_SIZE:-generation}")
