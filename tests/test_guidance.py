"""The shared classifier-free guidance (models/guidance.py) against independent formulas: the combination, the
per-token norm rescale (Qwen-Image's true CFG), one batched forward over [conditional; negative] rows, and a scale
given per call. Wan's velocity goes through it; tests/test_wan.py checks that against WanPipeline."""

import pytest
import torch

from branchgrpo.models.guidance import combine, guidance_on, guided_prediction


def test_combine_is_the_interpolation_formula():
    gen = torch.Generator().manual_seed(0)
    cond, neg = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 5, 8, generator=gen)
    for scale in (1.0, 3.5, 5.0):
        # the same line written the other way: s cond + (1 - s) neg
        assert torch.allclose(combine(cond, neg, scale), scale * cond + (1 - scale) * neg, atol=1e-5)
    assert torch.equal(combine(cond, neg, 1.0), neg + (cond - neg))


@pytest.mark.parametrize("layout,dim", [((2, 6, 4), -1), ((2, 4, 3, 2, 2), 1)])  # packed tokens [B, L, C]; video
def test_rescale_keeps_each_tokens_conditional_norm(layout, dim):
    gen = torch.Generator().manual_seed(1)
    cond, neg = torch.randn(*layout, generator=gen, dtype=torch.float64), torch.randn(*layout, generator=gen,
                                                                                      dtype=torch.float64)
    out = combine(cond, neg, 4.0, rescale_dim=dim)
    guided = neg + 4.0 * (cond - neg)
    # independent reference, token by token: move the channel axis last and rescale each row by hand
    c, g, o = (t.movedim(dim, -1).reshape(-1, t.shape[dim]) for t in (cond, guided, out))
    for row in range(c.shape[0]):
        c_norm = sum(float(v) ** 2 for v in c[row]) ** 0.5
        g_norm = sum(float(v) ** 2 for v in g[row]) ** 0.5
        expected = [float(v) * c_norm / g_norm for v in g[row]]
        assert o[row].tolist() == pytest.approx(expected, rel=1e-12)
    assert not torch.allclose(out, guided)  # the rescale did something


class Counting(torch.nn.Module):
    """A tiny real network of (latents, text) that counts its calls and rows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 4)
        self.calls = []

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        self.calls.append(hidden_states.shape[0])
        return self.proj(hidden_states) * timestep[:, None] + encoder_hidden_states.mean(1)


def test_one_batched_forward_equals_two_separate_ones():
    net = Counting()
    gen = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(3, 4, generator=gen), timestep=torch.rand(3, generator=gen),
                  encoder_hidden_states=torch.randn(3, 7, 4, generator=gen))
    negative = torch.randn(3, 7, 4, generator=gen)
    with torch.no_grad():
        out = guided_prediction(net, inputs, {"encoder_hidden_states": negative}, 5.0)
        assert net.calls == [6]  # one forward, conditional and negative rows together
        cond = net(**inputs)
        neg = net(**{**inputs, "encoder_hidden_states": negative})
    assert torch.allclose(out, neg + 5.0 * (cond - neg), atol=1e-6)


def test_the_scale_is_given_per_call():
    net = Counting()
    gen = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(2, 4, generator=gen), timestep=torch.ones(2),
                  encoder_hidden_states=torch.randn(2, 3, 4, generator=gen))
    negative = {"encoder_hidden_states": torch.zeros(2, 3, 4)}
    with torch.no_grad():
        low, high = (guided_prediction(net, inputs, negative, s) for s in (2.0, 6.0))
        cond, neg = net(**inputs), net(**{**inputs, **negative})
    assert torch.allclose(high - low, 4.0 * (cond - neg), atol=1e-5)


def test_guidance_runs_only_above_one():
    assert not guidance_on(1.0) and not guidance_on(0.0) and guidance_on(1.01) and guidance_on(5.0)
