"""A tiny random Qwen-Image-Edit-style pipeline in diffusers layout, built offline (tests, CPU smoke runs).

Qwen-Image-Edit has Qwen-Image's parts and shapes (the same QwenImageTransformer2DModel configuration, VAE, Qwen2.5-VL
text encoder and scheduler) plus a `processor/` (Qwen2VLProcessor: the tokenizer and Qwen2.5-VL's image processor,
which cuts the source image into 14-pixel patches, 2x2-merged into vision tokens). So the tiny Qwen-Image parts
(branchgrpo/testing/qwen_image_tiny.py) are saved as a `QwenImageEditPipeline`, with a tokenizer whose merges are
trained on the edit template (the pipeline drops its first 64 tokens) and the image processor of the release
(Qwen2.5-VL-7B-Instruct's preprocessor_config.json: pixel bounds 56 x 56 to 12845056, CLIP's mean and std).
"""

from __future__ import annotations

from pathlib import Path

import torch

from branchgrpo.models.qwen_image import TINY_TRANSFORMER_CONFIG
from branchgrpo.models.qwen_image_edit import EDIT_TEMPLATE
from branchgrpo.testing.qwen_image_tiny import SCHEDULER_CONFIG, VAE_CONFIG, qwen_tokenizer, tiny_text_encoder

IMAGE_PROCESSOR_CONFIG = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                              merge_size=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
                              image_std=[0.26862954, 0.26130258, 0.27577711])


def build_tiny_qwen_image_edit_pipeline(seed: int = 0):
    """The tiny QwenImageEditPipeline in memory (random weights drawn from `seed`)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    vae = AutoencoderKLQwenImage(**VAE_CONFIG)
    tokenizer = qwen_tokenizer(EDIT_TEMPLATE)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**IMAGE_PROCESSOR_CONFIG), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())  # unused, but the processor requires one
    return QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae.eval(),
                                 text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, processor=processor,
                                 transformer=transformer)


def make_tiny_qwen_image_edit(out_dir: str, seed: int = 0) -> Path:
    """Write the tiny pipeline to `out_dir` in diffusers layout (safetensors); returns the folder."""
    out = Path(out_dir)
    build_tiny_qwen_image_edit_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return out


def make_tiny_qwen_image_edit_plus(out_dir: str, seed: int = 0) -> Path:
    """The same parts saved as a QwenImageEditPlusPipeline (Qwen-Image-Edit-2509: the same shapes, system template
    and processor); returns the folder."""
    from diffusers import QwenImageEditPlusPipeline

    out = Path(out_dir)
    pipe = QwenImageEditPlusPipeline(**build_tiny_qwen_image_edit_pipeline(seed).components)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out
