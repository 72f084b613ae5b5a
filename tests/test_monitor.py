"""The reward-hacking monitor: its statistics against closed forms, its decisions and state on synthetic samples, and
on the toy: a reward that pays for checkerboards trips it within the run, the default reward does not."""

import json
import math

import numpy as np
import pytest
import torch

from branchgrpo.config.sections import EvalConfig
from branchgrpo.runtime.guards import Observation
from branchgrpo.runtime.monitor import (
    HackingMonitor,
    high_frequency_share,
    mean_pairwise_distance,
    top_band_mask,
    within_prompt_diversity,
)
from branchgrpo.rewards.base import register_reward


def top_bins(height: int, width: int, band: float) -> int:
    """Independent count of the DFT bins in the top band: integer frequencies k in -n/2..n/2 (numpy order)."""
    def freqs(n):
        return [k if k <= (n - 1) // 2 else k - n for k in range(n)]

    return sum(max(2 * abs(ky) / height, 2 * abs(kx) / width) > 1 - band
               for ky in freqs(height) for kx in freqs(width))


def checkerboard(height: int, width: int) -> torch.Tensor:
    return ((torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2).float()


# ---------------------------------------------------------------------------------------------------------------
# high-frequency share
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,band", [((8, 8), 0.5), ((8, 8), 0.25), ((6, 10), 0.5), ((7, 9), 0.3), ((16, 12), 1.0)])
def test_top_band_holds_the_bins_of_its_closed_form(size, band):
    mask = top_band_mask(*size, band)
    assert int(mask.sum()) == top_bins(*size, band)
    assert not mask[0, 0]  # DC is never high frequency
    if size == (8, 8):
        assert int(mask.sum()) == {0.5: 64 - 5 * 5, 0.25: 8 + 8 - 1}[band]  # |k| <= 2 stays low; k = -4 is the top


@pytest.mark.parametrize("band", [0.1, 0.5, 1.0])
def test_a_checkerboard_has_all_its_ac_energy_in_the_top_band(band):
    board = checkerboard(16, 16)
    images = torch.stack([0.2 + 0.5 * board.expand(3, 16, 16),  # RGB, any contrast and offset
                          torch.stack([board, 1 - board, 0.5 * board]),  # a colour checkerboard
                          (torch.arange(16) % 2).float().expand(3, 16, 16)])  # stripes at Nyquist along one axis
    assert torch.allclose(high_frequency_share(images, band), torch.ones(3, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("size,band", [((8, 8), 0.5), ((6, 10), 0.5), ((12, 12), 0.25)])
def test_a_flat_spectrum_has_the_top_bands_share_of_the_bins(size, band):
    """A single bright pixel has |X(k)|^2 = 1 at every frequency: its share is exactly #top bins / #AC bins."""
    impulse = torch.zeros(1, 1, *size)
    impulse[0, 0, 2, 3] = 1.0
    expected = top_bins(*size, band) / (size[0] * size[1] - 1)
    assert high_frequency_share(impulse, band).item() == pytest.approx(expected, abs=1e-6)  # float32 FFTs


def test_white_noise_has_the_expected_share_on_average():
    torch.manual_seed(0)
    shares = high_frequency_share(torch.rand(4000, 3, 16, 16), 0.5)
    expected = (256 - 9 * 9) / 255  # low band: |k| <= 4 on both axes
    assert abs(shares.mean().item() - expected) < 4 * shares.std().item() / math.sqrt(4000)


def test_smooth_and_constant_images_have_no_high_frequency_energy():
    x = torch.arange(16).float()
    wave = 0.5 + 0.4 * torch.cos(2 * math.pi * x / 16)  # k = 1: the lowest frequency
    images = torch.stack([(wave[:, None] * wave[None, :]).expand(3, 16, 16), torch.full((3, 16, 16), 0.7)])
    assert torch.allclose(high_frequency_share(images, 0.5), torch.zeros(2, dtype=torch.float64), atol=1e-6)


def test_videos_average_the_share_over_frames():
    frames = torch.stack([checkerboard(8, 8), torch.full((8, 8), 0.3)] * 2)  # [4, 8, 8]: share 1, 0, 1, 0
    video = frames[None, None].expand(1, 3, 4, 8, 8)
    assert high_frequency_share(video, 0.5, kind="video").item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------
# within-prompt diversity
# ---------------------------------------------------------------------------------------------------------------
def test_mean_pairwise_distance_of_known_configurations():
    square = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=float)  # 4 sides of 1, 2 diagonals of sqrt(2)
    assert mean_pairwise_distance(square) == pytest.approx((4 + 2 * math.sqrt(2)) / 6)
    assert mean_pairwise_distance(3.0 * np.eye(5)) == pytest.approx(3.0 * math.sqrt(2))  # a regular simplex
    assert mean_pairwise_distance(np.ones((4, 7))) == 0.0  # collapse
    with pytest.raises(ValueError):
        mean_pairwise_distance(np.zeros((1, 3)))


def test_within_prompt_diversity_averages_prompts_and_ignores_distances_across_them():
    features = np.array([[0.0], [2.0], [100.0], [100.0], [-50.0]])
    prompts = [0, 0, 1, 1, 2]  # distances 2 and 0; prompt 2 has one sample; cross-prompt distances do not count
    assert within_prompt_diversity(features, prompts) == pytest.approx(1.0)
    assert within_prompt_diversity(features[:1], [0]) is None


# ---------------------------------------------------------------------------------------------------------------
# the monitor on synthetic samples
# ---------------------------------------------------------------------------------------------------------------
PROMPTS, SEEDS = 4, 4


def base_samples(seed: int = 0) -> torch.Tensor:
    """Smooth random images (upsampled 4 x 4 noise): little high-frequency energy, distinct seeds."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(PROMPTS * SEEDS, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)


def observe(monitor, step, media):
    """One evaluation as the trainer runs it: the monitor measures the samples, then observes the record."""
    ids = list(range(media.shape[0]))
    record = monitor.measure(step, media, ids, [False] * len(ids), SEEDS)
    monitor.observe(Observation(step, record, evaluation=True))
    return record


def test_the_step0_samples_are_the_reference_and_unchanged_samples_raise_nothing():
    monitor = HackingMonitor(EvalConfig())
    first = observe(monitor, 0, base_samples())
    assert first["monitor_hf_ratio"] == 1.0 and first["monitor_diversity_ratio"] == 1.0
    assert first["monitor_kid"] == 0.0 and first["monitor_mmd2_p"] == 1.0 and first["monitor_alarm"] == []
    again = observe(monitor, 5, base_samples())
    assert again == first and not monitor.tripped


def test_checkerboard_artefacts_raise_the_high_frequency_alarm():
    monitor = HackingMonitor(EvalConfig(hacking_guard="stop"))
    observe(monitor, 0, base_samples())
    hacked = (0.85 * base_samples() + 0.15 * checkerboard(16, 16)).clamp(0, 1)
    record = observe(monitor, 10, hacked)
    assert record["monitor_hf_ratio"] > 2.0 and record["monitor_alarm"][0].startswith("hf_ratio")
    assert record["monitor_diversity_ratio"] > 0.5  # the seeds still differ
    assert record["monitor_kid"] > 0
    assert monitor.tripped and "step 10" in str(monitor.error("ckpt")) and "hf_ratio" in str(monitor.error("ckpt"))


def test_a_collapse_of_the_seeds_raises_the_diversity_alarm_but_warn_does_not_stop():
    monitor = HackingMonitor(EvalConfig(hacking_guard="warn"))
    observe(monitor, 0, base_samples())
    collapsed = base_samples()[::SEEDS].repeat_interleave(SEEDS, dim=0)  # every seed of a prompt = its first
    record = observe(monitor, 4, 0.99 * collapsed + 0.01 * base_samples(1))
    assert record["monitor_diversity_ratio"] < 0.1
    assert [a.split()[0] for a in record["monitor_alarm"]] == ["diversity_ratio"]
    assert monitor.alarm[0] == 4 and not monitor.tripped


def test_kid_threshold_only_when_given():
    samples = base_samples(1)
    quiet, strict = HackingMonitor(EvalConfig()), HackingMonitor(EvalConfig(hacking_max_kid=1e-6))
    for monitor in (quiet, strict):
        observe(monitor, 0, base_samples())
    assert observe(quiet, 2, samples)["monitor_alarm"] == []
    assert [a.split()[0] for a in observe(strict, 2, samples)["monitor_alarm"]] == ["kid"]


def test_padding_and_rank_order_do_not_change_the_numbers():
    monitor, padded = HackingMonitor(EvalConfig()), HackingMonitor(EvalConfig())
    media = base_samples()
    reference = observe(monitor, 0, media)
    order = torch.randperm(media.shape[0], generator=torch.Generator().manual_seed(3))
    ids = order.tolist() + [order[-1].item()]  # one padded duplicate, as the last rank gets
    got = padded.measure(0, torch.cat([media[order], media[order[-1:]]]), ids, [False] * len(order) + [True], SEEDS)
    assert got == reference


def test_the_reference_survives_a_checkpoint_bitwise_and_refuses_other_settings():
    monitor = HackingMonitor(EvalConfig())
    observe(monitor, 0, base_samples())
    state = json.loads(json.dumps(monitor.state_dict()))  # it lives in trainer_state.json
    restored = HackingMonitor(EvalConfig())
    restored.load_state_dict(state)
    assert np.array_equal(restored.reference["features"], monitor.reference["features"])
    later = base_samples(1)
    assert observe(restored, 6, later) == observe(monitor, 6, later)
    with pytest.raises(ValueError, match="--hacking_hf_band 0.5 -> 0.25"):
        HackingMonitor(EvalConfig(hacking_hf_band=0.25)).load_state_dict(state)
    assert HackingMonitor(EvalConfig()).state_dict() is None  # nothing to save before the first evaluation


def test_off_means_no_entries_and_no_state():
    monitor = HackingMonitor(EvalConfig(hacking_guard="off"))
    assert observe(monitor, 0, base_samples()) == {} and monitor.state_dict() is None


def test_video_samples_are_monitored_too():
    monitor = HackingMonitor(EvalConfig(hacking_guard="stop"), media="video")  # a video backbone's
    videos = base_samples()[:, :, None].expand(-1, -1, 5, -1, -1)  # [N, 3, 5, 16, 16] static clips
    assert observe(monitor, 0, videos)["monitor_alarm"] == []
    hacked = (0.85 * videos + 0.15 * checkerboard(16, 16)).clamp(0, 1)
    assert observe(monitor, 2, hacked)["monitor_hf_ratio"] > 2 and monitor.tripped


@pytest.mark.parametrize("flags,message", [
    ({"hacking_guard": "loud"}, None),
    ({"hacking_hf_band": 0.0}, "--hacking_hf_band"),
    ({"hacking_max_hf_ratio": 0.8}, "--hacking_max_hf_ratio"),
    ({"hacking_min_diversity_ratio": 1.5}, "--hacking_min_diversity_ratio"),
    ({"hacking_features": "clip"}, "--hacking_feature_weights"),
    ({"hacking_features": "inception", "hacking_feature_weights": "/nonexistent.pth"}, "/nonexistent.pth"),
])
def test_bad_monitor_flags_are_refused_naming_the_flag(flags, message):
    from branchgrpo.config.train import parse_flags

    if message is None:  # a choice argparse refuses
        with pytest.raises(SystemExit):
            parse_flags([f"--{k}={v}" for k, v in flags.items()])
        return
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        EvalConfig(**flags).validate()


def test_the_reward_curve_gets_the_monitor_panels(tmp_path):
    from branchgrpo.runtime.outputs import plot_rewards

    entries = [{"step": s, "reward_mean": 0.1 * s} for s in range(4)]
    evals = [{"step": 0, "eval_reward": 0.0, "monitor_hf_ratio": 1.0, "monitor_diversity_ratio": 1.0,
              "monitor_kid": 0.0, "monitor_mmd2_p": 1.0},
             {"step": 4, "eval_reward": None, "monitor_hf_ratio": 2.5, "monitor_diversity_ratio": None,
              "monitor_kid": 0.1, "monitor_mmd2_p": 0.01}]
    path = plot_rewards(entries, evals, tmp_path / "curve.png", 1.0, {"monitor_hf_ratio": (">", 2.0)})
    from PIL import Image

    with Image.open(path) as image:
        assert image.size[0] > 2 * image.size[1]  # three panels side by side


# ---------------------------------------------------------------------------------------------------------------
# the toy: a reward that pays for checkerboards is caught, the default reward is not
# ---------------------------------------------------------------------------------------------------------------
class _Checkerboard:
    """Pays for a checkerboard pattern: 4 x the correlation of the (mean-free) image with +-1 in a checkerboard."""

    name = "toy_checkerboard"

    def __call__(self, media, prompts):
        x = media.float().mean(1)
        sign = checkerboard(*x.shape[-2:]) * 2 - 1
        return ((x - x.mean((-2, -1), keepdim=True)) * sign).mean((-2, -1)).mul(4).cpu()


@register_reward("toy_checkerboard")
def _toy_checkerboard(device="cpu", **options):
    return _Checkerboard()


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    from trainer_utils import make_toy_embeddings

    return make_toy_embeddings(tmp_path_factory.mktemp("toy_emb"))


# the same run for both rewards: 10 iterations, an evaluation every 2 (4 prompts x 4 seeds), no KL
HACK_RUN = dict(max_train_steps=10, validation_steps=2, learning_rate=5e-4, num_eval_prompts=4,
                eval_samples_per_prompt=4, checkpointing_steps=0, hacking_guard="stop", num_threads=1)


def _evals(out):
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_checkerboard_reward_trips_the_monitor_and_the_default_reward_does_not(emb, tmp_path, capsys):
    from branchgrpo.cli.train import main
    from trainer_utils import fast_args, metrics

    hacked = tmp_path / "hacked"
    assert main(fast_args(emb, hacked, reward="toy_checkerboard", **HACK_RUN)) == 3  # halted, not an input error
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "reward hacking suspected at the evaluation of step 8" in errors[0], errors
    assert "hf_ratio" in errors[0] and "checkpoint-8" in errors[0]
    evals = _evals(hacked)
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8]
    assert all(e["monitor_alarm"] == [] for e in evals[:-1]) and evals[-1]["monitor_hf_ratio"] > 2
    assert [e["step"] for e in metrics(hacked)] == list(range(8))
    assert (hacked / "checkpoints" / "latest").read_text().strip() == "checkpoint-8"
    state = json.loads((hacked / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["monitor"]["sample_ids"] == list(range(16)) and state["monitor"]["features"]["shape"] == [16, 192]
    assert (hacked / "reward_curve.png").exists()

    default = tmp_path / "default"
    assert main(fast_args(emb, default, **HACK_RUN)) == 0
    evals = _evals(default)
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8, 10]
    assert all(e["monitor_alarm"] == [] for e in evals)
    assert max(e["monitor_hf_ratio"] for e in evals) < 1.5 and min(e["monitor_diversity_ratio"] for e in evals) > 0.9



def test_a_single_evaluation_sample_reports_no_kid_instead_of_failing():
    """KID and MMD^2 need two samples a side; with one held-out sample they are null and the evaluation goes on."""
    from branchgrpo.config.sections import EvalConfig
    from branchgrpo.runtime.monitor import HackingMonitor

    monitor = HackingMonitor(EvalConfig())
    base, trained = torch.zeros(1, 3, 8, 8), torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    monitor.measure(0, base + 0.5, [0], [False], 1)
    out = monitor.measure(1, trained, [0], [False], 1)
    assert out["monitor_kid"] is None and out["monitor_mmd2"] is None and out["monitor_hf_ratio"] is not None
