"""Where a frame's prunable tokens sit in a model's visual sequence, and where the kept ones go.

A layout turns the visual sequence a host model builds ([N, D], N = all frames plus any special
tokens) into per-frame features [F, P, D] for a pruner, and turns the pruner's kept indices
[F, k] back into ascending positions in that sequence, always-kept tokens (newlines) included:

    features = layout.frame_tokens(sequence)          # [F, P, D]
    kept = pruner.prune(features)
    pruned = sequence[layout.kept_positions(kept.indices, kept.lengths)]

Layouts:
    FlatLayout                 F * P tokens, frame after frame (generic).
    LlavaOnevisionVideoLayout  F * P tokens then one newline token (HF LLaVA-OneVision video:
                               27x27 SigLIP grid pooled to 14x14 = 196 per frame).
    LlavaVideoLayout           per frame an H x W grid with a newline token after every row
                               (LLaVA-Video: 13 x 13 + 13 newlines = 182 per frame); newlines are
                               always kept.
    QwenVLLayout               Qwen2/2.5-VL merged tokens, one "frame" per temporal patch (2 video
                               frames); kept tokens keep their original 3-D M-RoPE (t, h, w)
                               positions, given by `mrope_positions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..checks import positive_int
from ..errors import ConfigError, InputError


def _valid_mask(indices: Tensor, lengths: Tensor | None, tokens_per_frame: int) -> Tensor:
    """[F, k] mask of real kept indices; InputError if indices are not [F, k] within [0, P)."""
    if not isinstance(indices, Tensor) or indices.dim() != 2:
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise InputError(f"kept indices must be a [frames, k] tensor, got {shape}")
    mask = torch.ones_like(indices, dtype=torch.bool)
    if lengths is not None:
        mask = torch.arange(indices.shape[1], device=indices.device)[None, :] < lengths[:, None]
    real = indices[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= tokens_per_frame):
        raise InputError(
            f"kept indices must lie in [0, {tokens_per_frame}) for this layout, "
            f"got values in [{int(real.min())}, {int(real.max())}]"
        )
    return mask


def _flat_positions(local: Tensor, mask: Tensor, frame_stride: int) -> Tensor:
    """Positions f * frame_stride + local[f, i] of the real kept tokens, frame by frame."""
    offsets = torch.arange(local.shape[0], device=local.device)[:, None] * frame_stride
    return (local + offsets)[mask]


def _frames_of(sequence: Tensor, layout: str, special: int, block: int, description: str) -> int:
    """Number of frames in a sequence of F * block + special tokens; InputError if it does not fit."""
    if not isinstance(sequence, Tensor) or sequence.dim() != 2:
        shape = tuple(sequence.shape) if isinstance(sequence, Tensor) else type(sequence).__name__
        raise InputError(f"{layout}: the visual sequence must be a [N, D] tensor, got {shape}")
    n = sequence.shape[0] - special
    if n < block or n % block:
        raise InputError(
            f"{layout}: a sequence of {sequence.shape[0]} tokens does not match the layout "
            f"({description}); check tokens per frame and the number of frames"
        )
    return n // block


@dataclass(frozen=True)
class FlatLayout:
    """F frames of tokens_per_frame tokens each, back to back, nothing else."""

    tokens_per_frame: int

    def __post_init__(self) -> None:
        positive_int(self.tokens_per_frame, "tokens_per_frame")


    def frame_tokens(self, sequence: Tensor) -> Tensor:
        """[F * P, D] -> [F, P, D]."""
        p = self.tokens_per_frame
        frames = _frames_of(sequence, "FlatLayout", 0, p, f"F * {p}")
        return sequence.view(frames, p, -1)

    def kept_positions(self, indices: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Ascending positions of the kept tokens in the flat sequence."""
        return _flat_positions(indices, _valid_mask(indices, lengths, self.tokens_per_frame), self.tokens_per_frame)


@dataclass(frozen=True)
class LlavaOnevisionVideoLayout:
    """HF LLaVA-OneVision video: F * tokens_per_frame pooled tokens, then one image_newline token.

    `LlavaOnevisionModel.get_video_features(...).pooler_output[b]` is this sequence. The newline
    is always kept and stays last.
    """

    tokens_per_frame: int = 196

    def __post_init__(self) -> None:
        positive_int(self.tokens_per_frame, "tokens_per_frame")

    @classmethod
    def for_config(cls, config: Any) -> LlavaOnevisionVideoLayout:
        """The layout of a LlavaOnevisionConfig: `apply_pooling` halves the ViT grid, rounding up."""
        return cls(tokens_per_frame=cls.pooled_side(config) ** 2)

    @staticmethod
    def pooled_side(config: Any) -> int:
        """Side of the pooled grid of a LlavaOnevisionConfig (14 for SigLIP-so400m at 384 px)."""
        vision = config.vision_config
        return math.ceil(vision.image_size // vision.patch_size / 2)

    def frame_tokens(self, sequence: Tensor) -> Tensor:
        """[F * P + 1, D] -> [F, P, D] (the trailing newline is not prunable)."""
        p = self.tokens_per_frame
        frames = _frames_of(sequence, "LlavaOnevisionVideoLayout", 1, p, f"F * {p} + 1 newline")
        return sequence[:-1].view(frames, p, -1)

    def kept_positions(self, indices: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Kept token positions, then the newline at F * P."""
        mask = _valid_mask(indices, lengths, self.tokens_per_frame)
        positions = _flat_positions(indices, mask, self.tokens_per_frame)
        newline = torch.tensor([indices.shape[0] * self.tokens_per_frame], device=indices.device)
        return torch.cat([positions, newline])


@dataclass(frozen=True)
class LlavaVideoLayout:
    """LLaVA-Video: per frame `height` rows of `width` tokens, each row followed by a newline token.

    Prunable tokens are numbered row-major over the height x width grid (P = height * width);
    the height newlines of every frame are always kept.
    """

    height: int = 13
    width: int = 13

    def __post_init__(self) -> None:
        positive_int(self.height, "height")
        positive_int(self.width, "width")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def frame_stride(self) -> int:
        return self.height * (self.width + 1)

    def frame_tokens(self, sequence: Tensor) -> Tensor:
        """[F * H * (W + 1), D] -> [F, H * W, D], newlines dropped."""
        frames = _frames_of(sequence, "LlavaVideoLayout", 0, self.frame_stride,
                            f"F * {self.height} * ({self.width} + 1 newline)")
        grid = sequence.view(frames, self.height, self.width + 1, -1)[:, :, : self.width]
        return grid.reshape(frames, self.tokens_per_frame, -1)

    def kept_positions(self, indices: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Ascending positions of the kept tokens and of every row's newline."""
        mask = _valid_mask(indices, lengths, self.tokens_per_frame)
        # Row r, column c of the grid sits at r * (W + 1) + c: each earlier row adds its newline.
        local = torch.div(indices, self.width, rounding_mode="floor") * (self.width + 1) + indices % self.width
        kept = _flat_positions(local, mask, self.frame_stride)
        rows = torch.arange(self.height, device=indices.device) * (self.width + 1) + self.width
        newlines = (torch.arange(indices.shape[0], device=indices.device)[:, None] * self.frame_stride + rows).flatten()
        return torch.cat([kept, newlines]).sort().values


@dataclass(frozen=True)
class QwenVLLayout:
    """Qwen2-VL / Qwen2.5-VL video tokens after the 2x2 patch merger.

    grid_thw is the video's `video_grid_thw` row (temporal patches, height and width in ViT
    patches). The LLM sees T = grid_t blocks of (grid_h / m) * (grid_w / m) merged tokens
    (m = spatial_merge_size), row-major, no separators; the pruner treats each temporal patch as
    one frame.
    """

    grid_thw: tuple[int, int, int]
    spatial_merge_size: int = 2

    def __post_init__(self) -> None:
        if len(self.grid_thw) != 3:
            raise ConfigError(f"grid_thw must be (t, h, w), got {self.grid_thw!r}")
        for name, value in zip(("grid_t", "grid_h", "grid_w"), self.grid_thw):
            positive_int(value, name)
        positive_int(self.spatial_merge_size, "spatial_merge_size")
        _, h, w = self.grid_thw
        if h % self.spatial_merge_size or w % self.spatial_merge_size:
            raise ConfigError(f"grid {h}x{w} is not divisible by spatial_merge_size {self.spatial_merge_size}")

    @property
    def merged_hw(self) -> tuple[int, int]:
        return self.grid_thw[1] // self.spatial_merge_size, self.grid_thw[2] // self.spatial_merge_size

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.merged_hw
        return h * w

    def frame_tokens(self, sequence: Tensor) -> Tensor:
        """[T * h * w, D] -> [T, h * w, D]."""
        p, t = self.tokens_per_frame, self.grid_thw[0]
        frames = _frames_of(sequence, "QwenVLLayout", 0, p, f"{t} temporal patches * {p} merged tokens")
        if frames != t:
            raise InputError(f"QwenVLLayout: the sequence holds {frames} temporal patches but grid_thw says {t}")
        return sequence.view(t, p, -1)

    def kept_positions(self, indices: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Ascending positions of the kept merged tokens in the video's token block."""
        mask = _valid_mask(indices, lengths, self.tokens_per_frame)
        if indices.shape[0] != self.grid_thw[0]:
            raise InputError(
                f"QwenVLLayout: indices cover {indices.shape[0]} temporal patches, grid_thw says {self.grid_thw[0]}"
            )
        return _flat_positions(indices, mask, self.tokens_per_frame)

    def mrope_positions(
        self,
        indices: Tensor,
        lengths: Tensor | None = None,
        start_position: int = 0,
        time_interval: float | Tensor = 1.0,
        first_patch: int = 0,
    ) -> Tensor:
        """[3, M] (t, h, w) M-RoPE positions of the kept tokens, in `kept_positions` order.

        Same values the model gives these tokens in the unpruned sequence
        (`get_vision_position_ids` in transformers 5.x): t = start + floor(t_patch * time_interval),
        h = start + row, w = start + column. time_interval is 1 for Qwen2-VL and
        tokens_per_second * second_per_grid_t for Qwen2.5-VL. first_patch: index of this grid's
        first temporal patch in its video (a stream appends a video's patches chunk by chunk).
        """
        positions = self.kept_positions(indices, lengths)
        p = self.tokens_per_frame
        w = self.merged_hw[1]
        t_patch = torch.div(positions, p, rounding_mode="floor") + first_patch
        within = positions % p
        temporal = (t_patch * time_interval).long() + start_position
        return torch.stack([temporal, within // w + start_position, within % w + start_position])


TokenLayout = FlatLayout | LlavaOnevisionVideoLayout | LlavaVideoLayout | QwenVLLayout

__all__ = ["FlatLayout", "LlavaOnevisionVideoLayout", "LlavaVideoLayout", "QwenVLLayout", "TokenLayout"]
