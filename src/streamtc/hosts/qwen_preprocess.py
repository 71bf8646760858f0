"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL frames: RGB uint8 frames to the rows their vision tower takes.

Qwen2-VL / Qwen2.5-VL (`QwenVLPreprocessor`): each frame is resized with PIL (bicubic) to
`smart_resize`'s size (both sides multiples of patch_size x merge_size, pixel count within
[min_pixels, max_pixels], aspect ratio kept as closely as possible), rescaled and normalised with
the same table as `streamtc.preprocess.FramePreprocessor`; `patchify_video` then cuts a chunk of frames into temporal patches of
`temporal_patch_size` (2) frames, an odd final frame repeated as the processor pads it, and
flattens every 14x14x2 patch to one row [3 * 2 * 14 * 14] in the merger's block order (each 2x2
block of neighbouring patches is 4 consecutive rows). Per frame this equals transformers'
torchvision-free `Qwen2VLImageProcessorPil` exactly (an image is a temporal patch of two equal
frames); the video processor's patch order is the documented one above (tests check both).

Qwen3-VL uses the same preprocessor with 16-px patches (resize factor 32), normalisation
mean = std = 0.5 and `upscale_small_frames`: transformers' Qwen3-VL video processor first scales a
frame with a side under the factor up to it, and bounds the pixel count of the whole clip
(frames x height x width), which a stream cannot know in advance. A stream bounds each frame
instead, by 128 to 768 merged tokens (`QWEN3_VL_VIDEO_MIN_PIXELS`, `QWEN3_VL_VIDEO_MAX_PIXELS`: the
video processor's default bounds, and its per-frame token ceiling); for one temporal patch that is
exactly transformers' Qwen3-VL `smart_resize` with the bounds doubled (tested).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from PIL import Image

from ..checks import positive_int
from ..errors import ConfigError, InputError
from ..preprocess import FrameInput, FramePreprocessor, frames_to_uint8, processor_config_file, processor_setting

# Qwen2-VL / Qwen2.5-VL processors: CLIP normalisation, 14-px patches, 2x2 merge, temporal patch 2.
QWEN_VL_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_VL_STD = (0.26862954, 0.26130258, 0.27577711)
# Per-frame pixel bounds of transformers' Qwen2-VL video processor (128 and 768 merged tokens).
QWEN_VL_VIDEO_MIN_PIXELS = 128 * 28 * 28
QWEN_VL_VIDEO_MAX_PIXELS = 768 * 28 * 28
# Qwen3-VL processors: mean = std = 0.5, 16-px patches (resize factor 32); per-frame bounds of a
# stream: 128 and 768 merged tokens (see the module docstring).
QWEN3_VL_MEAN = (0.5, 0.5, 0.5)
QWEN3_VL_STD = (0.5, 0.5, 0.5)
QWEN3_VL_VIDEO_MIN_PIXELS = 128 * 32 * 32
QWEN3_VL_VIDEO_MAX_PIXELS = 768 * 32 * 32


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280, upscale_small: bool = False) -> tuple[int, int]:
    """Qwen-VL's target size for a height x width frame: both sides multiples of `factor`, the
    pixel count within [min_pixels, max_pixels], the aspect ratio kept as closely as possible.

    upscale_small: first scale a frame with a side under `factor` up so that side reaches it
    (Qwen3-VL's video processor does; Qwen2-VL's does not)."""
    if upscale_small and (height < factor or width < factor):
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"a frame's aspect ratio must be below 200, got {height}x{width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify_video(frames: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
                   merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """frames [F, C, H, W] (one size) -> (patches [T * gh * gw, C * tps * p * p], (T, gh, gw)).

    Frames are grouped into temporal patches of `temporal_patch_size`, the last frame repeated to
    complete the last one; rows are in block order: temporal patch, then merge block (row-major),
    then the patch within the block (row-major); a row is channel, frame, patch row, patch column.
    """
    count, channels, height, width = frames.shape
    if pad := -count % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    grid_t = frames.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    if grid_h % merge_size or grid_w % merge_size or height % patch_size or width % patch_size:
        raise InputError(f"frames of {height}x{width} do not split into {patch_size}-px patches in "
                         f"{merge_size}x{merge_size} blocks; resize with smart_resize first")
    patches = frames.reshape(grid_t, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                             grid_w // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return rows, (grid_t, grid_h, grid_w)


@dataclass(frozen=True)
class QwenVLPreprocessor:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL frames: smart_resize, rescale, normalise; one [3, H, W]
    tensor per frame.

    min_pixels, max_pixels: bounds of one frame's resized pixel count (video defaults of the
    Qwen2-VL video processor; LiveCC uses max_pixels = 384 * 28 * 28). upscale_small_frames: Qwen3-VL's
    resize rule for frames with a side under the factor. The remaining fields are the processor
    config's. `patchify` turns a chunk of equal-size frames into the tower's input.
    """

    min_pixels: int = QWEN_VL_VIDEO_MIN_PIXELS
    max_pixels: int = QWEN_VL_VIDEO_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: Sequence[float] = QWEN_VL_MEAN
    image_std: Sequence[float] = QWEN_VL_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    upscale_small_frames: bool = False

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            positive_int(getattr(self, name), name)
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if not isinstance(self.upscale_small_frames, bool):
            raise ConfigError(f"upscale_small_frames must be a bool, got {self.upscale_small_frames!r}")
        # one validated normalisation, shared with the square-frame preprocessor
        table = FramePreprocessor(image_mean=self.image_mean, image_std=self.image_std, resample=self.resample,
                                  rescale_factor=self.rescale_factor)
        for name in ("image_mean", "image_std", "resample"):
            object.__setattr__(self, name, getattr(table, name))

    @classmethod
    def from_processor(cls, processor: Any, **overrides: Any) -> Self:
        """Settings of a Qwen-VL image/video processor object or config dict (`min_pixels` /
        `max_pixels`, or `size` with `shortest_edge` / `longest_edge`); `overrides` win."""
        if not isinstance(processor, Mapping) and hasattr(processor, "video_processor"):
            processor = processor.video_processor
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if processor_setting(processor, flag, True) is False:
                raise ConfigError(f"{flag}=False is not supported: video frames are resized, rescaled and normalised")
        size = processor_setting(processor, "size", {})
        settings = {
            "min_pixels": processor_setting(processor, "min_pixels", processor_setting(size, "shortest_edge")),
            "max_pixels": processor_setting(processor, "max_pixels", processor_setting(size, "longest_edge")),
            **{name: processor_setting(processor, name) for name in (
                "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "resample",
                "rescale_factor")},
        }
        settings = {k: v for k, v in settings.items() if v is not None}
        return cls(**{**settings, **overrides})

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, **overrides: Any) -> Self:
        """From a checkpoint: `video_preprocessor_config.json` when present, else
        `preprocessor_config.json` with the video processor's per-frame pixel bounds (an image
        processor's bounds allow far larger frames than the video path uses)."""
        video = processor_config_file(path_or_id, "video_preprocessor_config.json", required=False)
        if video is not None:
            return cls.from_processor(video, **overrides)
        image = processor_config_file(path_or_id, "preprocessor_config.json", required=True)
        image = {k: v for k, v in image.items() if k not in ("min_pixels", "max_pixels", "size")}
        return cls.from_processor(image, **overrides)

    @classmethod
    def from_model_config(cls, config: Any) -> Self:
        """The video defaults with the vision config's patch, temporal patch and merge sizes."""
        vision = getattr(config, "vision_config", config)
        return cls(patch_size=int(vision.patch_size), temporal_patch_size=int(vision.temporal_patch_size),
                   merge_size=int(vision.spatial_merge_size))

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """The resized (height, width) of a height x width frame."""
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels,
                            self.upscale_small_frames)

    def __call__(self, frames: FrameInput) -> list[torch.Tensor]:
        """Preprocess frames (see `FrameInput`) into float32 CPU tensors [3, H, W], one per frame."""
        lut = FramePreprocessor(image_mean=self.image_mean, image_std=self.image_std,
                                rescale_factor=self.rescale_factor).lookup_table()
        out = []
        for image in frames_to_uint8(frames):
            height, width = self.frame_size(*image.shape[:2])
            resized = np.asarray(Image.fromarray(image).resize((width, height), resample=self.resample))
            pixels = np.empty((3, height, width), dtype=np.float32)
            for c in range(3):
                np.take(lut[c], resized[..., c], out=pixels[c])
            out.append(torch.from_numpy(pixels))
        return out

    def patchify(self, frames: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A chunk of equal-size preprocessed frames -> (pixel_values_videos rows, (T, gh, gw))."""
        return patchify_video(torch.stack(list(frames)), self.patch_size, self.temporal_patch_size, self.merge_size)


__all__ = [
    "QWEN3_VL_MEAN", "QWEN3_VL_STD", "QWEN3_VL_VIDEO_MAX_PIXELS", "QWEN3_VL_VIDEO_MIN_PIXELS", "QWEN_VL_MEAN",
    "QWEN_VL_STD", "QWEN_VL_VIDEO_MAX_PIXELS", "QWEN_VL_VIDEO_MIN_PIXELS", "QwenVLPreprocessor", "patchify_video",
    "smart_resize",
]
