"""VideoAlign's VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback"): the paper's video
reward, motion quality (MQ), plus visual quality (VQ) and text alignment (TA). Built here from transformers' Qwen2-VL
classes and a local checkpoint; the VideoAlign code base itself (which pins transformers 4.45) is not needed.

What the released checkpoint is (KwaiVGI/VideoReward, also published as KlingTeam/VideoReward; docs/wan.md):
- Qwen2-VL-2B-Instruct with LoRA (rank 64, alpha 128) on every Linear of the language model (not on the vision tower,
  embeddings, lm_head or the head), the vocabulary extended by three tokens <|VQ_reward|>, <|MQ_reward|>,
  <|TA_reward|>, and a reward head `rm_head` = Linear(hidden, 1, bias=False) applied to the last hidden state at each
  of the three tokens (in that order in the prompt): three raw scores.
- `model_config.json`: the trainer's data/model/LoRA configs and `inference_config` = per-dimension mean/std;
  the normalised score is (raw - mean) / std (VQ 3.6757/2.2476, MQ 1.1646/1.3811, TA 2.8105/2.5121), what DanceGRPO
  trains on (`use_norm=True`).
- `checkpoint-<step>/model.pth`: the full state dict of the peft-wrapped model in transformers 4.45's Qwen2-VL key
  layout; `checkpoint-<step>/tokenizer/`: the extended tokenizer with the chat template. The base model's folder
  (`model_name_or_path`, "Qwen/Qwen2-VL-2B-Instruct") supplies config.json and preprocessor_config.json only: every
  weight is in model.pth.

Inference recipe reproduced (VideoAlign's inference.py + vision_process.py + trainer.py):
- frames: the video is read as uint8 RGB; `nframes` = round-to-even of clamp(total / source_fps * fps, 4, min(768,
  total)), indices linspace(0, total - 1, nframes).round(); each frame resized (bicubic, antialiased, on uint8) to
  Qwen-VL's `smart_resize` of (H, W) with factor 28, min 128 * 28 * 28 and max `max_frame_pixels` (200,704) pixels.
  We take decoded frames in memory; DanceGRPO writes an mp4 first, whose lossy compression we do not imitate.
- text: the "detailed_special" prompt below in a one-turn chat (video first, then text) with the generation prompt.
- forward: token embeddings with the vision tower's merged features scattered into the <|video_pad|> slots, then the
  language model with SEQUENTIAL position ids (0..L-1 on all three MRoPE axes): VideoAlign's forward calls the
  language model directly with `position_ids=None`, which in transformers 4.45 means sequential positions, not
  Qwen2-VL's 3-D video positions. Calling the stock Qwen2VLModel would change the scores.
LoRA is merged into the weights at load (W + alpha / r * B A): identical at inference (dropout is off), and faster.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from branchgrpo.core.files import read_json
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, LocalPath, register_reward
from branchgrpo.core.state_dicts import count_blocks, shapes_of, state_dict_mismatch

DIMENSIONS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
NORMALISATION = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811, "TA_mean": 2.8105,
                 "TA_std": 2.5121}  # the released checkpoint's inference_config (used when a folder lacks one)
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' per-frame minimum, which VideoAlign keeps
FRAME_FACTOR, IMAGE_FACTOR, MIN_FRAMES, MAX_FRAMES = 2, 28, 4, 768
WAN_FPS = 16.0  # Wan2.1 generates 16 frames per second
CHECKPOINT = "VideoReward"  # folder under --reward_model_dir
# The model's trained input, character for character (VideoAlign's "detailed_special" template; the trailing spaces
# are part of it). Only {text_prompt} is substituted.
DETAILED_SPECIAL_TEMPLATE = "\n".join([
    "",
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion "
    "Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst "
    "and 10 being the best. Each evaluation should be independent of the others.",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions "
    "should be considered:",
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal "
    "body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.",
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult "
    "material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
    "",
    "Please provide the ratings of Visual Quality: <|VQ_reward|>",
    "END",
    "",
    "**Motion Quality:**  ",
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:",
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural "
    "jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body "
    "parts).",
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should "
    "flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).",
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or "
    "camera angles should be seamless, and the overall dynamic feel should be visually pleasing.",
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with "
    "the background, without obvious artifacts or the feeling of cut-and-paste effects.",
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the "
    "video might have blurry or unsteady sections that hinder visual continuity.",
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.",
    "",
    "Please provide the ratings of Motion Quality: <|MQ_reward|>",
    "END",
    "",
    "**Text Alignment:**  ",
    "Assess how well the video matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.",
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking "
    "or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and "
    "direction.",
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if "
    "real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  ",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "video adheres to this style.",
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are "
    "consistent with the expected behavior from the prompt.",
    "",
    "Textual prompt - {text_prompt}",
    "Please provide the ratings of Text Alignment: <|TA_reward|>",
    "END",
    "",
])


# ----- frame sampling and resizing (qwen-vl-utils as vendored by VideoAlign) ---------------------------------------


def sample_frame_indices(total: int, source_fps: float, fps: float = 2.0) -> list[int]:
    """Uniform sampling at `fps` of a clip recorded at `source_fps`: an even number of frames in
    [4, min(768, total)], spread from the first to the last frame."""
    low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    high = math.floor(min(MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
    count = round(min(max(total / source_fps * fps, low), high) / FRAME_FACTOR) * FRAME_FACTOR
    count = min(count, total)
    if count < FRAME_FACTOR:
        raise ValueError(f"reward 'videoalign': a video needs at least {FRAME_FACTOR} frames, got {total}")
    return torch.linspace(0, total - 1, count).round().long().tolist()


def frame_size(height: int, width: int, min_pixels: int, max_pixels: int,
               factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """Qwen-VL's smart_resize: sides multiples of 28, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"reward 'videoalign': aspect ratio of {height}x{width} frames exceeds 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def prepare_frames(video_CFHW: torch.Tensor, source_fps: float, fps: float, min_pixels: int,
                   max_pixels: int) -> torch.Tensor:
    """One video [3, F, H, W] in [0, 1] -> the uint8 frames [T, 3, h, w] VideoAlign feeds its processor."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    index = torch.tensor(sample_frame_indices(video_CFHW.shape[1], source_fps, fps), device=video_CFHW.device)
    frames = video_CFHW.detach().index_select(1, index).float().permute(1, 0, 2, 3).cpu()  # [T, 3, H, W]
    frames = (frames.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)  # what a decoded video file holds
    size = frame_size(frames.shape[-2], frames.shape[-1], min_pixels, max_pixels)
    return resize(frames, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)  # uint8 out


# ----- checkpoint ----------------------------------------------------------------------------------------------------


def _fail(message: str):
    raise FileNotFoundError(f"reward 'videoalign': {message} (see docs/wan.md for the VideoReward layout)")


def _latest_checkpoint(root: Path, step: int | None) -> Path:
    found = sorted((p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    if step is not None:
        found = [p for p in found if int(p.name.split("-")[-1]) == step]
    if not found:
        _fail(f"no checkpoint-{step if step is not None else '<step>'}/ folder in {root}")
    return found[-1]


def _base_folder(root: Path, name: str, base_model: str | None) -> Path:
    """The Qwen2-VL-2B-Instruct folder: the option, the config's path if local, or a sibling/child named like it."""
    short = Path(name).name
    candidates = [Path(base_model)] if base_model else [Path(name), root.parent / short, root / short]
    for folder in candidates:
        if (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file():
            return folder
    _fail(f"base model '{name}' not found (tried {', '.join(map(str, candidates))}); pass base_model=DIR, a local "
          "Qwen2-VL-2B-Instruct folder with config.json and preprocessor_config.json")


def _check_recipe(config: dict, root: Path) -> None:
    """Refuse the VideoAlign variants whose scoring path is not implemented, naming the setting."""
    data, model = config.get("data_config", {}), config.get("model_config", {})
    lora = config.get("peft_lora_config", {})
    unsupported = []
    if data.get("prompt_template_type", "detailed_special") != "detailed_special":
        unsupported.append(f"prompt_template_type={data['prompt_template_type']!r} (only 'detailed_special')")
    if not model.get("use_special_tokens", True) or model.get("reward_token", "special") != "special":
        unsupported.append(f"reward_token={model.get('reward_token')!r} (only the special-token head)")
    if data.get("sample_type", "uniform") != "uniform" or data.get("num_frames") is not None:
        unsupported.append("frame sampling other than uniform at a fixed fps")
    if lora.get("lora_enable") and lora.get("vision_lora"):
        unsupported.append("LoRA on the vision tower")
    if unsupported:
        raise NotImplementedError(f"reward 'videoalign': {root}/model_config.json uses {'; '.join(unsupported)}; "
                                  "only the released VideoReward recipe is implemented (docs/wan.md)")


def _no_init():
    """transformers' context that skips random initialisation (2B parameters on CPU take seconds), if it has one."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def _new_key(key: str) -> str | None:
    """A key of VideoAlign's model.pth -> our Qwen2VLModel's (None: lm_head, unused by the reward)."""
    key = key.removeprefix("base_model.model.")
    for old, new in (("model.visual.", "visual."), ("visual.", "visual."), ("model.language_model.", "language_model."),
                     ("model.", "language_model."), ("rm_head.", "rm_head.")):
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("lm_head."):
        return None
    raise ValueError(f"reward 'videoalign': unexpected tensor {key} in model.pth (not Qwen2-VL + rm_head)")


def load_state(path: Path, lora: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """model.pth -> plain weights in our key layout, with every LoRA pair merged: W + s B A, s = alpha / r (rsLoRA:
    alpha / sqrt(r)), computed in fp32 and rounded once to `dtype`."""
    if not path.is_file():
        _fail(f"{path} does not exist (only full `model.pth` checkpoints are supported, not "
              "adapter_model.safetensors + non_lora_state_dict.pth)")
    raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    rank, alpha = int(lora.get("lora_r", 64)), float(lora.get("lora_alpha", 128))
    scale = alpha / (math.sqrt(rank) if lora.get("use_rslora") else rank)
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if ".lora_" in key:
            if not (".lora_A." in key or ".lora_B." in key):
                raise ValueError(f"reward 'videoalign': unsupported LoRA tensor {key} in {path}")
            continue
        name = _new_key(key.replace(".base_layer.", "."))
        if name is None:
            continue
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            lora_a = raw[f"{stem}.lora_A.default.weight"].float()
            lora_b = raw[f"{stem}.lora_B.default.weight"].float()
            value = (value.float() + scale * (lora_b @ lora_a)).to(dtype)
        out[name] = value
    return out


# ----- the scorer ----------------------------------------------------------------------------------------------------


class VideoAlignScorer:
    """Scores [B, 3, F, H, W] videos in [0, 1] with their prompts: raw or normalised VQ, MQ, TA, combined by weights."""

    def __init__(self, model: nn.Module, head: nn.Linear, processor, token_ids: dict[str, int], config: dict,
                 weights: dict[str, float], normalize: bool, source_fps: float, min_pixels: int, device, dtype,
                 batch_size: int):
        self.name, self.model, self.head, self.processor = "videoalign", model, head, processor
        self.token_ids, self.weights, self.normalize = token_ids, weights, normalize
        self.video_token_id = processor.video_token_id
        data = config.get("data_config", {})
        self.fps, self.max_pixels = float(data.get("fps", 2.0)), int(data.get("max_frame_pixels", 200704))
        self.min_pixels, self.source_fps = min(int(min_pixels), self.max_pixels), float(source_fps)
        self.stats = config.get("inference_config") or NORMALISATION
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.last_scores: dict[str, torch.Tensor] = {}  # per-dimension scores of the last call, for logging
        # transformers 5.2x warns about a per-frame pixel cap of its own resize, which we do not use (do_resize=False).
        preprocess = inspect.signature(processor.video_processor._preprocess).parameters
        self._quiet = {"cap_pixels_per_frame": False} if "cap_pixels_per_frame" in preprocess else {}

    def inputs(self, media: torch.Tensor, prompts: Sequence[str]):
        """The processor's batch (input_ids, attention_mask, pixel_values_videos, video_grid_thw) for a few videos."""
        videos = [prepare_frames(v, self.source_fps, self.fps, self.min_pixels, self.max_pixels) for v in media]
        chats = [[{"role": "user", "content": [
            {"type": "video"}, {"type": "text", "text": DETAILED_SPECIAL_TEMPLATE.replace("{text_prompt}", p)}]}]
            for p in prompts]
        texts = self.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        # Frames are already sampled and resized as VideoAlign does; the processor only rescales, normalises, patches.
        return self.processor(text=texts, videos=videos, padding=True, return_tensors="pt", do_resize=False,
                              do_rescale=True, do_sample_frames=False, **self._quiet)

    @torch.no_grad()
    def raw_scores(self, batch) -> torch.Tensor:
        """[b, 3] raw VQ, MQ, TA of one processor batch (VideoAlign's forward, see the module docstring)."""
        ids = batch["input_ids"].to(self.device)
        embeds = self.model.get_input_embeddings()(ids)
        video = self.model.get_video_features(batch["pixel_values_videos"].to(self.device, self.dtype),
                                              batch["video_grid_thw"].to(self.device)).pooler_output
        slots = (ids == self.video_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, torch.cat(list(video)).to(embeds.dtype))
        positions = torch.arange(ids.shape[1], device=self.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(self.device),
                                           position_ids=positions).last_hidden_state
        per_token = self.head(hidden).float()  # [b, L, output_dim]
        rows = torch.arange(ids.shape[0], device=self.device)
        out = []
        for k, dim in enumerate(DIMENSIONS):
            hits = ids == self.token_ids[dim]
            if not bool((hits.sum(dim=1) == 1).all()):
                raise ValueError(f"reward 'videoalign': {REWARD_TOKENS[k]} must occur once per prompt (a prompt "
                                 "containing reward tokens is not allowed)")
            value = per_token[rows, hits.int().argmax(dim=1)]  # [b, output_dim]
            out.append(value[:, k] if value.shape[1] == 3 else value[:, 0])
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if media.dim() != 5 or media.shape[1] != 3:
            raise ValueError(f"reward 'videoalign': expected videos [B, 3, F, H, W] in [0, 1], "
                             f"got {tuple(media.shape)}")
        if len(prompts) != media.shape[0]:
            raise ValueError(f"reward 'videoalign': {media.shape[0]} videos but {len(prompts)} prompts")
        parts = [self.raw_scores(self.inputs(media[i:i + self.batch_size], list(prompts[i:i + self.batch_size])))
                 for i in range(0, media.shape[0], self.batch_size)]
        scores = torch.cat(parts).cpu()
        if self.normalize:
            mean = torch.tensor([float(self.stats[f"{d}_mean"]) for d in DIMENSIONS])
            std = torch.tensor([float(self.stats[f"{d}_std"]) for d in DIMENSIONS])
            scores = (scores - mean) / std
        self.last_scores = {d: scores[:, k].clone() for k, d in enumerate(DIMENSIONS)}
        return sum(w * self.last_scores[d] for d, w in self.weights.items()).float()


def parse_weights(dimension: str, weights) -> dict[str, float]:
    """`weights` ("VQ=1,MQ=0.5" or a dict) wins over `dimension` (VQ | MQ | TA | Overall = VQ + MQ + TA)."""
    if weights:
        if isinstance(weights, str):
            weights = {k.strip(): float(v) for k, _, v in (item.partition("=") for item in weights.split(",") if item)}
        bad = sorted(set(weights) - set(DIMENSIONS))
        if bad or not weights:
            raise ValueError(f"reward 'videoalign': weights must name {DIMENSIONS}, got {dict(weights)}")
        return {k: float(v) for k, v in weights.items()}
    if dimension == "Overall":
        return {d: 1.0 for d in DIMENSIONS}
    if dimension not in DIMENSIONS:
        raise ValueError(f"reward 'videoalign': dimension must be one of {DIMENSIONS} or 'Overall', got '{dimension}'")
    return {dimension: 1.0}


def _processor(ckpt: Path, base: Path):
    """Qwen2-VL's processor from the base folder with the checkpoint's tokenizer (the reward tokens, right padding)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor, Qwen2VLVideoProcessor

    if (ckpt / "tokenizer").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"), padding_side="right", local_files_only=True)
    else:  # VideoAlign's own recipe: the base tokenizer plus the reward tokens
        tokenizer = AutoTokenizer.from_pretrained(str(base), padding_side="right", local_files_only=True)
        tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    image_processor = AutoImageProcessor.from_pretrained(str(base), local_files_only=True)
    video_processor = Qwen2VLVideoProcessor.from_pretrained(str(base), local_files_only=True)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=tokenizer.chat_template)
    if not processor.chat_template:
        _fail(f"no chat template in {ckpt / 'tokenizer'} or {base}")
    return processor


def _model(ckpt: Path, base: Path, config: dict, vocab: int, dtype: torch.dtype) -> tuple[nn.Module, nn.Linear]:
    """Qwen2VLModel (vision tower + language model, no lm_head) and the reward head, filled from model.pth."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    state = load_state(ckpt / "model.pth", config.get("peft_lora_config", {}), dtype)
    if "rm_head.weight" not in state:
        raise ValueError(f"reward 'videoalign': {ckpt / 'model.pth'} has no rm_head.weight (the reward head)")
    head_weight = state.pop("rm_head.weight")
    model_config = Qwen2VLConfig.from_pretrained(str(base), local_files_only=True)
    model_config.text_config.vocab_size = state["language_model.embed_tokens.weight"].shape[0]
    if model_config.text_config.vocab_size != vocab:
        raise ValueError(f"reward 'videoalign': {ckpt / 'model.pth'} has {model_config.text_config.vocab_size} "
                         f"token embeddings but the tokenizer {vocab} tokens")
    with _no_init():  # every weight is overwritten below
        model = Qwen2VLModel._from_config(model_config, dtype=dtype, attn_implementation="sdpa")
    if not hasattr(model, "language_model"):
        raise RuntimeError("reward 'videoalign': needs a transformers whose Qwen2VLModel holds `visual` and "
                           "`language_model` (tested with 5.x)")
    error = state_dict_mismatch(f"reward 'videoalign': {ckpt / 'model.pth'}", f"the Qwen2-VL of {base}/config.json",
                                shapes_of(state), shapes_of(model.state_dict()), _describe_qwen2vl,
                                "the `base_model` option must name the Qwen2-VL folder VideoAlign was trained from "
                                "(model_config.json's model_name_or_path)")
    if error is not None:
        raise error
    model.load_state_dict(state, strict=True)
    head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False, dtype=dtype)
    head.weight.data.copy_(head_weight)
    return model.eval().requires_grad_(False), head.eval().requires_grad_(False)


def _describe_qwen2vl(shapes) -> str:
    """Depth and width of Qwen2-VL's towers, read from tensor shapes."""
    embed = shapes.get("language_model.embed_tokens.weight")
    patch = shapes.get("visual.patch_embed.proj.weight")
    return (f"language model {count_blocks(shapes, 'language_model.layers.')} layers x width "
            f"{embed[-1] if embed else '?'}, vision tower {count_blocks(shapes, 'visual.blocks.')} blocks x width "
            f"{patch[0] if patch else '?'}")


@register_reward("videoalign")
def build_videoalign(device: torch.device | str = "cpu", model_dir: str = DEFAULT_MODEL_DIR,
                     checkpoint: LocalPath | None = None, base_model: LocalPath | None = None,
                     dimension: str = "MQ", weights=None, normalize: bool = True, source_fps: float = WAN_FPS,
                     min_pixels: int = VIDEO_MIN_PIXELS, step: int | None = None, dtype: str = "auto",
                     batch_size: int = 2) -> VideoAlignScorer:
    """VideoAlign VideoReward. `checkpoint`: the VideoReward folder (model_config.json, checkpoint-<step>/), default
    `model_dir`/VideoReward; `base_model`: the Qwen2-VL-2B-Instruct folder (default: found from model_config.json's
    name, next to or inside `checkpoint`); `dimension`: MQ (the paper's), VQ, TA or Overall; `weights`: e.g.
    "VQ=1,MQ=1" (overrides `dimension`); `normalize`: (raw - mean) / std; `source_fps`: frame rate of the generated
    videos (Wan2.1: 16); `min_pixels`: per-frame minimum area; `step`: which checkpoint-<step> (default: the latest);
    `dtype`: auto (bf16 on CUDA as VideoAlign runs, fp32 on CPU) | fp32 | bf16."""
    weights = parse_weights(dimension, weights)
    if batch_size < 1:
        raise ValueError(f"reward 'videoalign': batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"reward 'videoalign': dtype must be auto, fp32 or bf16, got '{dtype}'")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    root = Path(checkpoint) if checkpoint else Path(model_dir) / CHECKPOINT
    if not (root / "model_config.json").is_file():
        _fail(f"{root}/model_config.json does not exist; `checkpoint` must be the VideoReward folder")
    config = read_json(root / "model_config.json")
    _check_recipe(config, root)
    ckpt = _latest_checkpoint(root, step)
    base = _base_folder(root, config.get("model_config", {}).get("model_name_or_path", "Qwen2-VL-2B-Instruct"),
                        base_model)
    processor = _processor(ckpt, base)
    tokenizer = processor.tokenizer
    token_ids = dict(zip(DIMENSIONS, tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))))
    model, head = _model(ckpt, base, config, len(tokenizer), torch_dtype)
    return VideoAlignScorer(model.to(device), head.to(device), processor, token_ids, config, weights, normalize,
                            source_fps, min_pixels, device, torch_dtype, batch_size)
