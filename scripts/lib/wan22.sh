# Wan2.2 T2V-A14B (two experts) on top of the Wan launchers' shared body (scripts/lib/wan.sh): the sourcing launcher
# sets NAME and ALGO_ARGS; this adds the A14B recipe's defaults and the two-expert flags.
#
# Environment (defaults), besides scripts/lib/wan.sh's: MODEL_PATH (data/wan22: Wan2.2-T2V-A14B-Diffusers);
# DATA_JSON (data/wan22_embeddings/index.json); GUIDANCE (4.0: the high-noise expert's classifier-free guidance);
# GUIDANCE_2 (3.0: the low-noise expert's); SHIFT (12: the official A14B sampling shift); TRAIN_EXPERTS (both | high |
# low); USE_LORA (1: a full fine-tune of both experts does not fit 8 x 80 GB, docs/wan22.md). GUIDANCE_2 is
# checked with the other numbers by scripts/lib/wan.sh.
WAN_BACKBONE="${WAN_BACKBONE:-wan22}"  # wan22_i2v: set by its launchers, with its defaults
WAN_CHECKPOINT="${WAN_CHECKPOINT:-Wan2.2-T2V-A14B}"
GUIDANCE="${GUIDANCE:-4.0}"
SHIFT="${SHIFT:-12}"
USE_LORA="${USE_LORA:-1}"
ALGO_ARGS+=(--guidance_scale_2 "${GUIDANCE_2:-3.0}" --train_experts "${TRAIN_EXPERTS:-both}")
source "$REPO_ROOT/scripts/lib/wan.sh"
