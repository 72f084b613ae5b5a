#!/usr/bin/env bash
# G2RPO on Wan2.2 T2V-A14B (two experts), one node of 8 GPUs: FLUX's G2RPO settings (16 steps, 12 videos per prompt,
# flow SDE kernel at eta 0.7, singular SDE steps 0-7 at granularities 1, 2, 3, lr 2e-6, clip range 1e-4) at the A14B
# recipe's shift 12 and guidance 4.0 / 3.0, LoRA by default. At shift 12 the SDE steps 0-7 of 16 are all the
# high-noise expert's: pass --train_experts high (TRAIN_EXPERTS=high) to leave the low-noise expert untouched.
# Environment and defaults: scripts/lib/wan22.sh and scripts/lib/wan.sh. Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
LR="${LR:-2e-6}"
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-1}"
ALGO_ARGS=(--algo g2rpo --sampling_steps 16 --num_generations "${NUM_GENERATIONS:-12}" --sde_kernel flow --eta 0.7
           --g2rpo_steps 0,1,2,3,4,5,6,7 --g2rpo_granularities 1,2,3 --clip_range 1e-4 --reward_combine advantage)
NAME="g2rpo"
source scripts/lib/wan22.sh
