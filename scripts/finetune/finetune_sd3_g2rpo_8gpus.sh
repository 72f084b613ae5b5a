#!/usr/bin/env bash
# G2RPO on Stable Diffusion 3.5 (Singular Stochastic Sampling + Multi-Granularity Advantage Integration): 10 steps, an
# ODE anchor per prompt, 12 single-SDE-step members (flow kernel, eta 0.7) at each of steps 0..4, each finished at
# granularities 1, 2, 3; clip 1e-4 (the G2RPO paper's 16-step recipe on FLUX, scaled to SD3.5's 10 steps).
# Environment: scripts/lib/sd3.sh.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-1}"
ALGO_ARGS=(--algo g2rpo --sampling_steps 10 --num_generations "${NUM_GENERATIONS:-12}" --sde_kernel flow --eta 0.7
           --g2rpo_steps 0,1,2,3,4 --g2rpo_granularities 1,2,3 --clip_range 1e-4 --reward_combine advantage)
NAME="g2rpo"
source scripts/lib/sd3.sh
