# Wan2.2 TI2V-5B on top of the Wan launchers' shared body (scripts/lib/wan.sh): the sourcing launcher sets NAME and
# ALGO_ARGS; this picks the mode and adds the TI2V-5B release's defaults.
#
# Environment (defaults), besides scripts/lib/wan.sh's: IMAGE_TO_VIDEO (0: --model wan22_ti2v on text prompts; 1:
# --model wan22_ti2v_i2v on JSONL prompts with a first frame, from the same checkpoint); MODEL_PATH (data/wan22_ti2v,
# both modes); DATA_JSON (data/wan22_ti2v_embeddings/index.json [data/wan22_ti2v_i2v_embeddings/index.json]);
# H (704), W (1280): the release's 720p size (sides multiples of 32: the Wan2.2 VAE's 16x x 2x2 patches); FRAMES (33
# as for Wan2.1; the release samples 121); GUIDANCE (5.0) and SHIFT (5): the release's sampling settings.
source "$REPO_ROOT/scripts/lib/common.sh"

bg_bool IMAGE_TO_VIDEO 0
WAN_BACKBONE=wan22_ti2v
[[ "$IMAGE_TO_VIDEO" == 1 ]] && WAN_BACKBONE=wan22_ti2v_i2v
WAN_CHECKPOINT="Wan2.2-TI2V-5B"
MODEL_PATH="${MODEL_PATH:-data/wan22_ti2v}"  # one checkpoint for both modes
H="${H:-704}"
W="${W:-1280}"
GUIDANCE="${GUIDANCE:-5.0}"
SHIFT="${SHIFT:-5}"
source "$REPO_ROOT/scripts/lib/wan.sh"
