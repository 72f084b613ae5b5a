"""Flow-GRPO and Flow-GRPO-Fast (algorithm units), the cps kernel inside tree rollouts and --ratio_norm in training,
against references written from issue 25's definitions: counts derived by hand, advantages from their formula,
likelihoods re-scored independently."""

import json
import math

import pytest
import torch

from branchgrpo.config import config_from_flags
from branchgrpo.core import plans, sde
from branchgrpo.core.graph import SDE, skeleton_graph
from branchgrpo.core.rollout import NoiseKeys, RolloutSetup
from trainer_utils import fast_args, make_toy_embeddings, metrics, train


def unit(**flags):
    return config_from_flags(flags, validate="algorithm").build_algorithm()


@pytest.mark.parametrize("T,G,w,lo,hi", [(10, 6, 3, 2, 5), (20, 4, 2, 0, 2), (6, 24, 3, 0, 3)])
def test_flow_grpo_fast_plan_counts_from_the_plan_cli(T, G, w, lo, hi, capsys):
    """A window range with lo = hi - w fixes the start at lo: an ODE prefix of `lo` steps (lo + 1 nodes, one forward
    each), then G chains of T - lo steps whose first w are SDE; the last step of each chain needs no forward."""
    from branchgrpo.cli.plan import main

    assert main(["--algo", "flow_grpo_fast", "--sampling_steps", str(T), "--num_generations", str(G),
                 "--sde_window_size", str(w), "--sde_window_range", f"{lo},{hi}", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    start = lo
    assert c["leaves"] == G
    assert c["nodes"] == (start + 1) + G * (T - start) and c["edges"] == c["nodes"] - 1
    assert c["forward_passes"] == (start + 1) + G * (T - start - 1)
    assert c["trainable_edges"] == c["trained_edges"] == G * w
    assert c["train_forward_passes"] == 1 + G * (w - 1)  # the split parent serves all G first window edges


def test_flow_grpo_fast_window_is_random_in_its_range_and_keyed():
    algo = unit(algo="flow_grpo_fast", sampling_steps=10, num_generations=3, sde_window_size=2)
    starts = [algo.window_start(it) for it in range(300)]
    assert set(starts) == {0, 1, 2, 3}  # [lo, hi - w] = [0, 10 / 2 - 2]
    assert starts == [unit(algo="flow_grpo_fast", sampling_steps=10, num_generations=3,
                           sde_window_size=2).window_start(it) for it in range(300)]  # same on every rank / resume
    for it in (0, 1, 2):
        plan, start = algo.plan(it), starts[it]
        sde_child_steps = plan.step[plan.kind == SDE]
        assert sorted(set(sde_child_steps.tolist())) == [start + 1, start + 2]
        assert int((plan.step <= start).sum()) == start + 1  # the ODE prefix is one shared chain
        assert int((plan.num_children[plan.step == start])[0]) == 3  # the split into the group


@pytest.mark.parametrize("flags,message", [
    ({"sde_window_size": 4, "sde_window_range": "0,3"}, "need 0 <= lo <= hi - w"),
    ({"sde_window_range": "0,10"}, "hi may be at most 9"),
    ({"sde_window_range": "1"}, "expected 'lo,hi'"),
    ({"sde_window_size": 0}, "--sde_window_size: need 1..9"),
])
def test_flow_grpo_fast_bad_windows(flags, message):
    with pytest.raises(ValueError, match=message):
        config_from_flags({"algo": "flow_grpo_fast", "sampling_steps": 10, **flags}, validate="algorithm")


@pytest.mark.parametrize("T,f,n", [(10, 0.99, 8), (6, 0.6, 3), (20, 1.0, 19)])
def test_flow_grpo_trains_the_first_floor_f_T_minus_1_steps(T, f, n):
    algo = unit(algo="flow_grpo", sampling_steps=T, num_generations=4, timestep_fraction=f)
    graph = skeleton_graph(algo.plan(0), num_prompts=2)
    keep = algo.select(graph, torch.zeros(graph.num_nodes), iteration=5)
    assert sorted(set(graph.step[keep].tolist())) == list(range(1, n + 1))  # edges out of steps 0 .. n - 1
    assert int(keep.sum()) == 2 * 4 * n


@pytest.mark.parametrize("global_std", [True, False])
def test_flow_grpo_advantages_are_group_centred_over_the_iteration_std(global_std):
    algo = unit(algo="flow_grpo", sampling_steps=6, num_generations=5, global_std=global_std)
    graph = skeleton_graph(algo.plan(0), num_prompts=3)
    rewards = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.4, 3.0, 2.0, 2.5, 2.2, 2.8, -1.0, -1.0, -1.0, -1.0, -1.0],
                           dtype=torch.float64)
    adv = algo.estimate(graph, rewards)
    groups = rewards.reshape(3, 5)
    centred = groups - groups.mean(dim=1, keepdim=True)
    scale = rewards.std() if global_std else groups.std(dim=1, keepdim=True)  # unbiased, as the group z-score
    want = torch.where(scale > 1e-6, centred / (scale + 1e-8), torch.zeros_like(centred)).flatten()
    torch.testing.assert_close(adv[graph.leaves], want, rtol=1e-12, atol=1e-12)
    chain_of = graph.parent[graph.leaves]  # every edge of a chain carries its leaf's advantage
    torch.testing.assert_close(adv[chain_of], want, rtol=1e-12, atol=1e-12)
    assert torch.all(adv[graph.leaves][10:] == 0)  # a group without spread learns nothing


def _velocity(x, sigma, prompt):
    """An analytic velocity (Gaussian data x0 ~ N(0.5, 0.6^2))."""
    s = sigma.double().reshape(-1, *([1] * (x.dim() - 1)))
    mean, var = (1 - s) * 0.5, (1 - s) ** 2 * 0.36 + s**2
    return (-0.5 + (s - (1 - s) * 0.36) / var * (x.double() - mean)).float()


@pytest.mark.parametrize("scale", ["gaussian", "reference"])
def test_cps_tree_splits_keep_their_likelihood_exact(scale):
    """A tree whose split edges have std scale 2 under the cps kernel: re-scoring every SDE edge from its parent with
    the step function gives the rollout's log-prob bitwise (ratio 1 at theta_old), and the kept means are the kernel
    means the edges were drawn from."""
    kernel = sde.Kernel("cps", 0.8, scale)
    plan = plans.tree_plan(6, [0, 2], 3, split_noise_scale=2.0)
    setup = RolloutSetup(_velocity, sde.make_sigmas(6, 3.0), kernel, NoiseKeys(5, 0, (11, 12)), (4, 8), keep_means=True)
    graph = setup.start(plan).finish()
    edges = torch.nonzero(graph.stochastic).flatten()
    parents = graph.parent[edges]
    x = graph.node_latents(parents)
    sigma, sigma_next = graph.sigmas[graph.step[parents]].float(), graph.sigmas[graph.step[edges]].float()
    again = sde.sde_step(x, _velocity(x, sigma, None), sigma, sigma_next, kernel, sample=graph.node_latents(edges),
                         std_scale=graph.std_scale[edges])
    assert torch.equal(again.log_prob, graph.log_prob[edges])
    assert torch.equal(again.mean, graph.means[graph.latent_row[edges]])
    split = graph.std_scale[edges] == 2.0
    base_std = graph.sigmas[graph.step[edges]] * math.sin(0.8 * math.pi / 2)  # s' sin(eta pi / 2)
    assert bool(split.any()) and bool((~split).any())
    torch.testing.assert_close(graph.std[edges].double(), torch.where(split, 2 * base_std, base_std), rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return make_toy_embeddings(tmp_path_factory.mktemp("flow_emb"))


@pytest.mark.slow
@pytest.mark.parametrize("name,flags,edges", [
    ("flow_grpo", dict(algo="flow_grpo", timestep_fraction=0.6), 2 * 3 * 3),
    ("flow_grpo_fast", dict(algo="flow_grpo_fast", sde_window_size=2), 2 * 3 * 2),
    ("flow_grpo_cps", dict(algo="flow_grpo", sde_kernel="cps", cps_log_prob="reference"), 2 * 3 * 5),
    ("tree_ratio_norm", dict(algo="branchgrpo", ratio_norm=True, sde_kernel="cps", tree_split_noise_scale=2.0,
                             kl_coef=0.1), 2 * 16),
])
def test_each_new_choice_trains_the_toy(emb, tmp_path, name, flags, edges):
    """Three iterations through the trainer: the expected edges are trained, the first micro-batch's ratio is 1 at
    theta_old (the split edges' too), and gradients flow."""
    out = tmp_path / name
    train(fast_args(emb, out, max_train_steps=3, **flags))
    entries = metrics(out)
    assert [e["trained_edges"] for e in entries] == [edges] * 3
    assert all(e["first_ratio_min"] == 1.0 == e["first_ratio_max"] for e in entries)
    assert all(math.isfinite(e["loss"]) and e["grad_norm"] > 0 for e in entries)


@pytest.mark.slow
def test_flow_grpo_fast_resumes_bitwise(emb, tmp_path):
    """The window start is a function of (seed, iteration): a run resumed at iteration 2 matches the unbroken one
    (weights and metrics), with the cps kernel and --ratio_norm on."""
    from trainer_utils import exported_weights, without_timings

    flags = dict(algo="flow_grpo_fast", sde_window_size=2, sde_kernel="cps", ratio_norm=True, checkpointing_steps=2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(fast_args(emb, straight, max_train_steps=4, **flags))
    train(fast_args(emb, resumed, max_train_steps=2, **flags))
    train(fast_args(emb, resumed, max_train_steps=4, resume_from_checkpoint="latest", **flags))
    a, b = exported_weights(straight, 4), exported_weights(resumed, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_timings(metrics(straight)) == without_timings(metrics(resumed))
    assert len({e["rollout_nfe"] for e in metrics(straight)}) > 1  # the window really moved between iterations


def test_a_run_written_before_the_kernel_and_loss_options_still_resumes(tmp_path):
    """--cps_log_prob and --ratio_norm are section flags added after earlier runs were written: absent from a saved
    run and left at their defaults they reproduce it; set, they are a different experiment."""
    from branchgrpo.config import changed_flags, parse_train_config

    base = ["--algo", "branchgrpo", "--data_json_path", str(tmp_path)]
    saved = {k: v for k, v in parse_train_config(base).flags.items() if k not in ("cps_log_prob", "ratio_norm")}
    assert changed_flags(saved, parse_train_config(base)) == ""
    assert changed_flags(saved, parse_train_config([*base, "--ratio_norm"])) == "--ratio_norm None -> True"
