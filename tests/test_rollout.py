"""Rollout graphs: honest counts, depth batching, shared prefixes, split noise, determinism, Theorem 1."""

import json
import math
import subprocess
import sys

import pytest
import torch
from scipy import stats

from branchgrpo.core import plans, sde
from branchgrpo.core.graph import SDE, plan_counts
from branchgrpo.core.rollout import NoiseKeys, run_rollout

KERNEL = sde.Kernel("dance", 0.3)


class CountingVelocity:
    """A real (analytic) velocity that records every call: data x0 ~ N(0.5, 0.6^2) per element."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, sigma, prompt):
        self.batch_sizes.append(x.shape[0])
        s = sigma.double().reshape(-1, *([1] * (x.dim() - 1)))
        mean, var = (1 - s) * 0.5, (1 - s) ** 2 * 0.36 + s**2
        return (-0.5 + (s - (1 - s) * 0.36) / var * (x.double() - mean)).float()


def rollout(plan, num_prompts=2, iteration=0, batch_size=64, r=1.0, shape=(2, 3, 3), shared=None, steps=None, kernel=KERNEL):
    steps = steps or plan.num_steps
    vel = CountingVelocity()
    keys = NoiseKeys(seed=7, iteration=iteration, prompt_keys=tuple(range(100, 100 + num_prompts)), shared_root_key=shared)
    g = run_rollout(plan, vel, sde.make_sigmas(steps, 3.0), kernel, keys, shape, batch_size=batch_size,
                    branch_innovation=r, keep_all_latents=True)
    return g, vel


@pytest.mark.parametrize("T,splits,K", [(20, [0, 3, 6, 9], 2), (10, [2, 5], 3), (8, [0], 4), (16, [1, 2, 3], 2),
                                        (6, [4], 2)])
def test_tree_counts_equal_counted_calls(T, splits, K):
    plan = plans.tree_plan(T, splits, K)
    g, vel = rollout(plan, num_prompts=3)
    counts = plan_counts(plan)
    leaves = K ** len(splits)
    assert counts["leaves"] == leaves
    assert sum(vel.batch_sizes) == 3 * counts["forward_passes"] == g.num_forward_passes
    # closed form: nodes alive at step i is K^(number of splits before i); one forward each for i < T
    alive = [K ** sum(1 for s in splits if s < i) for i in range(T + 1)]
    assert counts["forward_passes"] == sum(alive[:T])
    assert counts["nodes"] == sum(alive)
    assert counts["trainable_edges"] == sum(alive[1:T])  # every edge but the deterministic last step
    assert g.leaves.numel() == 3 * leaves and bool((g.step[g.leaves] == T).all())


@pytest.mark.slow
def test_default_flux_tree_counts_from_the_cli():
    out = subprocess.run([sys.executable, "-m", "branchgrpo.plan", "--algo", "branchgrpo", "--sampling_steps", "20",
                          "--tree_split_points", "0,3,6,9", "--branch_factor", "2", "--json"],
                         capture_output=True, text=True, check=True)
    c = json.loads(out.stdout)
    assert (c["leaves"], c["forward_passes"], c["nodes"], c["edges"], c["trainable_edges"]) == (16, 203, 219, 218, 202)
    assert c["forward_passes_per_leaf"] == pytest.approx(12.6875)
    assert c["trained_edges"] == 202 and c["trained_edges_per_leaf"] == pytest.approx(12.625)


def test_group_and_comb_counts_equal_counted_calls():
    for plan in (plans.group_plan(12, 5), plans.group_plan(12, 4, sde_steps=[3, 4, 5]),
                 plans.comb_plan(10, [0, 2, 4], 3, [1, 2, 3])):
        g, vel = rollout(plan, num_prompts=2)
        assert sum(vel.batch_sizes) == 2 * plan_counts(plan)["forward_passes"]
    dance = plan_counts(plans.group_plan(20, 12))
    assert (dance["forward_passes_per_leaf"], dance["trainable_edges_per_leaf"]) == (20, 19)
    comb = plans.comb_plan(16, list(range(8)), 12, [1, 2, 3])
    c = plan_counts(comb)
    assert c["trainable_edges"] == 8 * 12 and c["train_forward_passes"] == 8  # one shared parent per k
    # anchor: 16 forwards; each member: itself + its ODE chain nodes below T, per granularity
    per_member = {k: 1 + sum(len(range(k + 1 + g, 16, g)) for g in (1, 2, 3)) for k in range(8)}
    assert c["forward_passes"] == 16 + 12 * sum(per_member.values())


def test_nodes_of_one_depth_are_evaluated_together():
    plan = plans.tree_plan(20, [0, 3, 6, 9], 2)
    _, vel = rollout(plan, num_prompts=4, batch_size=1000)
    # one call per depth: 4 prompts x nodes alive at that step
    alive = [2 ** sum(1 for s in (0, 3, 6, 9) if s < i) for i in range(20)]
    assert vel.batch_sizes == [4 * a for a in alive]
    _, vel = rollout(plan, num_prompts=4, batch_size=24)
    assert max(vel.batch_sizes) == 24 and len(vel.batch_sizes) == sum(math.ceil(4 * a / 24) for a in alive)


def test_siblings_share_their_prefix_bitwise_and_differ_after_the_split():
    plan = plans.tree_plan(8, [2, 5], 2)
    g, _ = rollout(plan, num_prompts=1)
    leaves = g.leaves.tolist()
    paths = []
    for leaf in leaves:
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            node = int(g.parent[node])
        paths.append(path[::-1])
    a, b = paths[0], paths[1]  # siblings of the last split (step 5)
    assert a[:6] == b[:6] and a[6] != b[6]
    assert torch.equal(g.node_latents(torch.tensor(a[:6])), g.node_latents(torch.tensor(b[:6])))
    assert not torch.allclose(g.node_latents(torch.tensor([a[6]])), g.node_latents(torch.tensor([b[6]])))
    c = paths[2]  # cousin: shares steps 0..2 only
    assert a[:3] == c[:3] and a[3] != c[3]


@pytest.mark.parametrize("r", [0.3, 0.7, 1.0])
def test_sibling_noise_correlation_is_one_minus_r_squared(r):
    plan = plans.tree_plan(4, [0], 2)
    g, _ = rollout(plan, num_prompts=8, r=r, shape=(4096,))
    children = torch.nonzero(g.depth == 1).flatten()
    root_x = g.node_latents(g.parent[children])
    v = CountingVelocity()(root_x, torch.ones(children.numel()), None)
    mean, std = sde.sde_mean_std(root_x, v, torch.ones(len(children)), torch.full((len(children),), float(g.sigmas[1])), KERNEL)
    eps = (g.node_latents(children) - mean) / std.reshape(-1, 1)
    a, b = eps[0::2].flatten(), eps[1::2].flatten()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(corr - (1 - r * r)) < 0.02, corr  # 32k pairs: standard error < 0.006
    assert abs(float(eps.std()) - 1) < 0.02  # each child alone is an ordinary SDE step


def test_split_child_log_prob_uses_the_std_it_was_drawn_with():
    plan = plans.tree_plan(6, [1], 2, split_noise_scale=2.5)
    g, _ = rollout(plan, num_prompts=1, shape=(64,))
    split_children = torch.nonzero(g.step == 2).flatten()
    plain = torch.nonzero(g.step == 3).flatten()
    parent_x = g.node_latents(g.parent[split_children])
    sigma, sigma_next = torch.full((2,), float(g.sigmas[1])), torch.full((2,), float(g.sigmas[2]))
    v = CountingVelocity()(parent_x, sigma, None)
    mean, std1 = sde.sde_mean_std(parent_x, v, sigma, sigma_next, KERNEL)
    torch.testing.assert_close(g.std[split_children], 2.5 * std1)
    rescored = sde.gaussian_log_prob(g.node_latents(split_children), mean, g.std[split_children])
    assert torch.equal(rescored, g.log_prob[split_children])
    wrong = sde.gaussian_log_prob(g.node_latents(split_children), mean, std1)
    assert (wrong - rescored).abs().min() > 1.0  # the official code's std would be far off
    # plain (non-split) edges keep the unscaled kernel std
    n = plain.numel()
    _, std_plain = sde.sde_mean_std(g.node_latents(g.parent[plain]), torch.zeros(n, 64), torch.full((n,), float(g.sigmas[2])),
                                    torch.full((n,), float(g.sigmas[3])), KERNEL)
    torch.testing.assert_close(g.std[plain], std_plain)


def test_reruns_are_bitwise_equal_and_iterations_differ():
    plan = plans.tree_plan(10, [0, 4], 3)
    a, _ = rollout(plan, num_prompts=3, batch_size=7)
    b, _ = rollout(plan, num_prompts=3, batch_size=50)  # another batch size: same noise keys
    c, _ = rollout(plan, num_prompts=3, iteration=1)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.allclose(a.latents, c.latents)


def test_init_same_noise_shares_roots_across_prompts():
    plan = plans.group_plan(5, 3)
    g, _ = rollout(plan, num_prompts=2, shared=0)
    roots = torch.nonzero(g.parent < 0).flatten()
    x = g.node_latents(roots)
    assert all(torch.equal(x[0], x[i]) for i in range(1, len(roots)))
    g2, _ = rollout(plan, num_prompts=2)
    x2 = g2.node_latents(torch.nonzero(g2.parent < 0).flatten())
    assert not torch.equal(x2[0], x2[1])


def test_mix_tree_is_sde_only_in_window_and_split_steps():
    plan = plans.tree_plan(20, [0, 3, 6, 9], 2, sde_steps=[10, 11, 12, 13])
    parent_step = plan.step - 1
    sde_steps = set(parent_step[plan.kind == SDE].tolist())
    assert sde_steps == {0, 3, 6, 9, 10, 11, 12, 13}
    assert plan_counts(plan)["trainable_edges"] == 2 + 4 + 8 + 16 + 4 * 16


@pytest.mark.parametrize("r", [0.3, 1.0])
@pytest.mark.slow
def test_tree_leaves_have_the_law_of_sequential_rollouts(r):
    """Theorem 1: with the analytic Gaussian velocity, a leaf of a tree (splits 0, 3, 6, 9; innovation r) has the
    same distribution as an independent sequential SDE rollout. Two-sample KS test on one leaf per tree (iid across
    trees); the official lambda = 4 split noise is shown to fail the same test."""
    T, n_trees, dims = 12, 600, 16
    plan = plans.tree_plan(T, [0, 3, 6, 9], 2)
    g, _ = rollout(plan, num_prompts=n_trees, r=r, shape=(dims,), steps=T)
    leaves = g.leaves.reshape(n_trees, 16)
    pick = leaves[torch.arange(n_trees), torch.arange(n_trees) % 16]
    tree_x = g.node_latents(pick).flatten()
    # another iteration's keys: the reference must be independent of the trees (same keys would give it the
    # trees' root noise and make leaf 0 equal to it, inflating the p-values)
    seq, _ = rollout(plans.group_plan(T, 1), num_prompts=n_trees, shape=(dims,), steps=T, iteration=1)
    seq_x = seq.node_latents(seq.leaves).flatten()
    assert stats.ks_2samp(tree_x.numpy(), seq_x.numpy()).pvalue > 1e-3
    assert abs(float(tree_x.var() / seq_x.var()) - 1) < 0.05
    wide, _ = rollout(plans.tree_plan(T, [0, 3, 6, 9], 2, split_noise_scale=4.0), num_prompts=n_trees,
                      shape=(dims,), steps=T, kernel=sde.Kernel("dance", 0.3))
    wide_x = wide.node_latents(wide.leaves.reshape(n_trees, 16)[:, 0]).flatten()
    assert stats.ks_2samp(wide_x.numpy(), seq_x.numpy()).pvalue < 1e-6
