#!/usr/bin/env bash
# Flow-GRPO-Fast on Stable Diffusion 3.5 with the reference's fast no-CFG recipe: per prompt an ODE prefix shared by
# 24 children, then a window of 3 CPS steps (noise level 0.8) starting at a random step in [0, 5 - 3], then ODE; only
# the window is trained. 10 steps, shift 3, 512 px, no classifier-free guidance (GUIDANCE 1.0: the RL run distils it;
# GUIDANCE=4.5 for the CFG recipe), advantages per prompt group, clip 1e-4 on the Gaussian log-prob scale (the
# reference's 1e-5 is on its own scale: docs/design_notes.md; --cps_log_prob reference reproduces it), no KL, LoRA
# 32/64 at lr 3e-4. Environment and defaults: scripts/lib/sd3.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
GUIDANCE="${GUIDANCE:-1.0}"
ALGO_ARGS=(--algo flow_grpo_fast --sampling_steps 10 --num_generations "${NUM_GENERATIONS:-24}"
           --sde_kernel "${KERNEL:-cps}" --eta "${ETA:-0.8}" --sde_window_size "${WINDOW:-3}"
           --sde_window_range "${WINDOW_RANGE:-0,5}" --no-global_std --clip_range 1e-4 --kl_coef 0)
NAME="flow_grpo_fast"
source scripts/lib/sd3.sh
