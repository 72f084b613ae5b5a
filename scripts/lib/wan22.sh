# Wan2.2 A14B (two experts) on top of the Wan launchers' shared body (scripts/lib/wan.sh): the sourcing launcher sets
# NAME and ALGO_ARGS (and WAN_BACKBONE=wan22_i2v for Wan2.2 I2V-A14B); this adds the A14B recipe's defaults and the
# two-expert flags.
#
# Environment (defaults; I2V-A14B's in brackets), besides scripts/lib/wan.sh's: MODEL_PATH (data/wan22 [data/
# wan22_i2v]); DATA_JSON (data/wan22_embeddings/index.json [data/wan22_i2v_embeddings/index.json]); GUIDANCE (4.0
# [3.5]: the high-noise expert's classifier-free guidance); GUIDANCE_2 (3.0 [3.5]: the low-noise expert's; checked
# with the other numbers by scripts/lib/wan.sh); SHIFT (12 [5]: the official sampling shift); TRAIN_EXPERTS (both |
# high | low); USE_LORA (1: a full fine-tune of both experts does not fit 8 x 80 GB, docs/wan22.md).
WAN_BACKBONE="${WAN_BACKBONE:-wan22}"
if [[ "$WAN_BACKBONE" == wan22_i2v ]]; then  # the I2V-A14B recipe: shift 5, guidance 3.5 for both experts
  WAN_CHECKPOINT="Wan2.2-I2V-A14B"
  GUIDANCE="${GUIDANCE:-3.5}"
  GUIDANCE_2="${GUIDANCE_2:-3.5}"
  SHIFT="${SHIFT:-5}"
fi
WAN_CHECKPOINT="${WAN_CHECKPOINT:-Wan2.2-T2V-A14B}"
GUIDANCE="${GUIDANCE:-4.0}"
SHIFT="${SHIFT:-12}"
USE_LORA="${USE_LORA:-1}"
ALGO_ARGS+=(--guidance_scale_2 "${GUIDANCE_2:-3.0}" --train_experts "${TRAIN_EXPERTS:-both}")
source "$REPO_ROOT/scripts/lib/wan.sh"
