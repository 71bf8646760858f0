"""A downscaled encode: the whole frame through the exact layers at a lower resolution, its output
tokens resized back to the tower's grid.

When the reference no longer describes the frame (a cut, fast motion) and the budget cannot pay for
a refresh, the old reference is worth little and the frame has to be encoded afresh on fewer tokens.
Dropping an evenly strided subset of the patches (uniform token dropping) never looks at the dropped
parts of the picture; resizing the frame first keeps all of it at a coarser scale. On real DINOv2-S
weights, at the same FLOPs (docs/benchmarks.md, issue 24), a frame encoded at 12x12 instead of 16x16
patches keeps a patch-token cosine of 0.93 where the strided subset keeps 0.86-0.92, and its worst
frame 0.91 where the subset's falls to 0.77.

Supported where the tower embeds any input size with interpolated position embeddings and the
chunk carries no padding mask: SigLIP, CLIP and DINOv2 (with or without registers). Each layer runs
unchanged on the small grid; every layer hands on the output resized to the full grid (bilinear), so
hidden-state capture sees full-size states, while the next layer continues from the small one.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as TF

from .functional import layer_flops

# The smallest grid side a downscale uses, as a share of the full side: below it the frame is
# better reused against a stale reference than encoded that coarsely.
MIN_SIDE_SHARE = 0.5


@dataclass
class Downscale:
    """One chunk's downscaled encode: the small grid, and the small-grid hidden states between layers."""

    grid: tuple[int, int]  # (rows, cols) of the small patch grid
    full_grid: tuple[int, int]
    prefix: int  # class and register tokens before the patch grid
    hidden: torch.Tensor  # [U, prefix + rows * cols, C]: the embedded small frame, then each layer's output

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    def to_full(self, hidden: torch.Tensor) -> torch.Tensor:
        """Small-grid tokens [U, prefix + r * c, C] -> [U, prefix + R * C', C]: patch tokens resized
        bilinearly to the full grid, class and register tokens as they are."""
        units, _, width = hidden.shape
        patches = hidden[:, self.prefix:].reshape(units, *self.grid, width).permute(0, 3, 1, 2)
        full = TF.interpolate(patches, size=self.full_grid, mode="bilinear", align_corners=False)
        full = full.permute(0, 2, 3, 1).reshape(units, -1, width)
        return torch.cat([hidden[:, :self.prefix], full], dim=1)


def supports_downscale(tower: nn.Module) -> bool:
    """Whether the tower's embeddings take raw pixels of any size (position embeddings interpolated)."""
    embeddings = getattr(tower, "embeddings", None)
    if not isinstance(embeddings, nn.Module):
        return False
    parameters = inspect.signature(embeddings.forward).parameters
    return "pixel_values" in parameters and not {"patch_attention_mask", "spatial_shapes"} & set(parameters)


def downscale_grid(grid: tuple[int, int], prefix: int, width: int, mlp_width: float, spend: float) -> tuple[int, int]:
    """The largest grid with the frame's aspect whose encode costs at most `spend` of the full one
    (FLOP model), never smaller than MIN_SIDE_SHARE of each side."""
    rows, cols = grid
    smallest = max(1, math.ceil(rows * MIN_SIDE_SHARE))
    for small_rows in range(rows - 1, smallest - 1, -1):
        small = (small_rows, max(1, round(cols * small_rows / rows)))
        if downscale_cost(small, grid, prefix, width, mlp_width) <= spend:
            return small
    return smallest, max(1, round(cols * smallest / rows))


def downscale_cost(small: tuple[int, int], grid: tuple[int, int], prefix: int, width: int, mlp_width: float) -> float:
    """An encode on the `small` patch grid as a share of one on the full `grid` (FLOP model)."""
    return layer_flops(prefix + small[0] * small[1], width, mlp_width) / layer_flops(prefix + grid[0] * grid[1], width, mlp_width)


def embed_downscaled(tower: nn.Module, pixel_values: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """The tower's embeddings of `pixel_values` [U, 3, H, W] resized (bilinear, antialiased) to `grid` patches."""
    size = (grid[0] * patch_size, grid[1] * patch_size)
    small = TF.interpolate(pixel_values, size=size, mode="bilinear", antialias=True, align_corners=False)
    embeddings = tower.embeddings
    if "interpolate_pos_encoding" in inspect.signature(embeddings.forward).parameters:
        return embeddings(small, interpolate_pos_encoding=True)
    return embeddings(small)  # DINOv2 interpolates its position embeddings to any input size


def downscale_flops(downscale: Downscale, width: int, mlp_width: float) -> float:
    """One layer's FLOPs on one unit of the small grid."""
    return layer_flops(downscale.tokens, width, mlp_width)


__all__ = ["Downscale", "MIN_SIDE_SHARE", "downscale_cost", "downscale_flops", "downscale_grid", "embed_downscaled", "supports_downscale"]
