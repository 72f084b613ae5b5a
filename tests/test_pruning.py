"""Edge selection: exact edge sets on small trees, and schedule trajectories over training iterations."""

import pytest
import torch

from branchgrpo.core import advantages as adv
from branchgrpo.core import plans
from branchgrpo.config import algorithm_from_flags
from branchgrpo.core.graph import SDE, skeleton_graph
from branchgrpo.core.pruning import (
    DepthPruningSchedule,
    WindowSchedule,
    depth_pruning_mask,
    extreme_mask,
    parent_top1_mask,
    timestep_fraction_mask,
)


def tree():
    """T = 4, splits at 0 and 1, K = 2: root 0; 1, 2; 3, 4 (of 1), 5, 6 (of 2); chains 7..10 below 3..6 (SDE);
    leaves 11..14 (deterministic last step). Leaf rewards 1, 4, 3, 2."""
    g = skeleton_graph(plans.tree_plan(4, [0, 1], 2))
    assert g.parent.tolist() == [-1, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    return g, adv.tree_advantages(g, torch.tensor([1.0, 4.0, 3.0, 2.0]))


def edges(mask, g):
    return sorted(torch.nonzero(mask & g.stochastic).flatten().tolist())


def test_trainable_edges_exclude_the_last_step():
    g, _ = tree()
    assert edges(torch.ones(15, dtype=torch.bool), g) == list(range(1, 11))


def test_parent_top1_keeps_each_parents_best_child_subtree():
    g, a = tree()
    assert edges(parent_top1_mask(g, a, split_step=1), g) == [1, 2, 4, 5, 8, 9]


def test_parent_top1_with_ties_keeps_exactly_one_child():
    g = skeleton_graph(plans.tree_plan(4, [0, 1], 2))
    a = adv.tree_advantages(g, torch.tensor([2.0, 2.0, 3.0, 1.0]))
    kept = edges(parent_top1_mask(g, a, split_step=1), g)
    assert kept == [1, 2, 3, 5, 7, 9]


def test_extreme_keeps_best_and_worst_chains():
    g, a = tree()
    assert edges(extreme_mask(g, a, split_step=1, ratio=0.5), g) == [1, 2, 3, 4, 7, 8]
    assert edges(extreme_mask(g, a, split_step=1, ratio=1.0), g) == list(range(1, 11))


def test_depth_pruning_drops_child_depths():
    g, _ = tree()
    assert edges(depth_pruning_mask(g, [2]), g) == [1, 2, 7, 8, 9, 10]
    assert edges(depth_pruning_mask(g, []), g) == list(range(1, 11))


def test_timestep_fraction_trains_a_fresh_random_subset_per_chain():
    g = skeleton_graph(plans.group_plan(11, 3), num_prompts=2)
    m0 = timestep_fraction_mask(g, 0.6, seed=1, iteration=0, prompt_keys=(5, 6))
    per_chain = [int(m0[c * 12:(c + 1) * 12].sum()) for c in range(6)]
    assert per_chain == [6] * 6  # floor(0.6 * 10)
    assert bool((m0 <= g.stochastic).all())
    assert torch.equal(m0, timestep_fraction_mask(g, 0.6, 1, 0, (5, 6)))
    assert not torch.equal(m0, timestep_fraction_mask(g, 0.6, 1, 1, (5, 6)))
    chains = {tuple(torch.nonzero(m0[c * 12:(c + 1) * 12]).flatten().tolist()) for c in range(6)}
    assert len(chains) > 1


def test_window_schedule_trajectory_and_rollback():
    w = WindowSchedule(size=4, interval=25, stride=1, start=0, max_start=15)
    assert w.window(0) == [0, 1, 2, 3] and w.window(24) == [0, 1, 2, 3]
    assert w.window(25) == [1, 2, 3, 4] and w.window(25 * 15) == [15, 16, 17, 18]
    assert w.window(25 * 16) == [0, 1, 2, 3]  # rolled back
    frozen = WindowSchedule(size=4, interval=20, stride=0, start=2, max_start=2)
    assert frozen.window(0) == frozen.window(500) == [2, 3, 4, 5]


def test_depth_pruning_slides_towards_the_stop_depth_in_both_directions():
    down = DepthPruningSchedule((15, 16, 17, 18), True, 30, 9, 1.0, 1000)
    assert down.pruned_depths(0) == [15, 16, 17, 18] and down.pruned_depths(29) == [15, 16, 17, 18]
    assert down.pruned_depths(30) == [14, 15, 16, 17]
    assert down.pruned_depths(180) == [9, 10, 11, 12] and down.pruned_depths(900) == [9, 10, 11, 12]
    up = DepthPruningSchedule((5, 6), True, 2, 10, 1.0, 1000)
    assert up.pruned_depths(2) == [6, 7] and up.pruned_depths(8) == [9, 10] and up.pruned_depths(99) == [9, 10]
    gated = DepthPruningSchedule((5, 6), False, 1, None, 0.5, 100)
    assert gated.pruned_depths(49) == [5, 6] and gated.pruned_depths(50) == []


def test_schedule_state_round_trip_and_changed_flags_refused():
    a = algorithm_from_flags(mix_ode_sde_tree=True, depth_pruning="15,16", depth_pruning_slide=True)
    a.plan(77)
    a.select(skeleton_graph(a.plan(77)), torch.zeros(219, dtype=torch.float64), 77)
    state = a.state_dict()
    b = algorithm_from_flags(mix_ode_sde_tree=True, depth_pruning="15,16", depth_pruning_slide=True)
    b.load_state_dict(state)
    assert b.state_dict() == state and state["window"]["last_iteration"] == 77
    c = algorithm_from_flags(mix_ode_sde_tree=True, mix_sde_window_size=3, depth_pruning="15,16",
                             depth_pruning_slide=True)
    with pytest.raises(ValueError, match="settings changed"):
        c.load_state_dict(state)


def test_branchgrpo_mix_window_moves_with_the_training_iteration():
    a = algorithm_from_flags(mix_ode_sde_tree=True, mix_window_interval=30)
    steps = lambda plan: sorted(set((plan.step[plan.kind == SDE] - 1).tolist()))
    assert steps(a.plan(0)) == [0, 1, 2, 3, 6, 9]
    assert steps(a.plan(30)) == [0, 1, 2, 3, 4, 6, 9]
    assert steps(a.plan(30 * 8)) == [0, 3, 6, 8, 9, 10, 11]


def test_mixgrpo_trains_only_window_edges():
    a = algorithm_from_flags(algo="mixgrpo", sampling_steps=20, num_generations=3, mix_sde_window_size=5,
                             mix_window_interval=10)
    g = skeleton_graph(a.plan(20))
    trained = a.select(g, torch.zeros(g.num_nodes, dtype=torch.float64), 20)
    assert sorted(set((g.step[trained] - 1).tolist())) == [2, 3, 4, 5, 6]
    assert int(trained.sum()) == 3 * 5


def test_pruning_step_ratio_gates_width_pruning():
    a = algorithm_from_flags(width_pruning_mode=1, pruning_step_ratio=0.5, max_train_steps=10)
    g = skeleton_graph(a.plan(0))
    values = torch.arange(g.num_nodes, dtype=torch.float64)
    assert int(a.select(g, values, 4).sum()) == 122 and int(a.select(g, values, 5).sum()) == 202


def test_width_pruning_ranks_by_fused_values_not_by_clipped_advantages():
    """With --adv_clip_max below the depth's z-scores every clipped advantage ties, and the first child used to win:
    the selections rank by the unclipped advantages, and only the loss sees clipped ones."""
    from branchgrpo.runtime.update import select_edges

    algo = algorithm_from_flags(sampling_steps=4, tree_split_points="0,1", width_pruning_mode=1, adv_clip_max=0.1)
    graph = skeleton_graph(algo.plan(0))
    rewards = torch.tensor([10.0, 11.0, 0.0, 1.0])  # leaves in order; pairs of siblings after the last split
    advantages = algo.advantages(graph, {"r": rewards}, {"r": 1.0}, "sum")
    assert float(advantages[graph.leaves].abs().min()) > 0.1  # unclipped
    keep = algo.select(graph, advantages, 0)
    trained_chain = keep[graph.parent[graph.leaves]]  # the leaf edge itself is deterministic: look one step up
    assert rewards[trained_chain].tolist() == [11.0, 1.0]  # the better child of each parent, not the first
    edges = select_edges(graph, keep, advantages, clip=0.1)
    assert float(edges.advantage.abs().max()) == pytest.approx(0.1)
    extreme = algorithm_from_flags(sampling_steps=4, tree_split_points="0,1", width_pruning_mode=2,
                                   width_pruning_ratio=0.5, adv_clip_max=0.1)
    keep = extreme.select(graph, extreme.advantages(graph, {"r": rewards}, {"r": 1.0}, "sum"), 0)
    assert sorted(rewards[keep[graph.parent[graph.leaves]]].tolist()) == [0.0, 11.0]  # the best and the worst leaf
