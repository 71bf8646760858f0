"""What a video decoder says about a chunk's frames, handed to STC-Cacher on the tower's token grid.

A decoded H.264/HEVC stream already knows what changed between frames: motion vectors, intra-coded
(new) blocks, key frames inserted at scene cuts. The runtime reads that side data while decoding
(`streamtc.codec`) and maps it onto the vision tower's patch grid with the same resize as the pixels;
the Cacher receives it per chunk as `ChunkHints` and may use it to refresh at a cut and to choose the
tokens it recomputes. Sources without codec data (pushed images, raw frames, webcams) give no hints,
and the Cacher then falls back to pixel signals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import InputError


@dataclass(frozen=True)
class ChunkHints:
    """Codec side data of one chunk, one row per reuse unit (a frame; a Qwen temporal patch).

    change: [U, P] float in [0, 1]: how much each patch token changed since the previous sampled
        frame (P = the tower's patch tokens in row-major grid order, class and register tokens
        excluded); 0 where the decoder saw no motion and no new content.
    cut: [U] bool: a scene cut happened since the previous sampled frame.
    """

    change: torch.Tensor
    cut: torch.Tensor

    def __post_init__(self) -> None:
        if self.change.dim() != 2:
            raise InputError(f"ChunkHints.change must be [units, patch tokens], got shape {tuple(self.change.shape)}")
        if self.cut.shape != self.change.shape[:1]:
            raise InputError(f"ChunkHints.cut must be [units] = [{self.change.shape[0]}], got shape {tuple(self.cut.shape)}")

    @property
    def units(self) -> int:
        return self.change.shape[0]

    @property
    def patches(self) -> int:
        return self.change.shape[1]

    def check_fits(self, units: int, tokens: int) -> None:
        """Raise unless the hints fit a chunk of `units` reuse units of `tokens` tokens each."""
        if self.units != units or self.patches > tokens:
            raise InputError(
                f"codec hints for {self.units} units of {self.patches} patches do not fit a chunk of "
                f"{units} units of {tokens} tokens"
            )

    @classmethod
    def from_frames(cls, frames: Sequence[FrameHint | None], frames_per_unit: int = 1) -> ChunkHints | None:
        """Hints for a chunk from its frames' `FrameHint`s, `frames_per_unit` frames per reuse unit (a
        Qwen temporal patch: 2), combined as independent changes; None when any frame has none (the
        Cacher then uses pixels for the chunk)."""
        if not frames or any(frame is None for frame in frames) or len(frames) % frames_per_unit:
            return None
        change = torch.stack([frame.change for frame in frames]).float().clamp(0.0, 1.0)
        cut = torch.stack([torch.as_tensor(frame.cut, dtype=torch.bool) for frame in frames])
        units = len(frames) // frames_per_unit
        unchanged = (1.0 - change).reshape(units, frames_per_unit, -1).prod(dim=1)
        return cls(1.0 - unchanged, cut.reshape(units, frames_per_unit).any(dim=1))

    @classmethod
    def from_side_data(cls, units: Sequence[Sequence[Any]], grid: tuple[int, int]) -> ChunkHints | None:
        """Hints for a chunk from each unit's frames' decoder side data (see `FrameHint.from_side_data`);
        None when any frame has none."""
        frames = [None if data is None else FrameHint.from_side_data(data, grid) for unit in units for data in unit]
        return cls.from_frames(frames, len(units[0])) if units and units[0] else None


def token_change(change: torch.Tensor, tokens: int) -> torch.Tensor:
    """[U, P] patch change -> [U, T] token change; the class and register tokens in front count as
    changed (they summarise the whole frame)."""
    prefix = tokens - change.shape[1]
    return torch.cat([change.new_ones(change.shape[0], prefix), change], dim=1)


class FrameHint(NamedTuple):
    """One frame's codec side data on the tower's patch grid: change [P] in [0, 1] (row-major), cut (bool tensor)."""

    change: torch.Tensor
    cut: torch.Tensor

    @classmethod
    def from_side_data(cls, data: Any, grid: tuple[int, int]) -> FrameHint:
        """From a frame's decoder side data (`streamtc.codec.CodecSideData`: `change_map(grid)`, `cut`)
        on a patch grid laid over the whole frame (the frame is resized to the tower's input without
        cropping). A block whose content travelled one patch (along either axis, in that axis's patch
        size) counts as fully changed."""
        change = np.asarray(data.change_map(grid), dtype=np.float32)
        return cls(torch.from_numpy(change.reshape(-1)), torch.tensor(bool(data.cut)))


__all__ = ["ChunkHints", "FrameHint", "token_change"]
