"""VBench-style video metrics on videos with a known answer: a static video (consistency 1, smoothness 1, no motion),
independent noise frames (consistency ~0, smoothness 17/24, dynamic) and a smoothly moving pattern (in between, its
flow close to the true speed); the local-model backends load from files and refuse the wrong ones."""

import math

import pytest
import torch

from branchgrpo.eval.video_metrics import (
    FLOW_SCALE_SIDE,
    PixelFlow,
    VideoMetricFiles,
    VideoMetrics,
    consistency,
    dynamic_degree,
    flow_frame_step,
    lucas_kanade_flow,
    motion_smoothness_pixels,
    pixel_frame_features,
    top_flow_magnitude,
    video_flow_magnitudes,
)

FRAMES, H, W = 17, 64, 96


def pattern(shift: float) -> torch.Tensor:
    """A smooth texture [H, W] in [0.2, 0.8], translated by `shift` pixels along x."""
    y, x = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    return (0.5 + 0.2 * torch.sin(2 * math.pi * (x - shift) / 16) * torch.cos(2 * math.pi * y / 24)
            + 0.1 * torch.sin(2 * math.pi * (x - shift + y) / 11))


def moving(speed: float) -> torch.Tensor:
    """[3, F, H, W]: the pattern moving `speed` pixels per frame."""
    return torch.stack([pattern(speed * t) for t in range(FRAMES)])[None].expand(3, -1, -1, -1).contiguous()


def static() -> torch.Tensor:
    return moving(0.0)


def noise() -> torch.Tensor:
    return torch.rand(3, FRAMES, H, W, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------
# the definitions
# ---------------------------------------------------------------------------------------------------------------
def test_consistency_formula_on_known_features():
    assert consistency(torch.ones(5, 4)) == pytest.approx(1.0)
    # f_1 = e1, then e2, e2: t=2 (0 + 0)/2, t=3 (0 + 1)/2 -> mean 0.25
    assert consistency(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])) == pytest.approx(0.25)
    # alternating signs: cos to the first frame +-1, to the previous -1 -> t=2: -1, t=3: 0
    assert consistency(torch.tensor([[1.0], [-1.0], [1.0]])) == pytest.approx(-0.5)


def test_a_static_video_is_perfectly_consistent_smooth_and_still():
    video = static()
    assert consistency(pixel_frame_features(video)) == pytest.approx(1.0)
    assert motion_smoothness_pixels(video) == 1.0
    magnitudes = video_flow_magnitudes(video, PixelFlow(), fps=None)
    assert max(magnitudes) < 1e-3 and dynamic_degree(magnitudes)[0] == 0.0  # up to the warp's rounding


def test_independent_noise_frames_are_inconsistent_rough_and_dynamic():
    video = noise()
    assert abs(consistency(pixel_frame_features(video))) < 0.05  # Pearson correlation of independent frames
    # E|U - (V + W) / 2| = 7/24 for independent uniforms
    assert motion_smoothness_pixels(video) == pytest.approx(17 / 24, abs=0.005)
    magnitudes = video_flow_magnitudes(video, PixelFlow(), fps=None)
    moving_, mean = dynamic_degree(magnitudes)
    assert moving_ == 1.0 and mean > 3 * 6.0


@pytest.mark.parametrize("speed", [0.5, 1.0, 2.0])
def test_a_smoothly_moving_pattern_lies_in_between_and_its_flow_is_its_speed(speed):
    video = moving(speed)
    smooth, cons = motion_smoothness_pixels(video), consistency(pixel_frame_features(video))
    assert motion_smoothness_pixels(noise()) < smooth < 1.0
    assert consistency(pixel_frame_features(noise())) < cons < 1.0
    # the top 5% of the estimated flow, back in this video's pixels: the true speed, within 40%
    measured = sum(video_flow_magnitudes(video, PixelFlow(), None)) / (FRAMES - 1) * min(H, W) / FLOW_SCALE_SIDE
    assert speed * 0.9 < measured < speed * 1.4


def test_the_sinusoid_interpolation_error_has_its_closed_form():
    """x_t = 0.5 + a sin(k x - w t): the neighbours' mean is 0.5 + a cos(w) sin(k x - w t), so the error is
    a (1 - cos w) |sin| whose mean over whole periods is a (1 - cos w) 2 / pi."""
    a, w, period = 0.3, 0.4, 256  # fine sampling: the mean of |sin| over the samples is 2 / pi to 1e-5
    x = torch.arange(2 * period).float()
    video = torch.stack([0.5 + a * torch.sin(2 * math.pi * x / period - w * t) for t in range(9)])
    video = video[None, :, None, :].expand(3, -1, 4, -1)
    assert motion_smoothness_pixels(video) == pytest.approx(1 - a * (1 - math.cos(w)) * 2 / math.pi, abs=1e-5)


def test_lucas_kanade_recovers_a_uniform_translation_on_the_interior():
    flow = lucas_kanade_flow(pattern(0)[None, None], pattern(1.5)[None, None])
    interior = flow[0, :, 10:-10, 10:-10]
    assert interior[0].median().item() == pytest.approx(1.5, abs=0.1) and interior[1].abs().median() < 0.1


def test_dynamic_degree_rule_and_frame_step():
    assert top_flow_magnitude(torch.zeros(2, 10, 10)) == 0.0
    flow = torch.zeros(2, 10, 10)
    flow[0, :5] = 10.0  # half the pixels move 10: the top 5% are all 10
    assert top_flow_magnitude(flow) == 10.0
    assert dynamic_degree([7.0] * 4 + [0.0] * 12) == (1.0, 28 / 16)  # 4 of 16 pairs: round(4 * 16 / 16) = 4
    assert dynamic_degree([7.0] * 3 + [0.0] * 13)[0] == 0.0
    assert dynamic_degree([7.0] + [0.0] * 3)[0] == 1.0  # 4 pairs: one is enough
    assert flow_frame_step(16) == 2 and flow_frame_step(None) == 1 and flow_frame_step(8) == 1


# ---------------------------------------------------------------------------------------------------------------
# the set the eval CLI computes
# ---------------------------------------------------------------------------------------------------------------
def test_without_weights_the_pixel_metrics_run_and_the_others_are_skipped(tmp_path):
    metrics = VideoMetrics(VideoMetricFiles().resolve(str(tmp_path)), "cpu", fps=16)
    assert metrics.names == ["frame_consistency_pixels", "motion_smoothness_pixels", "dynamic_degree_pixels",
                             "flow_magnitude_pixels"]
    assert set(metrics.skipped) == {"subject_consistency", "background_consistency", "aesthetic_quality",
                                    "imaging_quality"}
    # at 16 fps every second frame is used: 0.25 px per frame is 0.5 per pair, 2 at a 256-pixel side (< 6)
    scores = metrics(torch.stack([static(), noise(), moving(0.25)]))
    assert set(scores) == set(metrics.names) and all(v.shape == (3,) for v in scores.values())
    assert scores["dynamic_degree_pixels"].tolist() == [0.0, 1.0, 0.0]
    assert scores["frame_consistency_pixels"][0] > scores["frame_consistency_pixels"][2] > \
        scores["frame_consistency_pixels"][1]


def test_a_given_file_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--raft_weights"):
        VideoMetricFiles(raft_weights=str(tmp_path / "raft.pth")).resolve(str(tmp_path))


@pytest.mark.slow
def test_raft_weights_load_from_a_local_file_and_give_the_flow_columns(tmp_path):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)  # untrained: checks the loading and the plumbing
    metrics = VideoMetrics(VideoMetricFiles(raft_weights=str(path)).resolve(str(tmp_path)), "cpu", fps=None)
    assert "dynamic_degree" in metrics.names and "flow_magnitude" in metrics.names
    video = torch.nn.functional.interpolate(moving(1.0), size=(64, 64))[:, :5]
    scores = metrics(video[None])
    assert torch.isfinite(scores["flow_magnitude"]).all()
    torch.save({"weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="neither torchvision's raft_large nor raft_small"):
        VideoMetrics(VideoMetricFiles(raft_weights=str(tmp_path / "wrong.pth")), "cpu", None)


def test_aesthetic_head_is_checked_against_the_clip_embeddings(tmp_path):
    from branchgrpo.eval.video_metrics import load_aesthetic_head

    torch.save({"weight": torch.ones(1, 8), "bias": torch.zeros(1)}, tmp_path / "head.pth")
    head = load_aesthetic_head(str(tmp_path / "head.pth"))
    assert head(torch.ones(2, 8)).flatten().tolist() == [8.0, 8.0]
    torch.save({"layers.0.weight": torch.ones(4, 8)}, tmp_path / "mlp.pth")
    with pytest.raises(ValueError, match="sa_0_4_vit_l_14_linear.pth"):
        load_aesthetic_head(str(tmp_path / "mlp.pth"))
    files = VideoMetricFiles(aesthetic_head=str(tmp_path / "head.pth")).resolve(str(tmp_path))
    metrics = VideoMetrics(files, "cpu", None)  # no CLIP model: skipped with the reason
    assert "needs CLIP ViT-L/14" in metrics.skipped["aesthetic_quality"]
