#!/usr/bin/env bash
# G2RPO on Qwen-Image (Singular Stochastic Sampling + Multi-Granularity Advantage Integration): 16 steps, an ODE
# anchor per prompt, 12 single-SDE-step members (flow kernel, eta 0.7) at each of steps 0..7, each finished at
# granularities 1, 2, 3; clip 1e-4 (the G2RPO paper's settings; LR stays the LoRA default of scripts/lib/qwen_image.sh).
# Environment and defaults: scripts/lib/qwen_image.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
ALGO_ARGS=(--algo g2rpo --sampling_steps 16 --num_generations "${NUM_GENERATIONS:-12}" --sde_kernel flow --eta 0.7
           --g2rpo_steps 0,1,2,3,4,5,6,7 --g2rpo_granularities 1,2,3 --clip_range 1e-4 --reward_combine advantage)
NAME="g2rpo"
source scripts/lib/qwen_image.sh
