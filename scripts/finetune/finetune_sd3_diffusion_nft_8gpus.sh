#!/usr/bin/env bash
# DiffusionNFT on Stable Diffusion 3.5 with the reference recipe's settings: no classifier-free guidance (GUIDANCE
# 1.0), beta 1 (BETA=0.1 for the OCR and multi-reward recipes), A_max 5, the velocity penalty to the base 1e-4,
# rewards standardised by the group mean and the iteration's std, theta_old moved with d = min(0.001 step, 0.5)
# (DECAY=delayed for OCR), every grid timestep trained, LoRA 32/64 at lr 3e-4, gradient clip 1. SAMPLER=ode
# (default): 16 Euler ODE chains per prompt; SAMPLER=tree: the tree of SPLITS (0,2,4,6 on the 10-step grid),
# stochastic (dance, eta 0.3) at its splits only. Environment and defaults: scripts/lib/sd3.sh. Extra flags go to
# the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
SAMPLER="${SAMPLER:-ode}"
GUIDANCE="${GUIDANCE:-1.0}"
ALGO_ARGS=(--algo diffusion_nft --sampling_steps 10 --nft_sampler "$SAMPLER" --nft_beta "${BETA:-1.0}"
           --kl_coef 1e-4 --global_std --nft_decay "${DECAY:-linear}" --nft_timestep_fraction 1.0)
case "$SAMPLER" in
  ode) ALGO_ARGS+=(--num_generations "${NUM_GENERATIONS:-16}") ;;
  tree) ALGO_ARGS+=(--nft_split_points "${SPLITS:-0,2,4,6}" --nft_branch_factor 2 --sde_kernel dance --eta 0.3) ;;
  *) echo "error: SAMPLER must be ode or tree, got '$SAMPLER'" >&2; exit 2 ;;
esac
NAME="diffusion_nft_${SAMPLER}"
source scripts/lib/sd3.sh
