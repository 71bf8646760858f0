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

Qwen-VL frames are resized per frame and cut into temporal patches: `streamtc.hosts.qwen_preprocess`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeAlias

import numpy as np
import torch
from PIL import Image
from transformers.utils import cached_file

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


def processor_setting(source: Any, name: str, default: Any = None) -> Any:
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
            if processor_setting(processor, flag, True) is False:
                raise ConfigError(f"{flag}=False is not supported: video frames are resized, rescaled and normalised")
        if processor_setting(processor, "do_center_crop", False):
            raise ConfigError("do_center_crop=True is not supported: LLaVA-OneVision video frames are not cropped")
        size = processor_setting(processor, "size")
        if size is not None:
            size = (processor_setting(size, "height"), processor_setting(size, "width"))
            if None in size:
                raise ConfigError(f"size must give height and width, got {processor_setting(processor, 'size')!r}")
        defaults = cls()
        return cls(
            size=size or defaults.size,
            image_mean=processor_setting(processor, "image_mean", defaults.image_mean),
            image_std=processor_setting(processor, "image_std", defaults.image_std),
            resample=processor_setting(processor, "resample", defaults.resample),
            rescale_factor=processor_setting(processor, "rescale_factor", defaults.rescale_factor),
        )

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path) -> Self:
        """Read `preprocessor_config.json` from a checkpoint directory or hub id (cache)."""
        return cls.from_processor(processor_config_file(path_or_id, "preprocessor_config.json", required=True))

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


def processor_config_file(path_or_id: str | Path, name: str, required: bool) -> dict[str, Any] | None:
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


__all__ = ["LLAVA_OV_MEAN", "LLAVA_OV_STD", "LLAVA_OV_SIZE", "FrameInput", "FramePreprocessor", "frames_to_uint8",
           "processor_config_file", "processor_setting"]
