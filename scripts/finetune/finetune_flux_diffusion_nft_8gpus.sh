#!/usr/bin/env bash
# DiffusionNFT on FLUX.1-dev with the reference recipe's settings: LoRA (rank 32, alpha 64) at learning rate 3e-4,
# gradient norm clipped at 1, beta 1 (BETA=0.1 for the OCR and multi-reward recipes), A_max 5, the velocity penalty
# to the base 1e-4, rewards standardised by the group mean and the iteration's global std, theta_old moved with
# d = min(0.001 step, 0.5) (DECAY=delayed for OCR), no classifier-free guidance, every grid timestep trained.
# SAMPLER=ode (default): 16 Euler ODE chains per prompt; SAMPLER=tree: the BranchGRPO tree of SPLITS (0,3,6,9),
# stochastic (dance, eta 0.3) at its splits only - 16 correlated samples for 203 forwards instead of 320.
# Environment and defaults: scripts/lib/flux.sh (here USE_LORA 1, LR 3e-4, MAX_GRAD_NORM 1.0); STEPS (20 sampling
# steps, the other FLUX launchers' grid); NUM_GENERATIONS (16). Extra flags go to the trainer.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
SAMPLER="${SAMPLER:-ode}"
USE_LORA="${USE_LORA:-1}" LR="${LR:-3e-4}" MAX_GRAD_NORM="${MAX_GRAD_NORM:-1.0}"
ALGO_ARGS=(--algo diffusion_nft --sampling_steps "${STEPS:-20}" --nft_sampler "$SAMPLER" --nft_beta "${BETA:-1.0}"
           --kl_coef 1e-4 --global_std --nft_decay "${DECAY:-linear}" --nft_timestep_fraction 1.0)
case "$SAMPLER" in
  ode) ALGO_ARGS+=(--num_generations "${NUM_GENERATIONS:-16}") ;;
  tree) ALGO_ARGS+=(--nft_split_points "${SPLITS:-0,3,6,9}" --nft_branch_factor 2 --sde_kernel dance --eta 0.3) ;;
  *) echo "error: SAMPLER must be ode or tree, got '$SAMPLER'" >&2; exit 2 ;;
esac
NAME="diffusion_nft_${SAMPLER}"
source scripts/lib/flux.sh
