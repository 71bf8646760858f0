"""Frames -> `pixel_values`, as LLaVA-OneVision's processor prepares video frames.

transformers' video processors need torchvision, which cannot be installed here, so this module
does the same steps with PIL and torch: convert to RGB, resize each frame to the tower's square
size with PIL (bicubic, as in the checkpoints' preprocessor_config.json), rescale by 1/255 and
normalise with the checkpoint's mean and std. Every step is transformers' own primitive applied in
the same order, so the output equals `transformers.image_transforms` resize -> rescale -> normalize.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PretrainedConfig
from transformers.utils import cached_file

from .errors import InputError

FrameInput = np.ndarray | torch.Tensor | Sequence[Image.Image]

# llava-hf/llava-onevision-* preprocessor_config.json: SigLIP's mean/std of 0.5 (the transformers
# class defaults are OpenAI-CLIP's; only the checkpoint file sets 0.5), bicubic, 1/255.
LLAVA_OV_MEAN = (0.5, 0.5, 0.5)
LLAVA_OV_STD = (0.5, 0.5, 0.5)
PIL_BICUBIC = 3


def frames_to_uint8(frames: FrameInput) -> list[np.ndarray]:
    """Validate frames and return them as a list of HxWx3 uint8 RGB arrays."""
    if isinstance(frames, Image.Image):
        raise InputError("pass a list of PIL images (or an [F, H, W, 3] array), not a single image")
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(f"frames must be uint8 [F, H, W, 3] (RGB), got shape {frames.shape}")
        if frames.dtype != np.uint8:
            raise InputError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
        return list(frames)
    images = list(frames)
    if not images:
        raise InputError("no frames given")
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise InputError(f"frames must be PIL images or a uint8 [F, H, W, 3] array, got {type(image).__name__}")
        out.append(np.asarray(image.convert("RGB")))
    return out


@dataclass(frozen=True)
class FramePreprocessor:
    """Resize, rescale and normalise frames for a square-input vision tower."""

    size: int = 384
    image_mean: tuple[float, float, float] = LLAVA_OV_MEAN
    image_std: tuple[float, float, float] = LLAVA_OV_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC

    @classmethod
    def from_model_config(cls, config: PretrainedConfig) -> FramePreprocessor:
        """Defaults of the LLaVA-OneVision checkpoints at the config's vision tower size."""
        vision = getattr(config, "vision_config", config)
        return cls(size=int(vision.image_size))

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path) -> FramePreprocessor:
        """Read the checkpoint's video (or image) preprocessor_config.json."""
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            resolved = cached_file(str(path_or_id), name, _raise_exceptions_for_missing_entries=False,
                                   _raise_exceptions_for_connection_errors=False)
            if resolved:
                data = json.loads(Path(resolved).read_text())
                size = data.get("size", {})
                side = size.get("height") or size.get("shortest_edge") or 384
                return cls(
                    size=int(side),
                    image_mean=tuple(data.get("image_mean", LLAVA_OV_MEAN)),
                    image_std=tuple(data.get("image_std", LLAVA_OV_STD)),
                    rescale_factor=float(data.get("rescale_factor", 1 / 255)),
                    resample=int(data.get("resample", PIL_BICUBIC)),
                )
        raise InputError(f"{path_or_id}: no preprocessor_config.json found")

    def __call__(self, frames: FrameInput) -> torch.Tensor:
        """uint8 RGB frames -> float32 pixel values [F, 3, size, size]."""
        resized = np.stack([
            np.asarray(Image.fromarray(frame).resize((self.size, self.size), resample=self.resample))
            for frame in frames_to_uint8(frames)
        ])
        pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).to(torch.float32) * self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        return (pixels - mean) / std


__all__ = ["FrameInput", "FramePreprocessor", "frames_to_uint8"]
