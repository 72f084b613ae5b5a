"""VBench-style video metrics computed offline, from models the user keeps locally (docs/evaluation.md).

Every metric maps one video `[C, F, H, W]` in [0, 1] to a float; `VideoMetrics` builds what the given files allow and
scores a batch `[B, C, F, H, W]` into one tensor `[B]` per metric, reported beside the rewards (with CIs) by the eval
CLI. Names carry their backend when it is a fallback (`_pixels`), so numbers from different backends never share a
column.

- consistency (VBench's Subject and Background Consistency): with frame features f_1..f_F, L2-normalised,
      C = mean_{t=2..F} (cos(f_1, f_t) + cos(f_{t-1}, f_t)) / 2,
  with DINO features (`subject_consistency`), CLIP image embeddings (`background_consistency`), or - needing no
  weights - each frame's area-downsampled pixels with the frame's mean removed (`frame_consistency_pixels`: then
  the cosine is the frames' Pearson correlation, ~0 for independent noise frames). 1 for a static video.
- `motion_smoothness_pixels` (VBench's Motion Smoothness uses the AMT interpolation network; this is its pixel
  analogue): every odd frame is dropped and predicted as the mean of its two neighbours; the score is
  1 - mean |frame - prediction| (pixels in [0, 1]), VBench's (255 - MAE) / 255. 1 for a static (or linearly
  fading) video, 17/24 in expectation for independent uniform noise frames.
- dynamic degree (VBench's Dynamic Degree): optical flow between frames taken at about 8 fps; per frame pair the
  mean of the largest 5% flow magnitudes, in pixels rescaled to a 256-pixel shorter side (`flow_magnitude`); a
  video is dynamic (1, else 0: `dynamic_degree`, whose mean is the share of dynamic videos) when at least
  round(4 F' / 16) of its F' pairs exceed 6 such pixels, VBench's rule. Flow from torchvision's RAFT with a local
  weights file, or - the cheaper fallback, labelled `_pixels` - pyramidal Lucas-Kanade in pixel space (least-squares
  flow over 11 x 11 windows, coarse to fine with warping; untextured windows get no flow; an 8-pixel border left
  out). It finds a smooth translation of 0.5-3 pixels per frame (at 128 pixels) to within about 20% in its top 5%,
  but not motion larger than the pattern's own period (RAFT does better on real videos).
- `aesthetic_quality`: the LAION aesthetic predictor (a linear head on L2-normalised CLIP ViT-L/14 image embeddings,
  `sa_0_4_vit_l_14_linear.pth`) per frame, / 10, averaged over frames - VBench's definition.
- `imaging_quality`: MUSIQ (SPAQ-trained) per frame, / 100, averaged - VBench's definition; needs the `pyiqa` package
  (not a dependency of this project) and its weights file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FLOW_SCALE_SIDE = 256  # VBench's dynamic-degree threshold is 6 pixels at this shorter side
FLOW_THRESHOLD = 6.0
TOP_SHARE = 0.05  # the largest 5% of a pair's flow magnitudes
MIN_RAFT_SIDE = 128


# ---------------------------------------------------------------------------------------------------------------
# Pure definitions
# ---------------------------------------------------------------------------------------------------------------
def consistency(features_FD: torch.Tensor) -> float:
    """VBench's consistency of frame features [F, D]: mean over t >= 2 of (cos(f_1, f_t) + cos(f_{t-1}, f_t)) / 2."""
    if features_FD.shape[0] < 2:
        raise ValueError(f"consistency needs at least 2 frames, got {features_FD.shape[0]}")
    f = F.normalize(features_FD.double(), dim=-1)
    to_first = f[1:] @ f[0]
    to_previous = (f[1:] * f[:-1]).sum(-1)
    return float(((to_first + to_previous) / 2).mean())


def pixel_frame_features(video_CFHW: torch.Tensor, size: int = 32) -> torch.Tensor:
    """[F, 3 s^2]: each frame area-downsampled to s x s (s = min(size, shorter side)), its own mean removed."""
    frames = video_CFHW.float().transpose(0, 1)  # [F, C, H, W]
    side = min(size, *frames.shape[-2:])
    x = F.adaptive_avg_pool2d(frames, side).flatten(1)
    return x - x.mean(1, keepdim=True)


def motion_smoothness_pixels(video_CFHW: torch.Tensor) -> float:
    """1 - mean |x_t - (x_{t-1} + x_{t+1}) / 2| over the odd frames t that have two neighbours."""
    frames = video_CFHW.float().transpose(0, 1)
    if frames.shape[0] < 3:
        raise ValueError(f"motion smoothness needs at least 3 frames, got {frames.shape[0]}")
    odd = torch.arange(1, frames.shape[0] - 1, 2)
    predicted = (frames[odd - 1] + frames[odd + 1]) / 2
    return float(1.0 - (frames[odd] - predicted).abs().mean())


def top_flow_magnitude(flow_2HW: torch.Tensor) -> float:
    """Mean of the largest 5% (at least one) of the per-pixel flow magnitudes of one frame pair."""
    magnitude = flow_2HW.float().square().sum(0).sqrt().flatten()
    count = max(1, int(magnitude.numel() * TOP_SHARE))
    return float(magnitude.topk(count).values.mean())


def dynamic_degree(pair_magnitudes: list[float]) -> tuple[float, float]:
    """(is dynamic: 1.0 / 0.0, mean magnitude) from the per-pair top-5% magnitudes, already in pixels at a 256-pixel
    shorter side: dynamic when at least round(4 P / 16) (>= 1) of the P pairs exceed 6 pixels (VBench's rule)."""
    needed = max(1, round(4 * len(pair_magnitudes) / 16))
    moving = sum(m > FLOW_THRESHOLD for m in pair_magnitudes)
    return float(moving >= needed), float(sum(pair_magnitudes) / len(pair_magnitudes))


def flow_frame_step(fps: float | None) -> int:
    """Frames taken about 8 per second, as VBench does (every frame when the rate is unknown or <= 12)."""
    return max(1, round(fps / 8)) if fps else 1


# ---------------------------------------------------------------------------------------------------------------
# Optical flow: pyramidal Lucas-Kanade (no weights) and RAFT (torchvision, local weights)
# ---------------------------------------------------------------------------------------------------------------
def _warp(image_B1HW: torch.Tensor, flow_B2HW: torch.Tensor) -> torch.Tensor:
    """image sampled at (x + u, y + v) (bilinear, borders repeated)."""
    b, _, h, w = image_B1HW.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=image_B1HW.device, dtype=torch.float32),
                            torch.arange(w, device=image_B1HW.device, dtype=torch.float32), indexing="ij")
    gx = (xs + flow_B2HW[:, 0]) / max(w - 1, 1) * 2 - 1
    gy = (ys + flow_B2HW[:, 1]) / max(h - 1, 1) * 2 - 1
    return F.grid_sample(image_B1HW, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border",
                         align_corners=True)


def _lk_increment(first: torch.Tensor, warped: torch.Tensor, radius: int, min_eigen: float) -> torch.Tensor:
    """One least-squares Lucas-Kanade step [B, 2, H, W] between `first` and the warped second frame."""
    mean = (first + warped) / 2
    padded = F.pad(mean, (1, 1, 1, 1), mode="replicate")
    ix = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    iy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    it = warped - first

    def window(x):
        return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)

    sxx, syy, sxy = window(ix * ix), window(iy * iy), window(ix * iy)
    bx, by = -window(ix * it), -window(iy * it)
    det = sxx * syy - sxy * sxy
    trace = sxx + syy
    smallest = (trace - (trace * trace - 4 * det).clamp_min(0).sqrt()) / 2  # the aperture problem: no flow there
    ok = smallest > min_eigen
    safe = torch.where(ok, det, torch.ones_like(det))
    u = torch.where(ok, (syy * bx - sxy * by) / safe, torch.zeros_like(det))
    v = torch.where(ok, (sxx * by - sxy * bx) / safe, torch.zeros_like(det))
    return torch.cat([u, v], 1)


def lucas_kanade_flow(first_B1HW: torch.Tensor, second_B1HW: torch.Tensor, levels: int | None = None,
                      iterations: int = 3, radius: int = 5, min_eigen: float = 1e-5) -> torch.Tensor:
    """Flow [B, 2, H, W] (pixels; first -> second) by coarse-to-fine Lucas-Kanade: halve the images while the shorter
    side stays >= 16, estimate at the coarsest level, then at each finer level double the flow, warp the second
    frame by it and add `iterations` least-squares increments."""
    if levels is None:
        levels, side = 1, min(first_B1HW.shape[-2:])
        while side // 2 >= 16:
            levels, side = levels + 1, side // 2
    pyramid = [(first_B1HW.float(), second_B1HW.float())]
    for _ in range(levels - 1):
        pyramid.append(tuple(F.avg_pool2d(x, 2) for x in pyramid[-1]))
    flow = torch.zeros_like(pyramid[-1][0]).expand(-1, 2, -1, -1).contiguous()
    for first, second in reversed(pyramid):
        if flow.shape[-2:] != first.shape[-2:]:
            scale = torch.tensor([first.shape[-1] / flow.shape[-1], first.shape[-2] / flow.shape[-2]],
                                 device=flow.device).view(1, 2, 1, 1)
            flow = F.interpolate(flow, size=first.shape[-2:], mode="bilinear", align_corners=False) * scale
        for _ in range(iterations):
            flow = flow + _lk_increment(first, _warp(second, flow), radius, min_eigen)
    return flow


class PixelFlow:
    """Lucas-Kanade flow on grey frames at a shorter side of at most `work_side` pixels, in input pixels; a border of
    `margin` working pixels (where content enters or leaves the frame and no window sees it whole) is left out."""

    name = "pixels"

    def __init__(self, work_side: int = 128, margin: int = 8):
        self.work_side, self.margin = work_side, margin

    def __call__(self, first_BCHW: torch.Tensor, second_BCHW: torch.Tensor) -> torch.Tensor:
        h, w = first_BCHW.shape[-2:]
        scale = min(1.0, self.work_side / min(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))

        def grey(x):
            x = x.float().mean(1, keepdim=True)
            return x if size == (h, w) else F.interpolate(x, size=size, mode="area")

        flow = lucas_kanade_flow(grey(first_BCHW), grey(second_BCHW)) / scale
        m = self.margin if min(size) > 4 * self.margin else 0
        return flow[..., m:size[0] - m, m:size[1] - m]


class RaftFlow:
    """torchvision's RAFT (large or small, told apart by the weights file) from a local state dict; frames padded to
    multiples of 8 (replicated borders) and scaled to [-1, 1]."""

    name = "raft"

    def __init__(self, weights: str, device: torch.device, num_flow_updates: int = 20):
        from torchvision.models.optical_flow import raft_large, raft_small

        from branchgrpo.rewards.features import load_state_dict_file

        state = load_state_dict_file(weights, "--raft_weights")
        for build in (raft_large, raft_small):
            model = build(weights=None)
            if set(model.state_dict()) == set(state):
                break
        else:
            raise ValueError(f"--raft_weights: '{weights}' is neither torchvision's raft_large nor raft_small state "
                             "dict (expected e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth)")
        from branchgrpo.core.state_dicts import load_strict

        load_strict(model, state, f"--raft_weights: '{weights}'", f"torchvision's {build.__name__}")
        self.model, self.device, self.num_flow_updates = model.to(device).eval(), device, num_flow_updates

    @torch.no_grad()
    def __call__(self, first_BCHW: torch.Tensor, second_BCHW: torch.Tensor) -> torch.Tensor:
        h, w = first_BCHW.shape[-2:]
        scale = max(1.0, MIN_RAFT_SIDE / min(h, w))  # RAFT's correlation pyramid needs >= 128 pixels
        size = (round(h * scale), round(w * scale))
        pad = (0, (-size[1]) % 8, 0, (-size[0]) % 8)

        def prepare(x):
            x = x.to(self.device, torch.float32).expand(-1, 3, -1, -1)
            if size != (h, w):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            return F.pad(x * 2 - 1, pad, mode="replicate")

        flows = self.model(prepare(first_BCHW), prepare(second_BCHW), num_flow_updates=self.num_flow_updates)
        return (flows[-1][..., :size[0], :size[1]] / scale).float().cpu()


def video_flow_magnitudes(video_CFHW: torch.Tensor, flow: Callable, fps: float | None) -> list[float]:
    """Per frame pair (frames ~8 per second apart), the top-5% flow magnitude in pixels at a 256-pixel shorter side."""
    frames = video_CFHW.transpose(0, 1)[:: flow_frame_step(fps)]  # [F', C, H, W]
    if frames.shape[0] < 2:
        raise ValueError("dynamic degree needs at least 2 frames")
    flows = flow(frames[:-1], frames[1:])  # [F' - 1, 2, H, W]
    scale = FLOW_SCALE_SIDE / min(video_CFHW.shape[-2:])
    return [top_flow_magnitude(f) * scale for f in flows]


# ---------------------------------------------------------------------------------------------------------------
# Frame embedders of local models
# ---------------------------------------------------------------------------------------------------------------
class DinoFeatures:
    """CLS embeddings of a transformers ViT / DINOv2 folder (e.g. a local copy of facebook/dino-vitb16, VBench's
    subject-consistency backbone): shorter side resized to 224 (bicubic), centre crop, ImageNet normalisation."""

    def __init__(self, folder: str, device: torch.device, batch_size: int = 32):
        from transformers import AutoModel

        config = Path(folder) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"--dino_model: {config} does not exist (a transformers ViT or DINOv2 folder)")
        try:
            self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as err:
            raise ValueError(f"--dino_model: cannot load {folder} ({err})") from None
        self.device, self.batch_size = device, batch_size
        self.description = f"DINO features ({json.loads(config.read_text()).get('model_type')}: {folder})"

    @torch.no_grad()
    def __call__(self, frames_BCHW: torch.Tensor) -> torch.Tensor:
        from branchgrpo.rewards._image import clip_preprocess

        out = []
        for start in range(0, frames_BCHW.shape[0], self.batch_size):
            pixels = clip_preprocess(frames_BCHW[start:start + self.batch_size].to(self.device), 224,
                                     mean=IMAGENET_MEAN, std=IMAGENET_STD)
            out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out)


class ClipImageFeatures:
    """CLIP image embeddings [N, D] from a transformers CLIPModel folder or an open_clip checkpoint file (`arch`)."""

    def __init__(self, path: str, arch: str, device: torch.device, batch_size: int = 32):
        self.device, self.batch_size = device, batch_size
        if Path(path).is_dir():
            from branchgrpo.rewards.pickscore import load_hf_clip

            self.model, _, self.processor = load_hf_clip(path, path, "--video_clip", torch.float32)
            self.model.to(device)
            self.open_clip = None
            self.description = f"CLIP image embeddings (transformers: {path})"
        elif Path(path).is_file():
            from branchgrpo.rewards.features import ClipFeatures

            self.open_clip = ClipFeatures(arch, path, device=device, batch_size=batch_size)
            self.description = f"CLIP image embeddings (open_clip {arch}: {path})"
        else:
            raise FileNotFoundError(f"--video_clip: {path} is neither a transformers CLIP folder nor a checkpoint file")

    @torch.no_grad()
    def __call__(self, frames_BCHW: torch.Tensor) -> torch.Tensor:
        if self.open_clip is not None:
            return torch.from_numpy(self.open_clip(frames_BCHW)).float()
        from branchgrpo.rewards._image import clip_preprocess

        p, out = self.processor, []
        for start in range(0, frames_BCHW.shape[0], self.batch_size):
            pixels = clip_preprocess(frames_BCHW[start:start + self.batch_size].to(self.device), p["size"],
                                     p["crop_size"], p["mean"], p["std"], crop_offset="floor")
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out)


def load_aesthetic_head(path: str) -> torch.nn.Linear:
    """LAION's `sa_0_4_vit_l_14_linear.pth`: a Linear(768, 1) state dict on normalised CLIP ViT-L/14 embeddings."""
    from branchgrpo.rewards.features import load_state_dict_file

    state = load_state_dict_file(path, "--aesthetic_head")
    weight = state.get("weight")
    if weight is None or weight.dim() != 2 or weight.shape[0] != 1 or set(state) != {"weight", "bias"}:
        raise ValueError(f"--aesthetic_head: '{path}' is not a linear head state dict {{weight [1, D], bias [1]}} "
                         "(expected LAION's sa_0_4_vit_l_14_linear.pth)")
    head = torch.nn.Linear(weight.shape[1], 1)
    head.load_state_dict(state)
    return head.eval()


# ---------------------------------------------------------------------------------------------------------------
# The set a run computes
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class VideoMetricFiles:
    """Where each model comes from (None: not given; the defaults under --reward_model_dir are filled by `resolve`)."""

    dino_model: str | None = None
    video_clip: str | None = None
    video_clip_arch: str = "ViT-B-32"
    raft_weights: str | None = None
    aesthetic_head: str | None = None
    musiq_weights: str | None = None

    def resolve(self, model_dir: str) -> "VideoMetricFiles":
        """Default locations under `model_dir` (the released names), used only when they exist."""
        defaults = {"dino_model": "dino-vitb16", "video_clip": "clip-vit-large-patch14",
                    "raft_weights": "raft_large_C_T_SKHT_V2-ff5fadd5.pth",
                    "aesthetic_head": "sa_0_4_vit_l_14_linear.pth", "musiq_weights": "musiq_spaq_ckpt-358bb6af.pth"}
        values = dict(self.__dict__)
        for name, default in defaults.items():
            if values[name] is None and os.path.exists(os.path.join(model_dir, default)):
                values[name] = os.path.join(model_dir, default)
            elif values[name] is not None and not os.path.exists(values[name]):
                raise FileNotFoundError(f"--{name}: {values[name]} does not exist")
        return VideoMetricFiles(**values)


class VideoMetrics:
    """The metrics the given files allow; `skipped` says, one line each, which are not computed and why."""

    def __init__(self, files: VideoMetricFiles, device: torch.device, fps: float | None):
        self.device, self.fps = torch.device(device), fps
        self.skipped: dict[str, str] = {}
        self.backends: dict[str, str] = {"frame_consistency_pixels": "pixels (32 x 32, frame mean removed)",
                                         "motion_smoothness_pixels": "pixels (neighbour-mean interpolation)"}
        self.dino = self.clip = self.aesthetic = self.musiq = None
        if files.dino_model:
            self.dino = DinoFeatures(files.dino_model, self.device)
            self.backends["subject_consistency"] = self.dino.description
        else:
            self.skipped["subject_consistency"] = "no --dino_model (a transformers dino-vitb16 folder)"
        if files.video_clip:
            self.clip = ClipImageFeatures(files.video_clip, files.video_clip_arch, self.device)
            self.backends["background_consistency"] = self.clip.description
        else:
            self.skipped["background_consistency"] = "no --video_clip (a CLIP folder or open_clip file)"
        if files.raft_weights:
            self.flow = RaftFlow(files.raft_weights, self.device)
            self.flow_suffix = ""
        else:
            self.flow, self.flow_suffix = PixelFlow(), "_pixels"
        for name in ("dynamic_degree", "flow_magnitude"):
            self.backends[name + self.flow_suffix] = ("RAFT: " + files.raft_weights if files.raft_weights else
                                                      "pixels (pyramidal Lucas-Kanade fallback)")
        self._init_aesthetic(files)
        self._init_musiq(files)

    def _init_aesthetic(self, files: VideoMetricFiles) -> None:
        if not files.aesthetic_head:
            self.skipped["aesthetic_quality"] = "no --aesthetic_head (LAION's sa_0_4_vit_l_14_linear.pth)"
        elif self.clip is None:
            self.skipped["aesthetic_quality"] = "the aesthetic head needs CLIP ViT-L/14 embeddings (--video_clip)"
        else:
            self.aesthetic = load_aesthetic_head(files.aesthetic_head)
            probe = self.clip(torch.zeros(1, 3, 224, 224))
            if probe.shape[1] != self.aesthetic.in_features:
                raise ValueError(f"--aesthetic_head: expects {self.aesthetic.in_features}-d CLIP embeddings (ViT-L/14)"
                                 f", but --video_clip gives {probe.shape[1]}-d ones")
            self.backends["aesthetic_quality"] = (f"LAION linear head ({files.aesthetic_head}) on "
                                                  f"{self.clip.description}")

    def _init_musiq(self, files: VideoMetricFiles) -> None:
        if not files.musiq_weights:
            self.skipped["imaging_quality"] = "no --musiq_weights (MUSIQ-SPAQ, musiq_spaq_ckpt-358bb6af.pth)"
            return
        try:
            import pyiqa
        except ImportError:
            self.skipped["imaging_quality"] = "MUSIQ needs the pyiqa package (pip install pyiqa), not installed"
            return
        self.musiq = pyiqa.create_metric("musiq-spaq", as_loss=False, device=self.device,
                                         pretrained_model_path=files.musiq_weights)
        self.backends["imaging_quality"] = f"MUSIQ-SPAQ via pyiqa ({files.musiq_weights})"

    @property
    def names(self) -> list[str]:
        out = ["subject_consistency"] if self.dino else []
        out += ["background_consistency"] if self.clip else []
        out += ["frame_consistency_pixels", "motion_smoothness_pixels", "dynamic_degree" + self.flow_suffix,
                "flow_magnitude" + self.flow_suffix]
        out += ["aesthetic_quality"] if self.aesthetic is not None else []
        out += ["imaging_quality"] if self.musiq is not None else []
        return out

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Videos [B, C, F, H, W] in [0, 1] -> {metric: float32 [B]}."""
        if videos.dim() != 5:
            raise ValueError(f"video metrics: expected videos [B, C, F, H, W], got {tuple(videos.shape)}")
        rows = [self._one(video) for video in videos]
        return {name: torch.tensor([row[name] for row in rows], dtype=torch.float32) for name in self.names}

    def _one(self, video: torch.Tensor) -> dict[str, float]:
        frames = video.transpose(0, 1)  # [F, C, H, W]
        out = {"frame_consistency_pixels": consistency(pixel_frame_features(video)),
               "motion_smoothness_pixels": motion_smoothness_pixels(video)}
        moving, magnitude = dynamic_degree(video_flow_magnitudes(video, self.flow, self.fps))
        out["dynamic_degree" + self.flow_suffix], out["flow_magnitude" + self.flow_suffix] = moving, magnitude
        if self.dino is not None:
            out["subject_consistency"] = consistency(self.dino(frames))
        if self.clip is not None:
            embeds = self.clip(frames)
            out["background_consistency"] = consistency(embeds)
            if self.aesthetic is not None:
                scores = self.aesthetic(F.normalize(embeds.float(), dim=-1))
                out["aesthetic_quality"] = float(scores.mean()) / 10
        if self.musiq is not None:
            out["imaging_quality"] = float(self.musiq(frames.to(self.device).float()).mean()) / 100
        return out
