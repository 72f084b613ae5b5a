"""Advantage estimators over a rollout graph: pure functions of its tensors (DESIGN sections 4 and 6).

- `tree_advantages` (BranchGRPO): reward fusion over path log-probs (paper Eq. 3), then depth-wise normalisation
  within each prompt's tree (Eq. 4); each edge inherits its child node's advantage.
- `group_advantages` (DanceGRPO, MixGRPO, G2RPO, Flow-GRPO): leaf rewards z-scored within (prompt, leaf group) - or
  centred there and divided by the std of all the iteration's rewards (Flow-GRPO's default); a node's
  advantage is the sum over its leaf descendants. For a chain (one leaf) that is the leaf's z-score broadcast to
  every step; for a G2RPO member it is the sum over granularities (Multi-Granularity Advantage Integration).

Rewards are given per leaf, in the order of `graph.leaves`. A non-finite leaf reward is treated as missing: it
takes no part in any mean, std or fusion, and nodes left without a finite leaf below get NaN (the trainer gives
those edges zero weight, on every rank alike).
"""

from __future__ import annotations

from typing import Callable

import torch

from branchgrpo.core.graph import RolloutGraph


def standardize(values: torch.Tensor, keys: torch.Tensor, min_std: float = 1e-6, eps: float = 1e-8,
                scale: float | None = None) -> torch.Tensor:
    """(v - mean_k) / (std_k + eps) within groups of equal key, over finite values (unbiased std); `scale` given:
    every group is divided by that one std instead (Flow-GRPO's global std).

    Groups with fewer than two finite values or std < `min_std` give 0 (never NaN); non-finite inputs stay NaN.
    """
    v = values.to(torch.float64)
    finite = torch.isfinite(v)
    _, inverse = torch.unique(keys, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    zero = torch.zeros(num_groups, dtype=torch.float64)
    count = zero.index_add(0, inverse[finite], torch.ones_like(v[finite]))
    total = zero.index_add(0, inverse[finite], v[finite])
    mean = total / count.clamp(min=1)
    dev = torch.where(finite, v - mean[inverse], torch.zeros_like(v))
    var = zero.index_add(0, inverse, dev * dev) / (count - 1).clamp(min=1)
    std = var.sqrt() if scale is None else torch.full((num_groups,), float(scale), dtype=torch.float64)
    ok = (count >= 2) & (std >= min_std)
    z = torch.where(ok[inverse], dev / (std[inverse] + eps), torch.zeros_like(v))
    return torch.where(finite, z, torch.full_like(v, float("nan")))


def leaf_ancestor_pairs(graph: RolloutGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """All (leaf position, ancestor node) pairs, the leaf itself included: position indexes `graph.leaves`."""
    leaves = graph.leaves
    positions, ancestors = [], []
    pos = torch.arange(leaves.numel())
    node = leaves.clone()
    while node.numel():
        positions.append(pos)
        ancestors.append(node)
        up = graph.parent[node]
        alive = up >= 0
        pos, node = pos[alive], up[alive]
    return torch.cat(positions), torch.cat(ancestors)


def path_log_probs(graph: RolloutGraph) -> torch.Tensor:
    """Sum of edge log-probs from the root to each node (float64; ODE edges contribute 0)."""
    cum = graph.log_prob.to(torch.float64).clone()
    for d in range(1, int(graph.depth.max()) + 1):
        at = torch.nonzero(graph.depth == d).flatten()
        cum[at] += cum[graph.parent[at]]
    return cum


def fuse_rewards(graph: RolloutGraph, leaf_rewards: torch.Tensor, alpha: float,
                 leaf_log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Paper Eq. 3: V(n) = sum over leaves l below n of w_l r_l, w = softmax_l(alpha * log pi(path n -> l)).

    The path log-prob from n to l is cum(l) - cum(n); cum(n) is common to all of n's leaves and cancels in the
    softmax, so w_l is proportional to exp(alpha * cum(l)) restricted to the leaves below n. alpha = 0: the plain
    mean of the leaf descendants; alpha = 1: behaviour-policy weighting; large alpha: the most probable leaf.
    `leaf_log_weights` [num leaves] (guided expansion's importance weights) multiply each leaf's weight.
    """
    r = leaf_rewards.to(torch.float64)
    pos, anc = leaf_ancestor_pairs(graph)
    valid = torch.isfinite(r)[pos]
    pos, anc = pos[valid], anc[valid]
    logits = alpha * path_log_probs(graph)[graph.leaves][pos]
    if leaf_log_weights is not None:
        logits = logits + leaf_log_weights.to(torch.float64)[pos]
    n = graph.num_nodes
    peak = torch.full((n,), -float("inf"), dtype=torch.float64).scatter_reduce(0, anc, logits, reduce="amax")
    w = torch.exp(logits - peak[anc])
    num = torch.zeros(n, dtype=torch.float64).index_add(0, anc, w * r[pos])
    den = torch.zeros(n, dtype=torch.float64).index_add(0, anc, w)
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, float("nan")))


def tree_advantages(graph: RolloutGraph, leaf_rewards: torch.Tensor, alpha: float = 0.0,
                    leaf_log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Fusion (Eq. 3) then depth-wise normalisation (Eq. 4) within each prompt: A [N] (float64, NaN = no data)."""
    values = fuse_rewards(graph, leaf_rewards, alpha, leaf_log_weights)
    keys = graph.prompt * (int(graph.depth.max()) + 1) + graph.depth
    return standardize(values, keys)


def group_advantages(graph: RolloutGraph, leaf_rewards: torch.Tensor, std: float | None = None) -> torch.Tensor:
    """Leaf z-scores within (prompt, leaf group), summed over each node's leaf descendants: A [N] (float64). `std`
    given: the leaves are centred on their group's mean and divided by that std (Flow-GRPO's global std).

    Leaves with group -1 (G2RPO's anchor) are left out; nodes without a scored leaf below get NaN.
    """
    leaves = graph.leaves
    group = graph.group[leaves]
    keys = graph.prompt[leaves] * (int(graph.group.max()) + 2) + group + 1
    z = standardize(leaf_rewards, keys, scale=std)
    z = torch.where(group >= 0, z, torch.full_like(z, float("nan")))
    pos, anc = leaf_ancestor_pairs(graph)
    valid = torch.isfinite(z)[pos]
    total = torch.zeros(graph.num_nodes, dtype=torch.float64).index_add(0, anc[valid], z[pos[valid]])
    count = torch.zeros(graph.num_nodes, dtype=torch.float64).index_add(0, anc[valid], torch.ones_like(z[pos[valid]]))
    return torch.where(count > 0, total, torch.full_like(total, float("nan")))


Estimator = Callable[[RolloutGraph, torch.Tensor], torch.Tensor]


def combined_advantages(
    estimator: Estimator, graph: RolloutGraph, scores: dict[str, torch.Tensor], weights: dict[str, float], mode: str
) -> torch.Tensor:
    """Multi-reward combination (DESIGN section 7): "sum" = estimate once on the weighted sum of raw rewards;
    "advantage" = estimate per reward and sum the advantages with the weights."""
    if mode == "sum":
        return estimator(graph, sum(weights[k] * scores[k].to(torch.float64) for k in weights))
    if mode == "advantage":
        return sum(weights[k] * estimator(graph, scores[k]) for k in weights)
    raise ValueError(f"--reward_combine: expected 'sum' or 'advantage', got '{mode}'")
