#!/usr/bin/env bash
# Flow-GRPO on FLUX.1-dev with the reference recipe's FLUX defaults: 24 independent SDE chains per prompt (flow
# kernel, noise level 0.9), 6 steps with FLUX's dynamic shift, 512 px, embedded guidance 3.5, advantages over the
# iteration's std (--global_std), clip 1e-4, no KL, LoRA (rank 32, alpha 64) at LR 3e-4, gradient clip 1.0, EMA.
# TF (timestep fraction) 1.0 trains every step but the last, as the reference's 0.99 does: its last transition is
# the deterministic one here. KERNEL=cps ETA=0.8 gives the CPS variant. Environment: scripts/lib/flux.sh.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
USE_LORA="${USE_LORA:-1}" LR="${LR:-3e-4}" MAX_GRAD_NORM="${MAX_GRAD_NORM:-1.0}" H="${H:-512}" W="${W:-512}"
ALGO_ARGS=(--algo flow_grpo --sampling_steps 6 --time_shift dynamic --num_generations "${NUM_GENERATIONS:-24}"
           --sde_kernel "${KERNEL:-flow}" --eta "${ETA:-0.9}" --timestep_fraction "${TF:-1.0}" --global_std
           --clip_range 1e-4 --kl_coef 0 --guidance_scale 3.5)
NAME="flow_grpo"
source scripts/lib/flux.sh
