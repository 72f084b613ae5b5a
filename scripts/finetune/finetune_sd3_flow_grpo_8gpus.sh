#!/usr/bin/env bash
# Flow-GRPO on Stable Diffusion 3.5 with the reference recipe's SD3.5-M settings (GenEval/OCR configs): 24
# independent SDE chains per prompt (flow kernel, noise level 0.7), 10 steps, shift 3, 512 px, CFG 4.5 in rollout
# and training, advantages over the iteration's std (--global_std), clip 1e-4, KL 0.04 to the base (LoRA: the
# adapter disabled), LoRA 32/64 at lr 3e-4. TF (1.0) trains every step but the last, as the reference's 0.99 does:
# its last transition is the deterministic one here. KERNEL=cps ETA=0.8 gives the CPS variant; KL=0 drops the KL.
# Environment and defaults: scripts/lib/sd3.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
ALGO_ARGS=(--algo flow_grpo --sampling_steps 10 --num_generations "${NUM_GENERATIONS:-24}"
           --sde_kernel "${KERNEL:-flow}" --eta "${ETA:-0.7}" --timestep_fraction "${TF:-1.0}" --global_std
           --clip_range 1e-4 --kl_coef "${KL:-0.04}")
NAME="flow_grpo"
source scripts/lib/sd3.sh
