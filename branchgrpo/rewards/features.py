"""Image feature extractors for the diversity metrics (KID / MMD^2 between two sets of samples).

Every extractor maps a batch of images `[B, C, H, W]`, float in [0, 1], to a float64 numpy array `[B, D]`, batched
under no_grad. Weights always come from local files given by the user: nothing is downloaded, and a missing file is
a clear `FileNotFoundError` naming the option that points to it.

- `ClipFeatures`: image embeddings of any open_clip architecture, built with `pretrained=None` and then filled from
  a local checkpoint (the same path HPS-v2.1 uses), so a ViT-H-14 HPS checkpoint or an OpenAI ViT-L-14 works alike.
- `InceptionFeatures`: the 2048-d pool features of torchvision's Inception-v3. The file that fits is torchvision's
  own ImageNet checkpoint `inception_v3_google-0cc3c7bd.pth` (any state dict of `torchvision.models.inception_v3`
  with aux logits works). Note: these are NOT the TF-ported FID Inception weights (`pt_inception-2015-12-05-*.pth`
  of pytorch-fid), so absolute values are not comparable with published FID/KID numbers; comparisons between two
  sets of samples scored the same way are what this is for.
- `PixelFeatures`: raw pixels after area downsampling, no checkpoint (for the toy and for tests).

Resizing, cropping and CLIP normalisation are the reward models' own (`branchgrpo.rewards._image`): CLIP features
here see the pixels of open_clip's default eval transform (shorter edge, centre crop), as the "clip" reward's
open_clip backend does, also on an HPS checkpoint (the HPS reward itself letterboxes, as HPSv2 does).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from branchgrpo.core.files import check_weights_file
from branchgrpo.rewards._image import (  # noqa: F401 (resize_center_crop, to_rgb: also this module's API)
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop,
    clip_preprocess,
    resize_center_crop,
    to_rgb,
)


class FeatureFlags(NamedTuple):
    """How the options of a feature extractor are named where the user gave them: its messages name them so."""

    features: str
    clip_weights: str
    inception_weights: str
    arch: str
    model_config: str


#: the diversity CLI's flags (`python -m branchgrpo.cli.diversity`)
DIVERSITY_FLAGS = FeatureFlags("--features", "--clip_checkpoint", "--inception_weights", "--clip_arch",
                               "--clip_model_config")
#: the options of the rewards that score with CLIP features (temporal_consistency, first_frame_consistency)
REWARD_OPTION_FLAGS = FeatureFlags("clip_checkpoint", "clip_checkpoint", "clip_checkpoint", "clip_arch",
                                   "model_config_dir")


def load_state_dict_file(path: str, option: str) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors`, `.pt`/`.pth`/`.bin` file (weights_only), unwrapping the usual
    `{'state_dict': ...}` / `{'model': ...}` wrappers and a DDP `module.` prefix."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{option}: checkpoint file not found: '{path}'")
    check_weights_file(path, option)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged past its header, or Python objects that weights_only refuses
        raise ValueError(f"{option}: cannot read '{path}' ({type(err).__name__}: "
                         f"{(str(err).strip().splitlines() or [''])[0][:200]})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{option}: '{path}' does not hold a state dict (got {type(state).__name__})")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


class _BatchedExtractor:
    """Shared batching: subclasses implement `_features(images on device) -> [b, D] tensor`."""

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images_BCHW: torch.Tensor) -> np.ndarray:
        images_BCHW = to_rgb(images_BCHW)
        chunks = []
        for start in range(0, images_BCHW.shape[0], self.batch_size):
            batch = images_BCHW[start:start + self.batch_size].to(self.device, torch.float32)
            chunks.append(self._features(batch).double().cpu())
        if not chunks:
            return np.zeros((0, 0))
        return torch.cat(chunks).numpy()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelFeatures(_BatchedExtractor):
    """Raw RGB pixels after area downsampling to `size x size` (resize + centre crop first), flattened: D = 3 size^2."""

    def __init__(self, size: int = 32, device: torch.device | str = "cpu", batch_size: int = 256):
        super().__init__(device, batch_size)
        self.size = size

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        square = center_crop(images, min(images.shape[-2:]))  # the largest centred square, not resized
        return F.adaptive_avg_pool2d(square, self.size).flatten(1)


class ClipFeatures(_BatchedExtractor):
    """open_clip image embeddings (`encode_image`) from a local checkpoint.

    `arch` is an open_clip model name (`ViT-H-14`, `ViT-L-14`, or one defined by a json in `model_config_dir`, which
    is registered with `open_clip.add_model_config`); the model is built with `pretrained=None` and filled strictly
    from `checkpoint`. Preprocessing follows the model's own preprocess config (size, mean, std; bicubic resize of
    the short side and centre crop). `normalize=True` L2-normalises the embeddings."""

    def __init__(self, arch: str, checkpoint: str, model_config_dir: str | None = None, normalize: bool = False,
                 device: torch.device | str = "cpu", batch_size: int = 32, flags: FeatureFlags = DIVERSITY_FLAGS):
        super().__init__(device, batch_size)
        from branchgrpo.rewards.hps import open_clip_mismatch

        check_clip_arch(arch, model_config_dir, flags)
        state = load_state_dict_file(checkpoint, flags.clip_weights)
        error = open_clip_mismatch(arch, state, f"{flags.clip_weights}: '{checkpoint}'",
                                   f"give its architecture with {flags.arch}, and {flags.model_config} for one "
                                   "open_clip does not ship")
        if error is not None:
            raise error
        import open_clip

        model = open_clip.create_model(arch, pretrained=None)
        model.load_state_dict(state, strict=True)
        self.model = model.to(self.device).eval()
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", model.visual.image_size)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean, self.std = tuple(cfg.get("mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("std", OPENAI_CLIP_STD))
        self.normalize = normalize

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size, mean=self.mean, std=self.std)
        return self.model.encode_image(pixels, normalize=self.normalize).float()


class InceptionFeatures(_BatchedExtractor):
    """torchvision Inception-v3 pool3 features (2048-d, the input of the final fc), from a local weights file.

    The Google-trained weights expect inputs scaled to [-1, 1] (torchvision's `transform_input=True` converts
    ImageNet-normalised inputs to exactly that), so images are resized to 299 x 299 (bilinear, antialiased) and fed
    as `2 x - 1` with `transform_input=False`."""

    def __init__(self, weights: str, device: torch.device | str = "cpu", batch_size: int = 32,
                 flags: FeatureFlags = DIVERSITY_FLAGS):
        super().__init__(device, batch_size)
        from torchvision.models import inception_v3

        from branchgrpo.core.state_dicts import load_strict

        state = load_state_dict_file(weights, flags.inception_weights)
        model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        load_strict(model, state, f"{flags.inception_weights}: '{weights}'", "torchvision's inception_v3 with aux_logits",
                    fix="expected e.g. inception_v3_google-0cc3c7bd.pth")
        model.fc = torch.nn.Identity()  # eval-mode forward then returns the dropout-free pooled features
        self.model = model.to(self.device).eval()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return self.model(pixels * 2.0 - 1.0).float()


def check_clip_arch(arch: str, model_config_dir: str | None, flags: FeatureFlags) -> None:
    """`arch` is an open_clip architecture (after registering `model_config_dir`, if given); imports open_clip."""
    import open_clip

    if model_config_dir is not None:
        if not os.path.exists(model_config_dir):
            raise FileNotFoundError(f"{flags.model_config}: '{model_config_dir}' does not exist")
        open_clip.add_model_config(model_config_dir)
    if arch not in open_clip.list_models():
        raise ValueError(f"{flags.arch}: unknown open_clip architecture '{arch}' (add its json with "
                         f"{flags.model_config} DIR)")


def check_extractor_files(kind: str, weights: str | None, clip_arch: str | None, flags: FeatureFlags,
                          model_config: str | None = None) -> None:
    """What `build_extractor` will read, checked without loading it (before a model is loaded elsewhere): the weights
    file of clip / inception features is a complete weights file, the CLIP architecture is known."""
    if kind == "pixels":
        return
    if not weights:
        raise ValueError(f"{flags.features} {kind} needs {flags.clip_weights if kind == 'clip' else flags.inception_weights} "
                         "FILE")
    check_weights_file(weights, flags.clip_weights if kind == "clip" else flags.inception_weights)
    if kind == "clip":
        if not clip_arch:
            raise ValueError(f"{flags.features} clip needs {flags.arch} NAME")
        check_clip_arch(clip_arch, model_config, flags)


def build_extractor(kind: str, device: torch.device | str = "cpu", batch_size: int = 32, clip_arch: str | None = None,
                    clip_checkpoint: str | None = None, clip_model_config: str | None = None,
                    clip_normalize: bool = False, inception_weights: str | None = None,
                    pixel_size: int = 32, flags: FeatureFlags = DIVERSITY_FLAGS) -> _BatchedExtractor:
    """The extractor named by `--features` (clip | inception | pixels); `flags`: how its options were named."""
    if kind == "pixels":
        return PixelFeatures(size=pixel_size, device=device, batch_size=max(batch_size, 1))
    if kind == "clip":
        if not clip_arch or not clip_checkpoint:
            raise ValueError(f"{flags.features} clip needs {flags.arch} NAME and {flags.clip_weights} FILE")
        return ClipFeatures(clip_arch, clip_checkpoint, clip_model_config, clip_normalize, device, batch_size, flags)
    if kind == "inception":
        if not inception_weights:
            raise ValueError(f"{flags.features} inception needs {flags.inception_weights} FILE "
                             "(torchvision's inception_v3_google-0cc3c7bd.pth)")
        return InceptionFeatures(inception_weights, device, batch_size, flags)
    raise ValueError(f"{flags.features}: expected clip, inception or pixels, got '{kind}'")


def extract_list(extractor: _BatchedExtractor, images: Sequence[torch.Tensor]) -> np.ndarray:
    """Features of a list of `[C, H, W]` images that may differ in size: runs of equal shape are batched together."""
    out, run = [], []
    for image in list(images) + [None]:
        if run and (image is None or image.shape != run[0].shape):
            out.append(extractor(torch.stack(run)))
            run = []
        if image is not None:
            run.append(image)
    return np.concatenate(out) if out else np.zeros((0, 0))
