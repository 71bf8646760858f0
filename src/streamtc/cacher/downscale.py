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
chunk carries no padding mask: SigLIP, CLIP and DINOv2 (with or without registers), and the Qwen-VL
towers, which take any grid of merge blocks: there the tower's patch rows are put back into frames,
resized and cut into patch rows again, and the tower's own forward on the small grid gives each
block its inputs (embedded tokens, rotary positions, attention segments and Qwen2.5-VL's windows;
`QwenDownscale`). Each layer runs unchanged on the small grid; every layer hands on the output
resized to the full grid (bilinear), so hidden-state capture, DeepStack taps and the patch merger
see full-size states in the tower's token order, while the next layer continues from the small one.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as TF

from .functional import layer_flops, nearest_kept, strided_grid_index

class Subsample(NamedTuple):
    """An over-budget chunk's token subset (the other over-budget encode, `over_budget="subsample"`):
    every layer runs exactly on `rows` and hands on all T tokens, each dropped token carrying the
    output of the nearest kept one (`fill`)."""

    rows: torch.Tensor  # [T'] token positions encoded
    fill: torch.Tensor  # [T] for each token, its source position within `rows`


def strided_subset(num_tokens: int, prefix: int, ratio: float, device: torch.device) -> Subsample | None:
    """An evenly strided subset of about `ratio` of a square patch grid (at least one patch), the
    `prefix` class and register tokens kept; None when the patch tokens do not form a square grid."""
    side = math.isqrt(num_tokens - prefix)
    if side * side != num_tokens - prefix:
        return None
    kept = strided_grid_index(side, min(1.0, max(ratio, 1.0 / (side * side))))
    rows = torch.cat([torch.arange(prefix), kept + prefix])
    fill = torch.cat([torch.arange(prefix), nearest_kept(side, kept) + prefix])
    return Subsample(rows.to(device), fill.to(device))


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

    def layer_arguments(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Layer `index`'s arguments besides its hidden states on the small grid: its own."""
        return args, kwargs

    def to_full(self, hidden: torch.Tensor) -> torch.Tensor:
        """Small-grid tokens [U, prefix + r * c, C] -> [U, prefix + R * C', C]: patch tokens resized
        bilinearly to the full grid, class and register tokens as they are."""
        units, _, width = hidden.shape
        patches = hidden[:, self.prefix:].reshape(units, *self.grid, width).permute(0, 3, 1, 2)
        full = TF.interpolate(patches, size=self.full_grid, mode="bilinear", align_corners=False)
        full = full.permute(0, 2, 3, 1).reshape(units, -1, width)
        return torch.cat([hidden[:, :self.prefix], full], dim=1)


def shrink(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images [N, C, H, W] resized to `size` (bilinear, antialiased), computed in float32: the
    antialiased kernel has no half-precision CPU implementation."""
    small = TF.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return small.to(images.dtype)


def supports_downscale(tower: nn.Module) -> bool:
    """Whether the tower's embeddings take raw pixels of any size (position embeddings interpolated)."""
    embeddings = getattr(tower, "embeddings", None)
    if not isinstance(embeddings, nn.Module):
        return False
    parameters = inspect.signature(embeddings.forward).parameters
    return "pixel_values" in parameters and not {"patch_attention_mask", "spatial_shapes"} & set(parameters)


def downscale_grid(grid: tuple[int, int], cost: Callable[[tuple[int, int]], float], spend: float,
                   multiple: int = 1) -> tuple[int, int]:
    """The largest grid with the frame's aspect (sides multiples of `multiple`) whose encode costs at
    most `spend` of the full one by `cost` (small grid -> share of the full encode), never smaller
    than MIN_SIDE_SHARE of each side."""
    def shape(rows: int) -> tuple[int, int]:
        return rows, max(multiple, multiple * round(grid[1] * rows / grid[0] / multiple))

    smallest = multiple * math.ceil(grid[0] * MIN_SIDE_SHARE / multiple)
    for rows in range(grid[0] - multiple, smallest - 1, -multiple):
        if cost(shape(rows)) <= spend:
            return shape(rows)
    return shape(smallest)


def downscale_cost(small: tuple[int, int], grid: tuple[int, int], prefix: int, width: int, mlp_width: float) -> float:
    """An encode on the `small` patch grid as a share of one on the full `grid` (FLOP model)."""
    return layer_flops(prefix + small[0] * small[1], width, mlp_width) / layer_flops(prefix + grid[0] * grid[1], width, mlp_width)


def embed_downscaled(tower: nn.Module, pixel_values: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """The tower's embeddings of `pixel_values` [U, 3, H, W] resized (bilinear, antialiased) to `grid` patches."""
    size = (grid[0] * patch_size, grid[1] * patch_size)
    small = shrink(pixel_values, size)
    embeddings = tower.embeddings
    if "interpolate_pos_encoding" in inspect.signature(embeddings.forward).parameters:
        return embeddings(small, interpolate_pos_encoding=True)
    return embeddings(small)  # DINOv2 interpolates its position embeddings to any input size


# -- Qwen-VL towers --------------------------------------------------------------------------------


def sequence_cells(grid: tuple[int, int], merge: int, window: int | None = None) -> torch.Tensor:
    """For each position of a Qwen tower's token sequence over an h x w patch grid, its cell r * w + c:
    the merge x merge blocks of patches are contiguous and row-major (the processors' layout), and with
    `window` (Qwen2.5-VL's blocks, in merged tokens) they come window by window, each window's blocks
    row-major, the windows row-major and cut at the grid's bottom and right edges (the tower's order)."""
    rows, cols = grid[0] // merge, grid[1] // merge
    blocks = torch.arange(rows * cols).view(rows, cols)
    if window is not None:
        blocks = torch.cat([blocks[r:r + window, c:c + window].reshape(-1)
                            for r in range(0, rows, window) for c in range(0, cols, window)])
    blocks = blocks.reshape(-1)
    within = torch.arange(merge)
    cell_rows = (blocks // cols)[:, None, None] * merge + within[None, :, None]
    cell_cols = (blocks % cols)[:, None, None] * merge + within[None, None, :]
    return (cell_rows * grid[1] + cell_cols).reshape(-1)


def resize_patch_rows(rows: torch.Tensor, grid: tuple[int, int], small: tuple[int, int], merge: int,
                      patch: int) -> torch.Tensor:
    """A Qwen tower's input patch rows [U * h * w, channels * t * p * p] (the processors' layout) on
    the `small` grid: put back into frames, resized (bilinear, antialiased), cut into rows again."""
    units, depth = rows.shape[0] // (grid[0] * grid[1]), rows.shape[1] // (patch * patch)
    frames = torch.empty_like(rows).view(units, -1, depth, patch, patch)
    frames[:, sequence_cells(grid, merge)] = rows.view(units, -1, depth, patch, patch)
    frames = frames.view(units, *grid, depth, patch, patch).permute(0, 3, 1, 4, 2, 5)
    size = (small[0] * patch, small[1] * patch)
    resized = shrink(frames.reshape(units, depth, grid[0] * patch, grid[1] * patch), size)
    cells = resized.view(units, depth, small[0], patch, small[1], patch).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(units, small[0] * small[1], depth * patch * patch)
    return cells[:, sequence_cells(small, merge)].reshape(-1, depth * patch * patch)


@dataclass
class QwenDownscale:
    """One chunk's downscaled encode on a Qwen-VL tower: the small grid, every block's other arguments
    on it (rotary positions, attention segments; taken from the tower's own forward on the small rows),
    and the small-grid hidden states [U * small tokens, C] between blocks."""

    grid: tuple[int, int]
    full_grid: tuple[int, int]
    merge: int
    window: int | None  # Qwen2.5-VL's window side in merged tokens; None without windows
    hidden: torch.Tensor
    block_inputs: list[tuple[tuple, dict]]
    # Each grid's cell for each sequence position, made once for the chunk's every block.
    small_cells: torch.Tensor = field(init=False)
    full_cells: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        device = self.hidden.device
        self.small_cells = sequence_cells(self.grid, self.merge, self.window).to(device)
        self.full_cells = sequence_cells(self.full_grid, self.merge, self.window).to(device)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def layer_arguments(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Block `index`'s arguments besides its hidden states on the small grid (the full grid's `args`
        and `kwargs` do not apply)."""
        return self.block_inputs[index]

    def to_full(self, hidden: torch.Tensor) -> torch.Tensor:
        """Small-grid tokens in the tower's order -> full-grid tokens in its order (bilinear in the frame)."""
        width = hidden.shape[-1]
        small = hidden.view(-1, self.tokens, width)
        frames = torch.empty_like(small)
        frames[:, self.small_cells] = small
        frames = frames.view(-1, *self.grid, width).permute(0, 3, 1, 2)
        full = TF.interpolate(frames, size=self.full_grid, mode="bilinear", align_corners=False)
        full = full.permute(0, 2, 3, 1).reshape(small.shape[0], -1, width)
        return full[:, self.full_cells].reshape(-1, width)


__all__ = ["Downscale", "MIN_SIDE_SHARE", "QwenDownscale", "Subsample", "downscale_cost", "downscale_grid",
           "embed_downscaled", "resize_patch_rows", "sequence_cells", "strided_subset", "supports_downscale"]
