"""Frame preprocessing: RGB uint8 frames to the `pixel_values` a VideoLLM's vision tower takes.

transformers' video processors (`LlavaOnevisionVideoProcessor`) need torchvision, which streamtc
must not depend on (docs/design.md, "Dependencies"), so this module does what they do for video frames with PIL and numpy:
resize every frame straight to the model's square input size (no aspect-preserving pad, no any-res
tiling), rescale by `rescale_factor`, normalise with `image_mean` / `image_std`, channels first.

    pre = FramePreprocessor.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    pixel_values = pre(frames)            # uint8 [F, H, W, 3] -> float32 [F, 3, 384, 384]

Exactness: the result is bit-identical (tolerance 0) to transformers' torchvision-free
`LlavaOnevisionImageProcessorPil` (its `resize` -> `rescale` -> `normalize`, i.e. the base view of its
`preprocess`). The resize is the same PIL call on the same uint8 image; rescale + normalise go
through a 256-entry table per channel built with that processor's own float64 -> float32 arithmetic.
The torchvision video processor resizes with torchvision instead, which differs from PIL by
interpolation rounding; that is not imitated here.

Qwen2-VL / Qwen2.5-VL (`QwenVLPreprocessor`): each frame is resized with PIL (bicubic) to
`smart_resize`'s size (both sides multiples of patch_size x merge_size, pixel count within
[min_pixels, max_pixels], aspect ratio kept as closely as possible), rescaled and normalised with
the same table as above; `patchify_video` then cuts a chunk of frames into temporal patches of
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

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeAlias

import numpy as np
import torch
from PIL import Image
from transformers.utils import cached_file

from .checks import positive_int
from .errors import ConfigError, InputError

# Normalisation of the llava-hf LLaVA-OneVision checkpoints (SigLIP): mean = std = 0.5 per channel.
LLAVA_OV_MEAN = (0.5, 0.5, 0.5)
LLAVA_OV_STD = (0.5, 0.5, 0.5)
# Input size of SigLIP-so400m/14 in llava-hf/llava-onevision-qwen2-0.5b-ov-hf.
LLAVA_OV_SIZE = 384

FrameInput: TypeAlias = np.ndarray | torch.Tensor | Sequence[np.ndarray | Image.Image]
"""uint8 RGB frames: an array/tensor [F, H, W, 3], or a sequence of PIL images or [H, W, 3] arrays."""


def frames_to_uint8(frames: FrameInput) -> list[np.ndarray]:
    """Validate frames and return them as a list of RGB uint8 [H, W, 3] arrays (views, not copies,
    of an array input). Frame sizes may differ. Raises `InputError` for anything else."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            hint = " (one frame? add a frame axis: frame[None])" if frames.ndim == 3 else ""
            raise InputError(f"frames must be uint8 [F, H, W, 3], got shape {frames.shape}{hint}")
        frames = list(frames)
    if len(frames) == 0:
        raise InputError("no frames given")
    images = []
    for i, frame in enumerate(frames):
        if isinstance(frame, Image.Image):
            frame = np.asarray(frame.convert("RGB"))
        elif not isinstance(frame, np.ndarray):
            raise InputError(f"frame {i} must be a PIL image or a uint8 [H, W, 3] array, got {type(frame).__name__}")
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise InputError(f"frame {i} must be RGB uint8 [H, W, 3], got dtype {frame.dtype}, shape {frame.shape}")
        images.append(frame)
    return images


def _read(source: Any, name: str, default: Any = None) -> Any:
    """Read `name` from a processor object (attribute) or a config mapping (key)."""
    value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
    return default if value is None else value


@dataclass(frozen=True)
class FramePreprocessor:
    """Resize, rescale and normalise RGB uint8 frames into float32 `pixel_values` [F, 3, H, W].

    size: output side (square) or (height, width); LLaVA-OneVision's SigLIP tower takes 384.
    image_mean, image_std: per-channel normalisation applied after rescaling.
    resample: a PIL resampling filter (`PIL.Image.Resampling`; BICUBIC = 3, as the checkpoints).
    rescale_factor: multiplies the uint8 values before normalisation (1/255).

    Prefer `from_pretrained` / `from_processor` so the numbers come from the checkpoint.
    """

    size: int | tuple[int, int] = LLAVA_OV_SIZE
    image_mean: Sequence[float] = LLAVA_OV_MEAN
    image_std: Sequence[float] = LLAVA_OV_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ConfigError(f"size must be a positive int or (height, width) pair of ints, got {self.size!r}")
        object.__setattr__(self, "size", size)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            value = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
            if len(value) != 3:
                raise ConfigError(f"{name} must have 3 values (one per RGB channel), got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if 0.0 in self.image_std:
            raise ConfigError(f"image_std must be non-zero, got {self.image_std!r}")
        try:
            object.__setattr__(self, "resample", Image.Resampling(int(self.resample)))
        except ValueError as error:
            raise ConfigError(f"resample must be a PIL resampling filter (0-5), got {self.resample!r}") from error
        if not self.rescale_factor > 0:
            raise ConfigError(f"rescale_factor must be > 0, got {self.rescale_factor!r}")

    @classmethod
    def from_processor(cls, processor: Any) -> Self:
        """Settings of an image processor (or a processor holding one as `.image_processor`) or of a
        `preprocessor_config.json` dict; fields it lacks keep this class's defaults.

        Settings the video path cannot reproduce (resize, rescale or normalise off, centre crop, a
        size that is not height x width) raise `ConfigError` instead of being ignored.
        """
        if not isinstance(processor, Mapping) and hasattr(processor, "image_processor"):
            processor = processor.image_processor
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if _read(processor, flag, True) is False:
                raise ConfigError(f"{flag}=False is not supported: video frames are resized, rescaled and normalised")
        if _read(processor, "do_center_crop", False):
            raise ConfigError("do_center_crop=True is not supported: LLaVA-OneVision video frames are not cropped")
        size = _read(processor, "size")
        if size is not None:
            size = (_read(size, "height"), _read(size, "width"))
            if None in size:
                raise ConfigError(f"size must give height and width, got {_read(processor, 'size')!r}")
        defaults = cls()
        return cls(
            size=size or defaults.size,
            image_mean=_read(processor, "image_mean", defaults.image_mean),
            image_std=_read(processor, "image_std", defaults.image_std),
            resample=_read(processor, "resample", defaults.resample),
            rescale_factor=_read(processor, "rescale_factor", defaults.rescale_factor),
        )

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path) -> Self:
        """Read `preprocessor_config.json` from a checkpoint directory or hub id (cache)."""
        return cls.from_processor(_config_file(path_or_id, "preprocessor_config.json", required=True))

    @classmethod
    def from_model_config(cls, config: Any) -> Self:
        """Defaults of the llava-hf checkpoints at the vision tower's input size
        (`config.vision_config.image_size`); for models built without processor files."""
        vision = getattr(config, "vision_config", config)
        return cls(size=int(vision.image_size))

    def lookup_table(self) -> np.ndarray:
        """The [3, 256] float32 table mapping each uint8 value of each channel to its output.

        Same operations, order and dtypes as transformers' `rescale` (float64 multiply, cast to
        float32) and `normalize` (float32 subtract, float32 divide): hence bit-identical results.
        """
        rescaled = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        return (rescaled[None, :] - mean) / std

    def __call__(self, frames: FrameInput) -> torch.Tensor:
        """Preprocess frames (see `FrameInput`) into float32 CPU `pixel_values` [F, 3, H, W]."""
        images = frames_to_uint8(frames)
        height, width = self.size
        lut = self.lookup_table()
        out = np.empty((len(images), 3, height, width), dtype=np.float32)
        for i, image in enumerate(images):
            resized = np.asarray(Image.fromarray(image).resize((width, height), resample=self.resample))  # [H, W, 3]
            for c in range(3):
                np.take(lut[c], resized[..., c], out=out[i, c])
        return torch.from_numpy(out)


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
            if _read(processor, flag, True) is False:
                raise ConfigError(f"{flag}=False is not supported: video frames are resized, rescaled and normalised")
        size = _read(processor, "size", {})
        settings = {
            "min_pixels": _read(processor, "min_pixels", _read(size, "shortest_edge")),
            "max_pixels": _read(processor, "max_pixels", _read(size, "longest_edge")),
            **{name: _read(processor, name) for name in (
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
        video = _config_file(path_or_id, "video_preprocessor_config.json", required=False)
        if video is not None:
            return cls.from_processor(video, **overrides)
        image = _config_file(path_or_id, "preprocessor_config.json", required=True)
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


def _config_file(path_or_id: str | Path, name: str, required: bool) -> dict[str, Any] | None:
    """A processor JSON file of a checkpoint directory or hub id; ConfigError naming it if required."""
    try:  # None: a directory without the file; OSError: no such directory, or a hub id not reachable
        path = cached_file(str(path_or_id), name, _raise_exceptions_for_missing_entries=False)
    except OSError as error:
        raise ConfigError(f"{path_or_id}: cannot read {name} ({error})") from error
    if path is None:
        if required:
            raise ConfigError(f"{path_or_id}: no {name} (frame size and normalisation); save the processor "
                              "with the weights")
        return None
    return json.loads(Path(path).read_text())


__all__ = [
    "LLAVA_OV_MEAN", "LLAVA_OV_STD", "LLAVA_OV_SIZE", "QWEN3_VL_MEAN", "QWEN3_VL_STD", "QWEN3_VL_VIDEO_MAX_PIXELS",
    "QWEN3_VL_VIDEO_MIN_PIXELS", "QWEN_VL_MEAN", "QWEN_VL_STD", "QWEN_VL_VIDEO_MIN_PIXELS",
    "QWEN_VL_VIDEO_MAX_PIXELS", "FrameInput", "FramePreprocessor", "QwenVLPreprocessor", "frames_to_uint8",
    "patchify_video", "smart_resize",
]
