"""Advantage estimators on hand-built graphs with hand-computed values."""

import math

import pytest
import torch

from branchgrpo.core import advantages as adv
from branchgrpo.core import plans
from branchgrpo.core.graph import skeleton_graph


def small_tree():
    """T = 3, splits at steps 0 and 1, K = 2. Node ids: root 0; depth 1: 1, 2; depth 2: 3, 4 (of 1), 5, 6 (of 2);
    leaves (deterministic last step) 7, 8, 9, 10 below 3, 4, 5, 6."""
    g = skeleton_graph(plans.tree_plan(3, [0, 1], 2))
    assert g.parent.tolist() == [-1, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6]
    return g


def test_uniform_fusion_is_the_mean_of_the_leaf_descendants():
    g = small_tree()
    values = adv.fuse_rewards(g, torch.tensor([1.0, 2.0, 3.0, 5.0]), alpha=0.0)
    expected = [2.75, 1.5, 4.0, 1, 2, 3, 5, 1, 2, 3, 5]
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float64))


def test_depthwise_normalisation_by_hand():
    g = small_tree()
    a = adv.tree_advantages(g, torch.tensor([1.0, 2.0, 3.0, 5.0]), alpha=0.0)
    std = math.sqrt((1.75**2 + 0.75**2 + 0.25**2 + 2.25**2) / 3)  # unbiased, depth 2 (and 3)
    leaf_z = [-1.75 / std, -0.75 / std, 0.25 / std, 2.25 / std]
    expected = [0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)] + leaf_z + leaf_z
    torch.testing.assert_close(a, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-7)


def test_path_weighted_fusion_uses_path_log_probs_not_single_edges():
    g = small_tree()
    g.log_prob[:] = torch.tensor([0, 0, 0, 1.0, 0, 0, 2.0, 0, 0, 0, 0])  # cum: leaf 7 -> 1, leaf 10 -> 2
    r = torch.tensor([1.0, 2.0, 3.0, 5.0])
    v = adv.fuse_rewards(g, r, alpha=1.0)
    e = math.e
    v1 = (e * 1 + 2) / (e + 1)
    v2 = (3 + e**2 * 5) / (1 + e**2)
    v0 = (e * 1 + 2 + 3 + e**2 * 5) / (e + 2 + e**2)
    torch.testing.assert_close(v[:3], torch.tensor([v0, v1, v2], dtype=torch.float64))
    # the official per-edge softmax would weigh children 1 and 2 equally (their own edge log-probs are both 0)
    assert abs(v0 - (v1 + v2) / 2) > 0.5
    # a large alpha concentrates on the most probable leaf below each node
    sharp = adv.fuse_rewards(g, r, alpha=60.0)
    torch.testing.assert_close(sharp[:3], torch.tensor([5.0, 1.0, 5.0], dtype=torch.float64))


def test_zero_variance_depth_gives_zero_not_nan():
    g = small_tree()
    a = adv.tree_advantages(g, torch.full((4,), 0.7), alpha=1.0)
    assert torch.equal(a, torch.zeros_like(a))
    b = adv.tree_advantages(g, torch.tensor([1.0, 1.0, 3.0, 3.0]), alpha=0.0)
    assert torch.all(torch.isfinite(b)) and float(b[3]) == -float(b[5])


def test_normalisation_stays_within_each_prompt():
    g = skeleton_graph(plans.tree_plan(3, [0, 1], 2), num_prompts=2)
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 100.0, 200.0, 300.0, 500.0])
    a = adv.tree_advantages(g, r)
    torch.testing.assert_close(a[:11], a[11:])  # the second prompt is the first scaled: same z-scores


def test_group_zscore_broadcasts_along_each_chain():
    g = skeleton_graph(plans.group_plan(3, 3))
    r = torch.tensor([1.0, 2.0, 4.0])
    a = adv.group_advantages(g, r)
    mean, std = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    for chain, reward in enumerate(r.tolist()):
        nodes = torch.arange(chain * 4, chain * 4 + 4)
        torch.testing.assert_close(a[nodes], torch.full((4,), (reward - mean) / std, dtype=torch.float64))


def test_g2rpo_sums_per_step_per_granularity_zscores():
    steps, G, grans = [0, 1], 3, [1, 2]
    g = skeleton_graph(plans.comb_plan(4, steps, G, grans))
    leaves = g.leaves
    gen = torch.Generator().manual_seed(3)
    r = torch.rand(leaves.numel(), generator=gen, dtype=torch.float64)
    a = adv.group_advantages(g, r)
    # independent reference: explicit dictionaries
    groups = {}
    for pos, leaf in enumerate(leaves.tolist()):
        groups.setdefault(int(g.group[leaf]), []).append(pos)
    z = {}
    for label, positions in groups.items():
        if label < 0:
            continue
        vals = [float(r[p]) for p in positions]
        m = sum(vals) / len(vals)
        s = math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1))
        z.update({p: (float(r[p]) - m) / s for p in positions})
    members = torch.nonzero(g.stochastic).flatten()
    assert members.numel() == len(steps) * G
    for m in members.tolist():
        below = [p for p, leaf in enumerate(leaves.tolist()) if _is_ancestor(g, m, leaf)]
        assert len(below) == len(grans)  # one finished image per granularity
        assert float(a[m]) == pytest.approx(sum(z[p] for p in below), abs=1e-7)  # eps 1e-8 in the std
    anchor_leaf = leaves[g.group[leaves] == -1]
    assert anchor_leaf.numel() == 1 and torch.isnan(a[anchor_leaf]).all()


def _is_ancestor(g, node, leaf):
    while leaf >= 0:
        if leaf == node:
            return True
        leaf = int(g.parent[leaf])
    return False


def test_non_finite_rewards_are_left_out():
    g = small_tree()
    a = adv.tree_advantages(g, torch.tensor([1.0, float("nan"), 3.0, 5.0]))
    assert torch.isnan(a[[4, 8]]).all()  # the chain of the missing leaf
    assert torch.isfinite(a[[0, 1, 2, 3, 5, 6]]).all()
    values = adv.fuse_rewards(g, torch.tensor([1.0, float("nan"), 3.0, 5.0]), alpha=0.0)
    assert float(values[1]) == 1.0  # node 1 averages only its finite leaf


def test_multi_reward_combination_modes():
    g = skeleton_graph(plans.group_plan(2, 4))
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([40.0, 10.0, 30.0, 20.0])}
    weights = {"a": 1.0, "b": 0.5}
    summed = adv.combined_advantages(adv.group_advantages, g, scores, weights, "sum")
    torch.testing.assert_close(summed, adv.group_advantages(g, scores["a"] + 0.5 * scores["b"]))
    per = adv.combined_advantages(adv.group_advantages, g, scores, weights, "advantage")
    torch.testing.assert_close(per, adv.group_advantages(g, scores["a"]) + 0.5 * adv.group_advantages(g, scores["b"]))
    assert not torch.allclose(summed, per)  # raw-sum is dominated by the larger-scale reward; the modes differ
    with pytest.raises(ValueError, match="--reward_combine"):
        adv.combined_advantages(adv.group_advantages, g, scores, weights, "max")


def test_standardize_groups_and_degenerate_cases():
    z = adv.standardize(torch.tensor([1.0, 3.0, 5.0, 2.0, 2.0, 7.0]), torch.tensor([0, 0, 0, 1, 1, 2]))
    torch.testing.assert_close(z[:3], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-7)
    assert torch.equal(z[3:], torch.zeros(3, dtype=torch.float64))  # zero std, and a single member
