#!/usr/bin/env bash
# Flow-GRPO-Fast on FLUX.1-dev with the reference recipe's FLUX defaults: per prompt an ODE prefix shared by 24
# children, then a window of 3 CPS steps (noise level 0.8) starting at a random step in [0, T/2 - 3], then ODE; only
# the window is trained. 6 steps with FLUX's dynamic shift, 512 px, embedded guidance 3.5, advantages per prompt
# group (the reference's FLUX fast recipe sets global_std off), clip 1e-4 on the Gaussian log-prob scale (see
# docs/design_notes.md for the reference's 1e-5 on its own scale; --cps_log_prob reference reproduces that), no KL,
# LoRA (rank 32, alpha 64) at LR 3e-4, gradient clip 1.0, EMA. Environment: scripts/lib/flux.sh.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
USE_LORA="${USE_LORA:-1}" LR="${LR:-3e-4}" MAX_GRAD_NORM="${MAX_GRAD_NORM:-1.0}" H="${H:-512}" W="${W:-512}"
ALGO_ARGS=(--algo flow_grpo_fast --sampling_steps 6 --time_shift dynamic --num_generations "${NUM_GENERATIONS:-24}"
           --sde_kernel "${KERNEL:-cps}" --eta "${ETA:-0.8}" --sde_window_size "${WINDOW:-3}" --no-global_std
           --clip_range 1e-4 --kl_coef 0 --guidance_scale 3.5)
NAME="flow_grpo_fast"
source scripts/lib/flux.sh
