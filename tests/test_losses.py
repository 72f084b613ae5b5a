"""The clipped surrogate and its diagnostics."""

import torch

from branchgrpo.core.losses import clipped_surrogate, merge_stats, policy_stats


def test_ratio_one_gives_minus_advantage():
    a = torch.tensor([1.5, -0.5, 0.0, 3.0])
    lp = torch.tensor([0.3, -1.0, 2.0, 0.1])
    loss, ratio = clipped_surrogate(lp, lp.clone(), a, clip_range=1e-3)
    assert torch.equal(ratio, torch.ones(4)) and torch.equal(loss, -a)


def test_clip_acts_only_outside_the_range_and_in_the_pessimistic_direction():
    eps = 0.2
    a = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1])
    lp = torch.log(ratios).requires_grad_(True)
    loss, _ = clipped_surrogate(lp, torch.zeros(5), a, eps)
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.2, -0.5, 0.8, 1.5, -1.1]))
    loss.sum().backward()
    # clipped where the ratio left the range in the advantage's favour: no gradient there
    assert lp.grad[0] == 0 and lp.grad[2] == 0
    assert lp.grad[1] != 0 and lp.grad[3] != 0 and lp.grad[4] != 0


def test_gradient_sign_follows_the_advantage():
    a = torch.tensor([2.0, -2.0])
    lp = torch.zeros(2, requires_grad=True)
    loss, _ = clipped_surrogate(lp, torch.zeros(2), a, 1e-3)
    loss.sum().backward()
    assert lp.grad[0] < 0 < lp.grad[1]  # descent raises the log-prob of a positive-advantage edge


def test_policy_stats_and_merge():
    ratio = torch.tensor([1.0, 1.3, 0.9])
    lp = torch.log(ratio)
    s = policy_stats(ratio, lp, torch.zeros(3), clip_range=0.2)
    assert s["clipped"] == 1 and s["num_edges"] == 3 and s["approx_kl_sum"] > 0
    m = merge_stats(s, policy_stats(torch.tensor([0.5]), torch.log(torch.tensor([0.5])), torch.zeros(1), 0.2))
    assert m["ratio_min"] == 0.5 and m["ratio_max"] == s["ratio_max"] and m["num_edges"] == 4


def test_non_finite_edges_get_no_gradient_and_poison_nothing():
    """An overflowing ratio (new log-prob far above the old one) with a negative advantage makes the plain loss inf;
    masking that loss afterwards still leaves NaN in the backward (0 x inf). Guarding the log-prob first does not."""
    from branchgrpo.core.losses import guard_non_finite

    old = torch.tensor([0.0, -1e4, 0.0])
    adv = torch.tensor([1.0, -1.0, 0.5])
    log_prob = torch.tensor([0.0, 0.0, float("nan")], requires_grad=True)

    loss_e, ratio = clipped_surrogate(log_prob, old, adv, 1e-3)
    naive_ok = torch.isfinite(loss_e) & torch.isfinite(ratio)
    torch.where(naive_ok, loss_e, torch.zeros_like(loss_e)).sum().backward()
    assert not torch.isfinite(log_prob.grad).all()  # what the guard prevents
    log_prob.grad = None

    guarded, ok = guard_non_finite(log_prob, old)
    assert ok.tolist() == [True, False, False]
    loss_e, ratio = clipped_surrogate(guarded, old, adv, 1e-3)
    assert torch.isfinite(loss_e).all() and torch.equal(ratio[~ok], torch.ones(2))
    torch.where(ok, loss_e, torch.zeros_like(loss_e)).sum().backward()
    assert torch.isfinite(log_prob.grad).all() and log_prob.grad[1:].eq(0).all() and log_prob.grad[0] != 0


def test_ratio_drift_warns_once_from_a_tenth_of_the_clip_range(caplog):
    import logging

    from branchgrpo.runtime.update import RatioDrift

    with caplog.at_level(logging.WARNING, logger="branchgrpo.runtime.update"):
        quiet = RatioDrift(1e-3, recompute=False)
        quiet.observe(0, 1 - 5e-5, 1 + 9e-5)  # under a tenth of the clip range: rounding the clip can absorb
        quiet.observe(1, None, None)  # an iteration without a live edge
        quiet.observe(2, float("nan"), float("nan"))  # never reported as a number
        assert not caplog.records
        drift = RatioDrift(1e-3, recompute=False)
        drift.observe(2, 1 - 2e-4, 1 + 1.5e-3)
        drift.observe(3, 0.9, 1.1)  # once per run
        RatioDrift(1e-3, recompute=True).observe(0, 1 - 3e-4, 1.0)
    first, second = (r.getMessage() for r in caplog.records)
    assert "iteration 2" in first and "0.0015" in first and "150% of --clip_range 0.001" in first, first
    assert "--recompute_old_log_prob re-scores" in first
    assert "30%" in second and "even with --recompute_old_log_prob" in second, second


def test_ratio_norm_is_mean_of_noise_times_mean_change():
    """GRPO-Guard's RatioNorm against the issue's two forms, in float64, on random tensors: with s the step's std it
    equals mean(eps (mu_theta - mu_old)) for the stored noise eps; with edges of other stds at the step (split edges'
    lambda) it equals s [(log p - log p_old) + mean((mu - mu_old)^2) / (2 s^2)] from Gaussian densities."""
    from branchgrpo.core.losses import normalized_log_ratio, step_mean_std

    g = torch.Generator().manual_seed(0)
    E, shape = 6, (3, 5)
    old_mean = torch.randn(E, *shape, generator=g)
    mean = old_mean + 0.05 * torch.randn(E, *shape, generator=g)
    eps = torch.randn(E, *shape, generator=g)
    step = torch.tensor([0, 0, 3, 3, 3, 7])
    std = torch.tensor([0.2, 0.2, 0.05, 0.05, 0.05, 0.4])
    sample = old_mean + std.reshape(-1, 1, 1) * eps
    got = normalized_log_ratio(mean, old_mean, sample, std, step_mean_std(std, step, 8))
    want = (eps.double() * (mean.double() - old_mean.double())).flatten(1).mean(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    assert torch.equal(normalized_log_ratio(old_mean, old_mean, sample, std, std), torch.zeros(E))  # ratio 1

    scaled = std * torch.tensor([1.0, 2.5, 1.0, 1.0, 3.0, 1.0])  # two edges with a split's lambda
    sample = old_mean + scaled.reshape(-1, 1, 1) * eps
    s = torch.tensor([(0.2 + 0.5) / 2] * 2 + [(0.05 + 0.05 + 0.15) / 3] * 3 + [0.4], dtype=torch.float64)
    torch.testing.assert_close(step_mean_std(scaled, step, 8).double(), s, rtol=1e-6, atol=0)

    def log_p(mu):
        sd = scaled.double().reshape(-1, 1, 1).expand(E, *shape)
        return torch.distributions.Normal(mu.double(), sd).log_prob(sample.double()).flatten(1).mean(1)

    square = ((mean.double() - old_mean.double()) ** 2).flatten(1).mean(1)
    want = s * ((log_p(mean) - log_p(old_mean)) + square / (2 * s * s))
    got = normalized_log_ratio(mean, old_mean, sample, scaled, step_mean_std(scaled, step, 8))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
