"""Dynamic branching (branchgrpo.algorithms.branching and .dynamic, issue 13): budgets counted by a counting velocity
function equal the plans, allocation favours spread, a rollout stepped from split to split equals the straight one
unless it keeps fewer children, split placement follows a planted variance peak and holds on a flat one, adaptive r
moves the right way, importance-corrected fusion reduces to plain fusion, and every policy's state survives a
kill/resume bitwise."""

import pytest
import torch

from branchgrpo.core import advantages as adv
from branchgrpo.core import sde
from branchgrpo.algorithms import dynamic as dyn
from branchgrpo.config import config_from_flags, parse_flags
from branchgrpo.core.graph import plan_counts
from branchgrpo.core.rollout import NoiseKeys, RolloutSetup, run_rollout
from trainer_utils import exported_weights, fast_args, make_toy_embeddings, metrics, train, without_timings

SHAPE = (2, 3)
POLICIES = dict(dynamic_allocation=True, adaptive_splits=True, adaptive_split_window=1, adaptive_innovation=True,
                guided_expansion=True)


def algorithm(**flags):
    args = ["--model", "toy", "--algo", "branchgrpo", "--sampling_steps", "10", "--tree_split_points", "0,2,4"]
    for k, v in flags.items():
        args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return config_from_flags(parse_flags(args)[0], validate="algorithm").build_algorithm()


class Counting:
    """A real (linear) velocity field that counts the rows it is asked for."""

    def __init__(self):
        self.rows = 0

    def __call__(self, x, sigma, prompt):
        self.rows += x.shape[0]
        return 0.5 * x + 0.1 * (prompt.float() + 1).reshape(-1, 1, 1)


def setup(velocity, num_prompts):
    """What the trainer hands the unit's rollout: a 10-step schedule, the kernel and keyed noise of the batch."""
    return RolloutSetup(velocity, sde.make_sigmas(10, 3.0), sde.Kernel("dance", 0.3),
                        NoiseKeys(7, 1, tuple(range(num_prompts))), SHAPE)


def rollout(plan, velocity, num_prompts, **kw):
    s = setup(velocity, num_prompts)
    return run_rollout(plan, velocity, s.sigmas, s.kernel, s.noise, SHAPE, **kw)


def test_allocation_budget_is_respected_exactly_and_favours_spread():
    algo = algorithm(dynamic_allocation=True)
    allocation = algo.schedules["allocation"]
    allocation.spread.observe([10, 11, 12, 13], torch.tensor([0.0, 0.05, 0.3, 0.1], dtype=torch.float64))
    ids = [10, 11, 12, 13, 99]  # 99: first visit -> the fixed tree
    plans = allocation.prompt_plans(0, ids)
    leaves = [int(p.is_leaf.sum()) for p in plans]
    assert leaves[0] == min(leaves) and leaves[2] >= leaves[3] >= leaves[1] > leaves[0], leaves
    assert dyn.allocate([0.1, 0.4, None, 0.2], [10, 20, 40], 1, 90) == [0, 2, 1, 1]  # a tight budget: by spread
    assert leaves[4] == 8  # 3 splits, K = 2
    velocity = Counting()
    graph = rollout(plans, velocity, len(ids))
    planned = sum(plan_counts(p)["forward_passes"] for p in plans)
    assert velocity.rows == graph.num_forward_passes == planned <= allocation.rollout_budget(len(ids))


def test_guided_expansion_forward_passes_equal_its_plan_and_grow_a_valid_tree():
    algo = algorithm(guided_expansion=True, guided_top_fraction=0.5)
    velocity = Counting()
    torch.manual_seed(0)
    score = lambda x0, prompt: x0.flatten(1).mean(1)  # noqa: E731 - a stand-in reward of x0-predictions
    graph = algo.rollout(0, setup(velocity, 3), [0, 1, 2], score)
    expected = plan_counts(algo.plan(0))
    assert velocity.rows == graph.num_forward_passes == 3 * expected["forward_passes"]
    assert graph.leaves.numel() == 3 * expected["leaves"] < 3 * 8
    assert bool((graph.parent[graph.parent >= 0] < torch.nonzero(graph.parent >= 0).flatten()).all())
    assert graph.node_latents(graph.leaves).shape == (graph.leaves.numel(), *SHAPE)


def test_guided_decodes_count_the_x0_predictions_scored_also_when_the_splits_move():
    algo = algorithm(guided_expansion=True, adaptive_splits=True, adaptive_split_window=1)
    scored = []

    def scorer(x0, prompt):
        scored.append(x0.shape[0])
        return x0.flatten(1).mean(1)

    graph = algo.rollout(0, setup(Counting(), 3), [0, 1, 2], scorer)
    before = algo.split_points
    figures = algo.observe(graph, graph.node_latents(graph.leaves).flatten(1).mean(1).double(), [0, 1, 2], 0)
    assert algo.split_points != before  # the statistics moved the splits after this rollout
    assert figures["guided_decodes"] == sum(scored) == 3 * (1 + 2 + 3)  # per prompt: 1 root, 2 nodes, 3 nodes


def test_rollout_with_equal_per_prompt_plans_equals_the_shared_plan_bitwise():
    algo = algorithm()
    plan = algo.plan(0)
    a, b = rollout(plan, Counting(), 2), rollout([plan, plan], Counting(), 2)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_prob, b.log_prob)
    assert torch.equal(a.is_leaf, b.is_leaf) and torch.equal(a.std_scale, b.std_scale)


def test_a_rollout_stepped_from_split_to_split_equals_the_straight_one_unless_it_keeps_fewer_children():
    from branchgrpo.bench.syncs import SyncCounter

    plan = algorithm().plan(0)  # splits at steps 0, 2, 4; K = 2
    straight = rollout(plan, Counting(), 2)
    with SyncCounter() as again:
        rollout(plan, Counting(), 2)
    assert not any("_layout" in where for where in again.by_where())  # laid out once, then from the cache
    paused, splits = setup(Counting(), 2).start(plan, pause_at_splits=True), []
    while (split := paused.next_split()) is not None:
        splits.append(split)
    graph = paused.finish()
    assert [sorted(set(graph.step[s.parents].tolist())) for s in splits] == [[0], [2], [4]]
    assert torch.equal(graph.latents, straight.latents) and torch.equal(graph.log_prob, straight.log_prob)
    roots = graph.node_latents(splits[0].parents)  # x0-predictions: x - sigma v at the split parents
    sigma = sde.make_sigmas(10, 3.0)[0]
    torch.testing.assert_close(splits[0].x0, roots - sigma * Counting()(roots, sigma, splits[0].prompt))
    velocity = Counting()
    pruned = setup(velocity, 2).start(plan, pause_at_splits=True)
    pruned.next_split().keep(torch.tensor([1, 2]))  # prompt 0's root keeps one child: a tree of 4 leaves
    graph = pruned.finish()
    assert [int((graph.prompt[graph.leaves] == b).sum()) for b in (0, 1)] == [4, 8]
    assert velocity.rows == graph.num_forward_passes < straight.num_forward_passes


def test_split_placement_moves_toward_a_planted_peak_and_holds_on_a_flat_history():
    flat = dyn.SplitPlacement([0, 3, 6], window=3, lo=0, hi=8, min_spacing=2, margin=0.1)
    for _ in range(3):
        flat.observe({0: (1.0, 0.3, 1), 3: (1.0, 0.3, 1), 6: (1.0, 0.3, 1)})
    assert flat.points == [0, 3, 6]
    peaked = dyn.SplitPlacement([0, 3, 6], window=2, lo=0, hi=8, min_spacing=2, margin=0.1)
    history = {s: (1.0 + 4.0 * (s == 5), 0.3, 1) for s in range(9)}  # a planted variance peak at step 5
    for _ in range(6):
        peaked.observe(history)
    assert peaked.points == [0, 3, 5]  # the split next to the peak moved onto it; the others had no gain
    # observed only at the split steps (as in training), a rising trend is followed step by step
    trend = dyn.SplitPlacement([0, 3, 6], window=1, lo=0, hi=8, min_spacing=2, margin=0.1)
    for _ in range(2):
        trend.observe({s: (1.0 + s, 0.3, 1) for s in trend.points})
    assert trend.points == [2, 5, 8]
    # deterministic: the same history gives the same placement
    again = dyn.SplitPlacement([0, 3, 6], window=2, lo=0, hi=8, min_spacing=2, margin=0.1)
    for _ in range(6):
        again.observe(history)
    assert again.points == peaked.points


def test_adaptive_innovation_moves_r_toward_the_target_spread():
    low = dyn.adapt_innovation(0.5, ratio=0.05, target=0.25, gain=0.5, r_min=0.1)
    high = dyn.adapt_innovation(0.5, ratio=0.6, target=0.25, gain=0.5, r_min=0.1)
    assert high < 0.5 < low <= 1.0
    assert dyn.adapt_innovation(1.0, 0.0, 0.25, 5.0, 0.1) == 1.0 and dyn.adapt_innovation(0.1, 1.0, 0.25, 5.0, 0.1) == 0.1


def test_importance_corrected_fusion_equals_plain_fusion_when_all_nodes_expand_alike():
    algo = algorithm()
    graph = rollout(algo.plan(0), Counting(), 2)
    rewards = torch.linspace(0, 1, graph.leaves.numel(), dtype=torch.float64) ** 2
    weights = dyn.leaf_log_weights(graph)
    assert bool((weights == 0).all())
    assert torch.equal(adv.fuse_rewards(graph, rewards, 0.0, weights), adv.fuse_rewards(graph, rewards, 0.0))
    # unequal expansion: the corrected value of the root is the mean of its children's values (recursively)
    guided = algorithm(guided_expansion=True).rollout(0, setup(Counting(), 1), [0], lambda x0, p: x0.flatten(1).mean(1))
    r = torch.rand(guided.leaves.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    values = adv.fuse_rewards(guided, r, 0.0, dyn.leaf_log_weights(guided))
    for node in torch.nonzero(guided.num_children > 1).flatten().tolist():
        kids = torch.nonzero(guided.parent == node).flatten()
        assert torch.allclose(values[node], values[kids].mean())


@pytest.mark.slow
def test_every_policy_resumes_bitwise(tmp_path):
    emb = make_toy_embeddings(tmp_path / "emb")
    flags = dict(POLICIES, max_train_steps=4, train_batch_size=3, validation_steps=2)
    train(fast_args(emb, tmp_path / "straight", checkpointing_steps=2, **flags))
    train(fast_args(emb, tmp_path / "resumed", checkpointing_steps=2, **dict(flags, max_train_steps=2)))
    train(fast_args(emb, tmp_path / "resumed", checkpointing_steps=2, resume_from_checkpoint="latest", **flags))
    a, b = tmp_path / "straight", tmp_path / "resumed"
    wa, wb = exported_weights(a, 4), exported_weights(b, 4)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = without_timings(metrics(a)), without_timings(metrics(b))
    assert ma == mb and {"split_points", "innovation_r", "guided_decodes", "allocation_leaves_per_prompt"} <= set(ma[-1])


def test_plan_prints_the_policies_budgets(capsys):
    from branchgrpo.cli.plan import main

    main(["--model", "toy", "--algo", "branchgrpo", "--sampling_steps", "10", "--tree_split_points", "0,2,4",
          *[f"--{k}" for k, v in POLICIES.items() if v is True]])
    out = capsys.readouterr().out
    for name in ("dynamic_allocation", "adaptive_splits", "adaptive_innovation", "guided_expansion"):
        assert name in out


def test_benchmark_table_counts_forwards_to_the_baselines_final_reward():
    from branchgrpo.bench.dynamic import mean_ci, table

    def curve(rewards, per_eval):
        fw = [i * per_eval for i in range(len(rewards))]
        return {"reward": rewards, "forwards": fw, "wall": fw, "forwards_total": fw[-1], "wall_total": fw[-1],
                "diversity": 1.0, "diversity_ratio": 1.0}

    curves = {"branchgrpo": [curve([0.4, 0.5, 0.6], 100), curve([0.4, 0.6, 0.6], 100)],
              "branchgrpo_guided": [curve([0.4, 0.6, 0.7], 50), curve([0.4, 0.5, 0.55], 50)]}
    rows = {r["method"]: r for r in table(curves, 2)}
    assert rows["branchgrpo"]["eval_reward_after"] == 0.6 and rows["branchgrpo"]["forwards_to_baseline_reward"] == 150
    guided = rows["branchgrpo_guided"]
    assert guided["forwards_to_baseline_reward"] == 50 and guided["reached"] == "1/2"
    assert guided["forwards_to_baseline_ratio"] == 0.25 and guided["forward_passes_ratio"] == 0.5
    m, half = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and abs(half - 4.303 * 1.0 / 3 ** 0.5) < 1e-9


def test_policy_states_round_trip_through_the_checkpoints_json_exactly():
    """The allocation history only acts on a prompt's second visit, which the short training test above never
    reaches: its state (and the others') is checked here through the JSON the checkpoint writes."""
    import json

    algo = algorithm(**POLICIES)
    graph = algo.rollout(0, setup(Counting(), 3), [5, 6, 7], lambda x0, p: x0.flatten(1).mean(1))
    rewards = torch.rand(graph.leaves.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    algo.observe(graph, rewards, [5, 6, 7], 0)
    saved = json.loads(json.dumps(algo.state_dict()))
    fresh = algorithm(**POLICIES)
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == algo.state_dict()
    assert fresh.split_points == algo.split_points
    plans = [unit.schedules["allocation"].prompt_plans(1, [5, 6, 7, 8]) for unit in (fresh, algo)]
    assert [p.parent.tolist() for p in plans[0]] == [p.parent.tolist() for p in plans[1]]
    assert fresh.schedules["innovation"].control.r == algo.schedules["innovation"].control.r
