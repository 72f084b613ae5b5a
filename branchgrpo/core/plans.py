"""Plan builders: the topology of one prompt's rollout for each algorithm (see graph.py for the data type).

Every plan ends each path with a deterministic step to sigma = 0 (x_T = x0_hat of the last state, DESIGN section 2):
that edge is ODE, has no log-prob, and is never trained.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from branchgrpo.core.graph import ODE, SDE, GraphPlan, PlanBuilder


def _last_step_kind(step: int, num_steps: int, sde_steps: Iterable[int] | None) -> int:
    if step == num_steps - 1:
        return ODE
    return SDE if sde_steps is None or step in sde_steps else ODE


def tree_plan(
    num_steps: int,
    split_points: Sequence[int],
    branch_factor: int = 2,
    sde_steps: Iterable[int] | None = None,
    split_noise_scale: float = 1.0,
) -> GraphPlan:
    """BranchGRPO: one root; at each step in `split_points` every node emits `branch_factor` SDE children.

    `sde_steps` (BranchGRPO-Mix): the non-split steps that are SDE; None = all. Split steps are always SDE.
    `split_noise_scale` (lambda) scales the std of split edges' kernels. Split children are marked as siblings whose
    noise may share a component (paper Eq. 2; the rollout's `branch_innovation` r decides how much, r = 1: none).
    """
    splits = set(split_points)
    sde = None if sde_steps is None else set(sde_steps) | splits
    b = PlanBuilder(num_steps)
    frontier = [b.root()]
    for i in range(num_steps):
        children = []
        for node in frontier:
            if i in splits:
                children += [
                    b.edge(node, i + 1, SDE, std_scale=split_noise_scale, shares_noise=True)
                    for _ in range(branch_factor)
                ]
            else:
                children.append(b.edge(node, i + 1, _last_step_kind(i, num_steps, sde)))
        frontier = children
    return b.build()


def group_plan(num_steps: int, num_generations: int, sde_steps: Iterable[int] | None = None) -> GraphPlan:
    """DanceGRPO (sde_steps None: every non-final step SDE) and MixGRPO (sde_steps = the window): G independent
    chains per prompt, each from its own initial noise slot (`--init_same_noise` makes the slots share noise)."""
    sde = None if sde_steps is None else set(sde_steps)
    b = PlanBuilder(num_steps)
    for g in range(num_generations):
        node = b.root(noise_slot=g)
        for i in range(num_steps):
            node = b.edge(node, i + 1, _last_step_kind(i, num_steps, sde))
    return b.build()


def comb_plan(
    num_steps: int, branch_steps: Sequence[int], num_generations: int, granularities: Sequence[int]
) -> GraphPlan:
    """G2RPO: an ODE anchor trajectory from one initial noise; at each step k in `branch_steps`, G members take ONE
    SDE step from the anchor's x_k, and each member is finished by ODE at every granularity (stride) g: steps
    k+1, k+1+g, k+1+2g, ... and finally T.

    Leaves are labelled group = index of (k, g), so advantages are z-scored per (k, granularity) over the G members;
    the anchor's own leaf gets group -1 (scored for logging, never normalised).
    """
    b = PlanBuilder(num_steps)
    anchor = [b.root()]
    for i in range(num_steps):
        anchor.append(b.edge(anchor[-1], i + 1, ODE))
    b.set_group(anchor[-1], -1)
    for k_index, k in enumerate(branch_steps):
        for _ in range(num_generations):
            member = b.edge(anchor[k], k + 1, SDE)
            for g_index, g in enumerate(granularities):
                node = member
                for step in list(range(k + 1 + g, num_steps, g)) + [num_steps]:
                    node = b.edge(node, step, ODE, group=k_index * len(granularities) + g_index)
    return b.build()
