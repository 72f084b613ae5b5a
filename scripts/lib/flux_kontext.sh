# The FLUX.1-Kontext-dev settings of its launchers, which run the FLUX launchers (scripts/lib/flux.sh's body) with
# them: instruction-based editing from the JSONL embeddings of scripts/preprocess/preprocess_flux_kontext_rl_embeddings.sh
# (the same H, W and SOURCE_SIZE there and here).
#
# Environment (defaults), besides scripts/lib/flux.sh's: MODEL_PATH (data/flux_kontext, FLUX.1-Kontext-dev in
# diffusers layout); DATA_JSON (data/flux_kontext_embeddings/index.json); H, W (512: 1024 source + 1024 generated
# tokens per forward; Kontext's own 1024 x 1024 quadruples both); SOURCE_SIZE (generation: the sources at H x W;
# preferred: Kontext's preferred resolution, about 1 megapixel); GUIDANCE (2.5, the pipeline's embedded guidance);
# REWARD (clip_directional=1.0,source_consistency=0.5: the instruction's CLIP direction, kept in check by pixel
# consistency with the source - docs/editing.md; clip_directional reads HPS_CKPT_DIR/clip-vit-large-patch14);
# OUTPUT_DIR (outputs/flux_kontext_<run name>).
source "$REPO_ROOT/scripts/lib/common.sh"
export FLUX_BACKBONE=flux_kontext FLUX_CHECKPOINT=FLUX.1-Kontext-dev FLUX_DOC=docs/editing.md
export FLUX_DATA_JSON=data/flux_kontext_embeddings/index.json FLUX_SIZE=512
export FLUX_REWARD="clip_directional=1.0,source_consistency=0.5"
bg_require_number GUIDANCE
bg_check_inputs
KONTEXT_ARGS=(--source_size "${SOURCE_SIZE:-generation}" --guidance_scale "${GUIDANCE:-2.5}" --time_shift dynamic)
