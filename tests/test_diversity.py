"""KID / MMD^2 / permutation tests against closed-form population values, feature extractors on tiny models, and
the diversity CLI end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from branchgrpo.core import diversity as dv
from branchgrpo.rewards.features import ClipFeatures, InceptionFeatures, PixelFeatures, resize_center_crop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----- closed-form population MMD^2 between Gaussians -----

def _third_moment(mu, cov):
    """E[x_i x_j x_k] for x ~ N(mu, cov)."""
    return (np.einsum("i,j,k->ijk", mu, mu, mu) + np.einsum("i,jk->ijk", mu, cov)
            + np.einsum("j,ik->ijk", mu, cov) + np.einsum("k,ij->ijk", mu, cov))


def _poly_cross(p, q, d):
    """E k(x, y), k = (x.y/d + 1)^3 = 1 + 3u + 3u^2 + u^3 with u = x.y/d, for independent x ~ p, y ~ q."""
    (mu_p, cov_p), (mu_q, cov_q) = p, q
    second_p, second_q = cov_p + np.outer(mu_p, mu_p), cov_q + np.outer(mu_q, mu_q)
    e_u = mu_p @ mu_q / d
    e_u2 = np.trace(second_p @ second_q) / d**2
    e_u3 = np.sum(_third_moment(mu_p, cov_p) * _third_moment(mu_q, cov_q)) / d**3
    return 1 + 3 * e_u + 3 * e_u2 + e_u3


def _rbf_cross(p, q, h):
    """E exp(-|x - y|^2 / (2 h^2)) with x - y ~ N(m, C): det(I + C/h^2)^(-1/2) exp(-m'(C + h^2 I)^(-1) m / 2)."""
    m, c = p[0] - q[0], p[1] + q[1]
    eye = np.eye(len(m))
    return np.linalg.det(eye + c / h**2) ** -0.5 * np.exp(-0.5 * m @ np.linalg.solve(c + h**2 * eye, m))


def population_mmd2(p, q, cross):
    return cross(p, p) + cross(q, q) - 2 * cross(p, q)


D = 3
P = (np.zeros(D), np.eye(D))
Q = (np.array([0.6, 0.0, -0.3]), np.diag([1.5, 1.0, 0.7]))


def _sample(dist, n, rng):
    return rng.multivariate_normal(dist[0], dist[1], size=n)


# ----- estimators -----

@pytest.mark.parametrize("kernel", ["polynomial", "rbf"])
@pytest.mark.slow
def test_unbiased_estimator_is_unbiased(kernel):
    """Mean over many small-sample repetitions matches the closed-form population MMD^2 (within 4 standard errors),
    while the biased V-statistic computed from the same samples does not (so the check has power)."""
    h = 1.3
    cross = (lambda a, b: _poly_cross(a, b, D)) if kernel == "polynomial" else (lambda a, b: _rbf_cross(a, b, h))
    truth = population_mmd2(P, Q, cross)
    k = (lambda a, b: dv.polynomial_kernel(a, b)) if kernel == "polynomial" else (lambda a, b: dv.rbf_kernel(a, b, h))
    rng = np.random.default_rng(0)
    unbiased, biased = [], []
    for _ in range(3000):
        x, y = _sample(P, 6, rng), _sample(Q, 9, rng)
        unbiased.append(dv.mmd2_unbiased(x, y, kernel=kernel, bandwidth=h if kernel == "rbf" else None))
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    unbiased, biased = np.array(unbiased), np.array(biased)
    assert abs(unbiased.mean() - truth) < 4 * unbiased.std() / np.sqrt(len(unbiased))
    assert abs(biased.mean() - truth) > 6 * biased.std() / np.sqrt(len(biased))


def test_kid_identical_vs_shifted():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same = dv.kid(x, y, num_subsets=50, subset_size=200, seed=0)
    assert abs(same.mean) < 0.02 and abs(same.mean) < 2 * same.std  # population value 0
    shifted = dv.kid(x, rng.normal(size=(300, 8)) + 0.3, num_subsets=50, subset_size=200, seed=0)
    truth = population_mmd2((np.zeros(8), np.eye(8)), (np.full(8, 0.3), np.eye(8)), lambda a, b: _poly_cross(a, b, 8))
    assert shifted.mean > 5 * shifted.std and abs(shifted.mean - truth) < 0.3 * truth
    assert np.isclose(same.mean, same.subset_values.mean()) and same.subset_size == 200
    # one subset covering both whole sets is the full-sample estimate (MMD^2_u is permutation invariant)
    full = dv.kid(x, y, num_subsets=1, subset_size=10**6)
    assert np.isclose(full.mean, dv.mmd2_unbiased(x, y, kernel="polynomial")) and full.subset_size == 300


def test_rbf_mmd_and_median_heuristic():
    x, y = np.array([[0.0], [1.0]]), np.array([[3.0], [4.0]])
    assert dv.median_bandwidth(x, y) == pytest.approx(2.5)  # distances 1, 1, 2, 3, 3, 4
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    value, h = dv.mmd2_rbf(a, b)
    assert abs(value) < 0.01 and h > 0
    value_shift, _ = dv.mmd2_rbf(a, b + 0.5, bandwidth=2.0)
    truth = population_mmd2((np.zeros(4), np.eye(4)), (np.full(4, 0.5), np.eye(4)), lambda p, q: _rbf_cross(p, q, 2.0))
    assert value_shift == pytest.approx(truth, rel=0.3) and value_shift > 0.02
    assert dv.mmd2_rbf(a, b, bandwidth=1.0, bandwidth_scale=2.0)[1] == 2.0


def test_permutation_statistics_match_direct_computation():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.2
    pooled = np.concatenate([x, y])
    kernel = dv.polynomial_kernel(pooled, pooled)
    indicators = np.zeros((4, 12))
    for row in range(4):
        indicators[row, rng.permutation(12)[:7]] = 1.0
    fast = dv._permutation_statistics(kernel, indicators, 7, 5)
    direct = [dv.mmd2_unbiased(pooled[ind == 1], pooled[ind == 0]) for ind in indicators]
    np.testing.assert_allclose(fast, direct, rtol=1e-10)


@pytest.mark.parametrize("kernel", ["polynomial", "rbf"])
def test_permutation_test_power(kernel):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(150, 6))
    shifted = dv.permutation_test(x, rng.normal(size=(150, 6)) + 0.4, kernel=kernel, num_permutations=500)
    assert shifted.p_value < 0.01 and shifted.statistic > 0
    same = dv.permutation_test(x, rng.normal(size=(150, 6)), kernel=kernel, num_permutations=500)
    assert same.p_value > 0.05
    rerun = dv.permutation_test(x, x[::-1] + 0.0, kernel=kernel, num_permutations=100, seed=7)
    assert rerun.p_value == dv.permutation_test(x, x[::-1] + 0.0, kernel=kernel, num_permutations=100, seed=7).p_value


@pytest.mark.parametrize("kernel", ["polynomial", "rbf"])
def test_permutation_test_calibrated_under_null(kernel):
    """p-values under H0 are close to uniform: over 200 independent data sets, P(p < 0.1) and P(p < 0.5) are
    within about 3 binomial standard deviations of 0.1 and 0.5."""
    p_values = []
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        x, y = rng.normal(size=(20, 3)), rng.normal(size=(25, 3))
        p_values.append(dv.permutation_test(x, y, kernel=kernel, num_permutations=200, seed=seed).p_value)
    p_values = np.array(p_values)
    assert 0.04 <= (p_values < 0.1).mean() <= 0.17
    assert 0.39 <= (p_values < 0.5).mean() <= 0.61


def test_input_validation():
    with pytest.raises(ValueError, match="at least 2"):
        dv.mmd2_unbiased(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="kernel"):
        dv.mmd2_unbiased(np.zeros((3, 3)), np.ones((4, 3)), kernel="linear")
    with pytest.raises(ValueError, match="NaN"):
        dv.kid(np.full((3, 2), np.nan), np.zeros((3, 2)))


# ----- feature extractors -----

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.mark.slow
def test_clip_features_from_local_checkpoint(tmp_path):
    import open_clip

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny-diversity-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(tmp_path / "cfg"))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-diversity-clip", pretrained=None).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "clip.pt")
    extractor = ClipFeatures("tiny-diversity-clip", str(tmp_path / "clip.pt"), str(tmp_path / "cfg"), batch_size=3)
    images = torch.rand(5, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    features = extractor(images)
    assert features.shape == (5, 16) and features.dtype == np.float64
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.encode_image((resize_center_crop(images, 32) - mean) / std)
    np.testing.assert_allclose(features, expected.double().numpy(), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="--clip_checkpoint"):
        ClipFeatures("tiny-diversity-clip", str(tmp_path / "absent.pt"))
    torch.save({k: v for k, v in model.state_dict().items() if k != "visual.proj"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="visual.proj"):
        ClipFeatures("tiny-diversity-clip", str(tmp_path / "bad.pt"))


@pytest.mark.slow
def test_inception_pool_features(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False).eval()  # torch default init: fast
    torch.save(model.state_dict(), tmp_path / "inception.pth")
    extractor = InceptionFeatures(str(tmp_path / "inception.pth"))
    images = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    features = extractor(images)
    pooled = {}
    model.avgpool.register_forward_hook(lambda module, inputs, output: pooled.setdefault("x", output.flatten(1)))
    with torch.no_grad():
        model.transform_input = False
        model(torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", antialias=True) * 2 - 1)
    assert features.shape == (1, 2048)
    np.testing.assert_allclose(features, pooled["x"].double().numpy(), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        InceptionFeatures(str(tmp_path / "inception_v3_google-0cc3c7bd.pth"))


def test_pixel_features():
    images = torch.rand(4, 1, 12, 20)
    features = PixelFeatures(size=4)(images)
    assert features.shape == (4, 48)
    constant = PixelFeatures(size=4)(torch.full((2, 3, 8, 8), 0.25))
    np.testing.assert_allclose(constant, 0.25)


# ----- CLI -----

def _write_pngs(folder, brightness, count, seed):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        array = np.clip(brightness + 0.15 * rng.normal(size=(24, 24, 3)), 0, 1)
        Image.fromarray((array * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    from branchgrpo.cli.diversity import main, run

    _write_pngs(tmp_path / "dark", 0.4, 16, seed=0)
    _write_pngs(tmp_path / "bright", 0.6, 16, seed=1)
    out = tmp_path / "result.json"
    result = run(["--a", str(tmp_path / "dark"), "--b", str(tmp_path / "bright"), "--features", "pixels",
                  "--pixel_size", "4", "--permutations", "200", "--kid_subsets", "10", "--output", str(out),
                  "--save_features", str(tmp_path / "feats")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["num_a"] == result["num_b"] == 16 and result["feature_dim"] == 48
    assert result["kid"]["mean"] > 0 and result["mmd2_rbf"]["value"] > 0
    assert result["permutation"]["p_value_polynomial"] < 0.01 and result["permutation"]["p_value_rbf"] < 0.01

    # .pt feature inputs through the real entry point: the same features against themselves, reshuffled
    feats = torch.load(tmp_path / "feats" / "a.pt")
    torch.save(feats[torch.randperm(16, generator=torch.Generator().manual_seed(0))], tmp_path / "a_shuffled.pt")
    out2 = tmp_path / "same.json"
    command = [sys.executable, "-m", "branchgrpo.cli.diversity", "--a", str(tmp_path / "feats" / "a.pt"),
               "--b", str(tmp_path / "a_shuffled.pt"), "--permutations", "100", "--kid_subsets", "5",
               "--output", str(out2)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    same = json.loads(out2.read_text())
    assert same["features"] == "given" and same["permutation"]["p_value_rbf"] > 0.5 and "KID" in proc.stdout
    with pytest.raises(FileNotFoundError):
        run(["--a", str(tmp_path / "absent"), "--b", str(tmp_path / "dark")])
    assert main(["--a", str(tmp_path / "absent"), "--b", str(tmp_path / "dark")]) == 2  # one line, not a traceback
