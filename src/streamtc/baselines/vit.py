"""Trivial ways to spend less ViT compute on a stream, as baselines for STC-Cacher at matched cost.

- `FrameSkipping(rate)`: encode a fixed share `rate` of the frames fully (evenly spread: frame i is
  encoded while fewer than ceil(rate * (i + 1)) frames have been, so the first always is) and hand
  out the last full output for the frames in between. rate = 1/M is "every M-th frame".
- `UniformTokenDropping(keep_ratio)`: encode every frame, but only an evenly strided subset of its
  patch tokens (class and register tokens are always kept); each dropped token takes the output of
  the nearest kept token in the patch grid, so the result has the full [F, T, C] shape.
- `UniformDownscaling(spend)`: encode every frame whole at a lower resolution (the largest patch grid
  whose encode costs at most `spend` of a full one), its output tokens resized back to the full grid:
  fewer tokens, every part of the picture seen.
- `CodecSkipping(threshold)`: encode only the patches the video decoder saw change (codec hints),
  the others keep their last output: codec-guided skipping before the ViT.

They work on the towers STC-Cacher supports (SigLIP/CLIP/DINOv2 families: `embeddings`, an encoder
with its layers, a final norm) and return the tower's `last_hidden_state`. A cost model in FLOPs
(`flop_ratio`) matches them to a Cacher setting.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..cacher.towers import encoder_layers, mlp_width, prefix_tokens
from ..cacher.functional import layer_flops, nearest_kept, strided_grid_index
from ..checks import unit_ratio
from ..cacher.downscale import Downscale, downscale_cost, downscale_grid, embed_downscaled, supports_downscale
from ..cacher.hints import ChunkHints
from ..errors import ConfigError


class FrameSkipping:
    """Full forward on a share `rate` of the frames, the last full output reused for the others."""

    def __init__(self, rate: float) -> None:
        self.rate = unit_ratio(rate, "rate")
        self.reset()

    def reset(self) -> None:
        self.frames = 0
        self.encoded = 0
        self.last: torch.Tensor | None = None

    def encodes_next(self) -> bool:
        """Whether the next frame is encoded (the first always is)."""
        return self.last is None or self.encoded < math.ceil(self.rate * (self.frames + 1) - 1e-9)

    def __call__(self, tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """One frame [1, 3, H, W] -> its (possibly reused) last_hidden_state [1, T, C]."""
        if self.encodes_next():
            self.last = tower(pixel_values=pixel_values).last_hidden_state
            self.encoded += 1
        self.frames += 1
        return self.last

    def flop_ratio(self) -> float:
        return self.encoded / max(1, self.frames)


def _final_norm(tower: nn.Module) -> nn.Module:
    for name in ("post_layernorm", "layernorm"):
        if isinstance(getattr(tower, name, None), nn.Module):
            return getattr(tower, name)
    return nn.Identity()


class UniformTokenDropping:
    """Every frame encoded on an evenly strided subset of its patch tokens; dropped tokens copy the nearest kept one."""

    def __init__(self, keep_ratio: float) -> None:
        self.keep_ratio = unit_ratio(keep_ratio, "keep_ratio")
        self.reset()

    def reset(self) -> None:
        self.kept_tokens = self.total_tokens = self.width = self.mlp_width = 0

    def __call__(self, tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        x = tower.embeddings(pixel_values)  # [F, T, C]
        frames, num_tokens, _ = x.shape
        prefix = prefix_tokens(tower)
        side = math.isqrt(num_tokens - prefix)
        if side * side != num_tokens - prefix:
            raise ConfigError(f"token dropping needs a square patch grid; got {num_tokens - prefix} patch tokens")
        kept = strided_grid_index(side, self.keep_ratio)
        rows = torch.cat([torch.arange(prefix), kept + prefix]).to(x.device)
        h = x.index_select(1, rows)
        for layer in encoder_layers(tower):
            h = layer(h, None)
        h = _final_norm(tower)(h)
        fill = nearest_kept(side, kept).to(x.device) + prefix  # tiny next to the layers
        self.kept_tokens, self.total_tokens = len(rows), num_tokens
        self.width, self.mlp_width = x.shape[-1], mlp_width(encoder_layers(tower)[0])
        return torch.cat([h[:, :prefix], h.index_select(1, fill)], dim=1)

    def flop_ratio(self) -> float:
        """Cost of the last frame relative to a full one (FLOP model of the encoder layers)."""
        return layer_flops(self.kept_tokens, self.width, self.mlp_width) / layer_flops(self.total_tokens, self.width, self.mlp_width)


class UniformDownscaling:
    """Every frame encoded whole on a smaller patch grid (the frame resized, position embeddings
    interpolated), the output's patch tokens resized back to the full grid (bilinear): the Cacher's
    downscaled encode applied to every frame (`streamtc.cacher.downscale`). SigLIP/CLIP/DINOv2 towers."""

    def __init__(self, spend: float) -> None:
        self.spend = unit_ratio(spend, "spend")
        self.reset()

    def reset(self) -> None:
        self.grid: tuple[int, int] | None = None
        self.ratio = 1.0

    def __call__(self, tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        if not supports_downscale(tower):
            raise ConfigError(f"{type(tower).__name__} cannot embed a smaller input; downscaling needs SigLIP, CLIP or DINOv2")
        patch, prefix = tower.config.patch_size, prefix_tokens(tower)
        full_grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        layers = encoder_layers(tower)
        width, mlp = tower.config.hidden_size, mlp_width(layers[0])
        self.grid = downscale_grid(
            full_grid, lambda small: downscale_cost(small, full_grid, prefix, width, mlp), self.spend)
        h = embed_downscaled(tower, pixel_values, self.grid, patch)
        for layer in layers:
            h = layer(h, None)
        self.ratio = downscale_cost(self.grid, full_grid, prefix, width, mlp)
        return _final_norm(tower)(Downscale(self.grid, full_grid, prefix, h).to_full(h))

    def flop_ratio(self) -> float:
        """Cost of the last frame relative to a full one (FLOP model of the encoder layers)."""
        return self.ratio


class CodecSkipping:
    """Codec-guided patch skipping before the ViT (the idea of CoStream, arXiv 2604.06036, which
    publishes no code): a patch whose decoder-reported change since it was last encoded stays below
    `threshold` is not encoded and keeps its last output; the changed patches, with the class and
    register tokens, go through the exact layers together. The first frame, a cut and a frame
    without codec hints are encoded whole."""

    uses_hints = True

    def __init__(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must lie in [0, 1], got {threshold!r}")
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self.last: torch.Tensor | None = None
        self.change: torch.Tensor | None = None  # [P] change since each patch was last encoded
        self.flops = self.full_flops = 0.0

    def __call__(self, tower: nn.Module, pixel_values: torch.Tensor, hints: ChunkHints | None = None) -> torch.Tensor:
        """One frame [1, 3, H, W] and its hints -> last_hidden_state [1, T, C]."""
        x = tower.embeddings(pixel_values)
        prefix, width = prefix_tokens(tower), x.shape[-1]
        layer = encoder_layers(tower)[0]
        full = layer_flops(x.shape[1], width, mlp_width(layer))
        whole = self.last is None or hints is None or bool(hints.cut.any()) or hints.patches != x.shape[1] - prefix
        if not whole:
            self.change = 1.0 - (1.0 - self.change) * (1.0 - hints.change[0].to(x.device).clamp(0.0, 1.0))
        changed = torch.arange(x.shape[1] - prefix, device=x.device) if whole else (
            (self.change > self.threshold).nonzero().flatten())
        self.full_flops += full
        if not len(changed):  # nothing changed enough: the last output as it is, for free
            return self.last
        rows = torch.cat([torch.arange(prefix, device=x.device), changed + prefix])
        h = x.index_select(1, rows)
        for layer in encoder_layers(tower):
            h = layer(h, None)
        h = _final_norm(tower)(h)
        out = h if whole else self.last.index_copy(1, rows, h)
        self.change = torch.zeros(x.shape[1] - prefix, device=x.device) if whole else self.change.index_fill(0, changed, 0.0)
        self.last = out
        self.flops += layer_flops(len(rows), width, mlp_width(layer))
        return out

    def flop_ratio(self) -> float:
        """Encoder FLOPs spent so far relative to encoding every frame whole."""
        return self.flops / self.full_flops if self.full_flops else 1.0


def keep_ratio_for_flops(target: float, num_tokens: int, prefix: int, width: int, mlp_width: float) -> float:
    """The grid keep ratio whose strided subset costs closest to `target` of a full frame (FLOP model)."""
    side = math.isqrt(num_tokens - prefix)
    full = layer_flops(num_tokens, width, mlp_width)
    best = min(range(1, side + 1), key=lambda s: abs(layer_flops(prefix + s * s, width, mlp_width) / full - target))
    return (best / side) ** 2


__all__ = ["CodecSkipping", "FrameSkipping", "UniformDownscaling", "UniformTokenDropping", "keep_ratio_for_flops"]
