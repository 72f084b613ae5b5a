"""DiffusionNFT: its math against references written from the paper's formulas (not from branchgrpo.core.nft), the
old policy's soft update and schedules, the unit's advantages and counts, and training through the common trainer
(every trained tensor moves, theta_old follows, a resumed run equals the unbroken one bitwise)."""

import json
import math

import pytest
import torch

from branchgrpo.core import nft
from branchgrpo.core.graph import skeleton_graph
from trainer_utils import exported_weights, fast_args, make_toy_embeddings, metrics, train, without_timings


def _reference_loss(v_theta, v_old, v_ref, x_t, t, x0, r, beta, adv_max, kl_coef):
    """Element by element, from the formulas: v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v;
    x0+- = x_t - t v+-; L+- = mean((x0+- - x0)^2) / max(mean |x0+- - x0|, 1e-5); loss = A_max (r L+ + (1 - r) L-) /
    beta + kl_coef mean((v - v_ref)^2), averaged over samples; and its gradient in v, the normalisers held fixed."""
    B, n = v_theta.shape[0], v_theta[0].numel()
    total, grad = 0.0, torch.zeros_like(v_theta)
    for b in range(B):
        terms = {}
        for sign in (+1, -1):
            sq = ab = 0.0
            errors = []
            for j in range(n):
                vt, vo = v_theta[b].flatten()[j].item(), v_old[b].flatten()[j].item()
                v_impl = beta * vt + (1 - beta) * vo if sign > 0 else (1 + beta) * vo - beta * vt
                e = x_t[b].flatten()[j].item() - t[b].item() * v_impl - x0[b].flatten()[j].item()
                errors.append(e)
                sq += e * e
                ab += abs(e)
            m = max(ab / n, 1e-5)
            # d e / d v_theta = -t beta for x0+, +t beta for x0-
            d = [2 * e / (n * m) * (-sign * t[b].item() * beta) for e in errors]
            terms[sign] = (sq / n / m, d)
        weight = {+1: r[b].item(), -1: 1 - r[b].item()}
        kl = sum((v_theta[b].flatten()[j].item() - v_ref[b].flatten()[j].item()) ** 2 for j in range(n)) / n
        total += adv_max * sum(weight[s] * terms[s][0] for s in (1, -1)) / beta + kl_coef * kl
        for j in range(n):
            g = adv_max * sum(weight[s] * terms[s][1][j] for s in (1, -1)) / beta
            g += kl_coef * 2 * (v_theta[b].flatten()[j].item() - v_ref[b].flatten()[j].item()) / n
            grad[b].view(-1)[j] = g / B
    return total / B, grad


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_the_loss_and_its_gradient_match_the_formulas_in_float64(beta):
    gen = torch.Generator().manual_seed(0)
    B, shape = 4, (2, 3)
    x0, eps, v_old, v_ref = (torch.randn(B, *shape, generator=gen, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([1.0, 0.7, 0.3, 0.05], dtype=torch.float64)
    x_t = nft.noised(x0, eps, t)
    assert torch.allclose(x_t[2], 0.7 * x0[2] + 0.3 * eps[2])  # the forward process
    # sample 3: v_old so that x0- is within 1e-7 of x0 everywhere - its normaliser is floored at 1e-5
    v_theta = torch.randn(B, *shape, generator=gen, dtype=torch.float64)
    tiny = 1e-7 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    v_old[3] = ((x_t[3] - x0[3] - tiny) / t[3] + beta * v_theta[3]) / (1 + beta)
    r = nft.optimality_probability(torch.tensor([-7.0, -1.0, 0.5, 5.0], dtype=torch.float64), 5.0)
    v_theta.requires_grad_(True)
    per_row, _, _ = nft.nft_loss(v_theta, v_old, x_t, t, x0, r, beta, 5.0)
    loss = (per_row + 1e-4 * nft.velocity_penalty(v_theta, v_ref)).mean()
    loss.backward()
    expected, expected_grad = _reference_loss(v_theta.detach(), v_old, v_ref, x_t, t, x0, r, beta, 5.0, 1e-4)
    assert loss.dtype == torch.float64
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    assert torch.allclose(v_theta.grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_the_optimality_probability_maps_advantages_linearly_and_clips():
    A = torch.tensor([-20.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0])
    for a, r in zip(A.tolist(), nft.optimality_probability(A, 5.0).tolist()):
        assert r == pytest.approx(min(max(a / 10.0 + 0.5, 0.0), 1.0))


def test_the_old_policy_decay_schedules():
    linear = [nft.old_policy_decay(s) for s in (0, 1, 250, 500, 501, 10_000)]
    assert linear == pytest.approx([0.0, 0.001, 0.25, 0.5, 0.5, 0.5])
    delayed = [nft.old_policy_decay(s, "delayed") for s in (0, 75, 76, 175, 10_000)]
    assert delayed == pytest.approx([0.0, 0.0, 0.0075, 0.75, 0.999])
    assert nft.old_policy_decay(300, "none") == 0.0


def test_the_old_policy_copy_moves_softly_towards_theta():
    from branchgrpo.runtime.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    old = EMA(model, 0.0, "device")
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = nft.old_policy_decay(step * 100)
        old.update(model, d)
        for name, p in model.named_parameters():
            reference[name] = d * reference[name] + (1 - d) * p.detach()
    for name, value in reference.items():
        assert torch.allclose(old.shadow[name], value, atol=1e-6)
    with old.swapped_in(model):
        assert torch.equal(model.weight, old.shadow["weight"])
    assert not torch.equal(model.weight, old.shadow["weight"])


def _unit(**flags):
    from branchgrpo.config import algorithm_from_flags

    return algorithm_from_flags(algo="diffusion_nft", sampling_steps=6, **flags)


def test_advantages_are_group_centred_over_the_global_or_the_group_std():
    unit = _unit(num_generations=3)
    graph = skeleton_graph(unit.plan(0), num_prompts=2)
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.5, float("nan")], dtype=torch.float64)
    got = unit.estimate(graph, rewards)[graph.leaves]
    finite = [1.0, 2.0, 6.0, 0.0, 0.5]
    mean_all = sum(finite) / 5
    std_all = math.sqrt(sum((v - mean_all) ** 2 for v in finite) / 4)  # unbiased, as Flow-GRPO's --global_std
    expected = [(1 - 3) / std_all, (2 - 3) / std_all, (6 - 3) / std_all, -0.25 / std_all, 0.25 / std_all]
    assert got[:5].tolist() == pytest.approx(expected)
    assert math.isnan(got[5])
    grouped = _unit(num_generations=3, global_std=False).estimate(graph, rewards)[graph.leaves]
    assert grouped[1].item() == pytest.approx(-1 / math.sqrt(((1 - 3) ** 2 + 1 + 3 ** 2) / 2))
    assert torch.isnan(unit.estimate(graph, rewards)[graph.is_leaf.logical_not()]).all()


def test_counts_samplers_and_bad_flags():
    ode = _unit(num_generations=4, nft_timestep_fraction=0.5).counts(0)
    assert (ode["leaves"], ode["forward_passes"], ode["trained_edges"], ode["train_forward_passes_per_leaf"]) == \
        (4, 24, 12, 3)
    tree = _unit(nft_sampler="tree", nft_split_points="0,2", nft_branch_factor=2).counts(0)
    # nodes with children at steps 0..5: 1 + 2 + 2 (split at 2) + 4 + 4 + 4 = 17, not the 24 of 4 chains
    assert (tree["leaves"], tree["forward_passes"], tree["trainable_edges"]) == (4, 17, 6)
    for flags, named in ((dict(nft_beta=0.0), "--nft_beta"), (dict(nft_timestep_fraction=0.1), "--nft_timestep"),
                         (dict(nft_sampler="tree", nft_split_points="0,5"), "--nft_split_points"),
                         (dict(init_same_noise=True), "--init_same_noise"),
                         (dict(nft_sampler="tree", nft_split_points="0,2", nft_branch_factor=1),
                          "--nft_branch_factor")):
        with pytest.raises(ValueError, match=named):
            _unit(**flags)


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return make_toy_embeddings(tmp_path_factory.mktemp("nft_emb"))


NFT = dict(algo="diffusion_nft", num_generations=3, kl_coef=1e-4, nft_timestep_fraction=0.5, learning_rate=3e-3,
           train_micro_batch_size=4, gradient_accumulation_steps=2, nft_decay="delayed")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ode", "dpm2", "tree"])
def test_the_toy_trains_every_tensor_and_theta_old_follows(sampler, emb, tmp_path):
    out = tmp_path / sampler
    summary = train(fast_args(emb, out, nft_sampler=sampler, nft_split_points="0,2", max_train_steps=3,
                              checkpointing_steps=3, **dict(NFT, nft_decay="linear")))
    entries = metrics(out)
    assert all(e["loss"] is not None and math.isfinite(e["loss"]) and e["grad_norm"] > 0 for e in entries)
    assert entries[0]["train_nfe"] == 3 and entries[0]["train_forward_rows"] == 3 * (4 if sampler == "tree" else 3) * 2
    assert summary["sizes"]["trained_edges_per_leaf"] == 3
    state = torch.load(out / "checkpoints" / "checkpoint-3" / "state" / "rank0.pt", weights_only=True)
    shadow = state["old_policy"]["shadow"]
    from branchgrpo.models.toy import load_toy

    start = dict(load_toy(None, "cpu").transformer.named_parameters())
    trained = dict(load_toy(out / "checkpoints" / "checkpoint-3" / "model", "cpu").transformer.named_parameters())
    assert shadow.keys() == trained.keys()
    for name, old in shadow.items():
        assert not torch.equal(trained[name], start[name]), f"{name} did not train"
        # d = 0.001, 0.002, 0.003: theta_old is close to theta but is not theta
        assert not torch.equal(old, trained[name]) and torch.allclose(old, trained[name].detach(), atol=1e-2), name


@pytest.mark.slow
def test_a_resumed_run_matches_the_unbroken_run_bitwise_old_policy_included(emb, tmp_path):
    flags = dict(NFT, max_train_steps=4, checkpointing_steps=2, use_ema=True, ema_decay=0.5, nft_decay="linear")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(fast_args(emb, straight, **flags))
    train(fast_args(emb, resumed, **dict(flags, max_train_steps=2)))
    train(fast_args(emb, resumed, resume_from_checkpoint="latest", **flags))
    a, b = exported_weights(straight, 4), exported_weights(resumed, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timings(metrics(straight)) == without_timings(metrics(resumed))
    old = [torch.load(run / "checkpoints" / "checkpoint-4" / "state" / "rank0.pt", weights_only=True)["old_policy"]
           for run in (straight, resumed)]
    assert old[0]["shadow"].keys() == old[1]["shadow"].keys()
    assert all(torch.equal(old[0]["shadow"][k], old[1]["shadow"][k]) for k in old[0]["shadow"])
    assert json.loads((resumed / "config.json").read_text())["nft_timestep_fraction"] == 0.5


def _gaussian_flow(mean: float, scale: float):
    """The exact velocity of x_s = (1 - s) x0 + s eps for x0 ~ N(mean, scale^2): v = (x - E[x0 | x_s]) / s."""
    def velocity(x, sigma, prompt):
        s = sigma.double().reshape(-1, *([1] * (x.dim() - 1)))
        var = (1 - s) ** 2 * scale ** 2 + s ** 2
        x0 = mean + (1 - s) * scale ** 2 / var * (x.double() - (1 - s) * mean)
        return ((x.double() - x0) / s).float()
    return velocity


def test_the_dpm_solver_is_exact_for_point_data_and_beats_euler_on_a_gaussian_flow():
    """Point data (x0 = m): x_s = (1 - s) m + s eps and the data prediction is m, so every DPM-Solver++ step is
    exact. Gaussian data: the ODE maps eps to mean + scale eps; at equal forwards the 2nd-order solver's error is
    several times Euler's, which halves with the step (first order)."""
    from branchgrpo.core import plans, sde
    from branchgrpo.core.rollout import NoiseKeys, RolloutSetup, multistep_rollout, run_rollout

    eps = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    point = torch.full((3, 5), 0.4)
    sig = [0.9, 0.6, 0.25, 0.0]
    x = [(1 - s) * point + s * eps for s in sig]
    assert torch.allclose(sde.dpm_solver_2m_step(x[0], point, None, None, 0.9, 0.6), x[1], atol=1e-6)
    assert torch.allclose(sde.dpm_solver_2m_step(x[1], point, point, 0.9, 0.6, 0.25), x[2], atol=1e-6)
    assert torch.equal(sde.dpm_solver_2m_step(x[2], point, point, 0.6, 0.25, 0.0), point)
    mean, scale = 0.7, 0.3
    errors = {}
    for T in (12, 24, 48):
        setup = RolloutSetup(_gaussian_flow(mean, scale), sde.make_sigmas(T, 1.0), sde.Kernel("dance", 0.3),
                             NoiseKeys(0, 0, (5,)), (64,))
        plan = plans.group_plan(T, 2, sde_steps=())
        start = run_rollout(plan, lambda x, s, p: torch.zeros_like(x), setup.sigmas, setup.kernel, setup.noise,
                            (64,)).latents  # zero velocity: the chains end at their own initial noise
        dpm = multistep_rollout(setup, plan)
        euler = run_rollout(plan, setup.velocity_fn, setup.sigmas, setup.kernel, setup.noise, (64,))
        assert dpm.num_forward_passes == euler.num_forward_passes == 2 * T
        assert torch.equal(dpm.leaves, euler.leaves)
        errors[T] = [float((g.node_latents(g.leaves) - (mean + scale * start)).abs().max()) for g in (dpm, euler)]
    assert all(dpm < euler / 4 for dpm, euler in errors.values()), errors
    assert all(1.7 < errors[T][1] / errors[2 * T][1] < 2.3 for T in (12, 24)), errors
