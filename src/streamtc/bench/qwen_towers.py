"""Qwen-VL vision towers for `streamtc bench vit --tower`: real widths, random weights, a depth override.

The vision configs are those of the checkpoint presets (`streamtc.presets`: the `vision_config` of
Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen3-VL-8B-Instruct). Frames become
the towers' input as their image processors lay it out: two consecutive frames per temporal patch,
flattened patches in 2x2 merge-block order, with a `grid_thw` row per temporal patch.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2_5_VLVisionConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from ..cacher.functional import layer_flops
from ..cacher.towers import window_span
from ..checks import positive_int
from ..errors import ConfigError, InputError
from ..hosts.qwen_preprocess import QWEN3_VL_MEAN, QWEN3_VL_STD, QWEN_VL_MEAN, QWEN_VL_STD
from ..presets import build_config

# The checkpoint preset (`streamtc.presets`) whose vision tower each family name runs.
QWEN_TOWERS = {"qwen2-vl": "qwen2-vl-7b", "qwen2.5-vl": "qwen2.5-vl-7b", "qwen3-vl": "qwen3-vl-8b"}


def qwen_vision_config(name: str, depth: int | None = None, attn_implementation: str = "sdpa"):
    """The vision config of the named checkpoint family (the preset's), optionally cut to `depth`
    blocks (the full-attention blocks and DeepStack taps within that depth are kept)."""
    if name not in QWEN_TOWERS:
        raise ConfigError(f"unknown Qwen tower {name!r}; choose one of {', '.join(QWEN_TOWERS)}")
    positive_int(depth, "depth", optional=True)
    config = build_config(QWEN_TOWERS[name], num_layers=depth).vision_config
    config._attn_implementation = attn_implementation
    return config


def build_qwen_tower(name: str, depth: int | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised tower of the named family (eval mode)."""
    config = qwen_vision_config(name, depth)
    tower = {
        "qwen2-vl": Qwen2VisionTransformerPretrainedModel,
        "qwen2.5-vl": Qwen2_5_VisionTransformerPretrainedModel,
        "qwen3-vl": Qwen3VLVisionModel,
    }[name](config)
    return tower.to(dtype).eval()


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the family's image processor."""
    return (QWEN3_VL_MEAN, QWEN3_VL_STD) if name == "qwen3-vl" else (QWEN_VL_MEAN, QWEN_VL_STD)


def temporal_patches(pixel_values: torch.Tensor, config) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Frames [F, 3, H, W] (normalised, F even, H and W multiples of patch x merge) -> one tower input
    [h * w, 3 * 2 * p * p] per temporal patch, and the grid_thw [[1, h, w]] they share."""
    frames, channels, height, width = pixel_values.shape
    p, m, t = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
    if frames % t or height % (p * m) or width % (p * m):
        raise InputError(f"need an even frame count and sides that are multiples of {p * m}, got {tuple(pixel_values.shape)}")
    h, w = height // p, width // p
    x = pixel_values.reshape(frames // t, t, channels, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(frames // t, h * w, channels * t * p * p)
    return list(x), torch.tensor([[1, h, w]])


def _width(config) -> int:
    return config.embed_dim if isinstance(config, Qwen2VLVisionConfig) else config.hidden_size


def fixed_flops(config, tokens: int) -> float:
    """Multiply-accumulates of one temporal patch outside the blocks, which the cacher leaves as they are:
    the Conv3d patch embedding and the 2x2 patch mergers (the final one and any DeepStack taps)."""
    width = _width(config)
    out = config.hidden_size if isinstance(config, Qwen2VLVisionConfig) else config.out_hidden_size
    merged, wide = tokens // config.spatial_merge_size**2, width * config.spatial_merge_size**2
    mergers = 1 + len(getattr(config, "deepstack_visual_indexes", []))
    embed = tokens * config.in_channels * config.temporal_patch_size * config.patch_size**2 * width
    return embed + mergers * merged * wide * (wide + out)


def tower_flops(config, grid: tuple[int, int], recomputed: int | None = None) -> float:
    """The whole tower forward on one temporal patch of an h x w patch grid: blocks (see `block_flops`)
    plus `fixed_flops`."""
    return block_flops(config, grid, recomputed) + fixed_flops(config, grid[0] * grid[1])


def fixed_share(config, grid: tuple[int, int]) -> float:
    """The share of a full forward's FLOPs on one temporal patch of an h x w grid outside the blocks
    (`fixed_flops`): what the cacher leaves as it is."""
    return fixed_flops(config, grid[0] * grid[1]) / tower_flops(config, grid)


def block_flops(config, grid: tuple[int, int], recomputed: int | None = None) -> float:
    """Multiply-accumulates of the tower's blocks on one temporal patch of an h x w patch grid (matrix
    products and attention).

    recomputed=None: every block in full. Otherwise the non-refresh blocks: K on all tokens; Q, V,
    proj, attention rows and MLP on `recomputed` tokens. Windowed blocks (Qwen2.5-VL) attend within
    their windows, cut at the grid's edges (`window_span`); the MLP counts 3 products when gated.
    """
    width, tokens = _width(config), grid[0] * grid[1]
    if isinstance(config, Qwen2VLVisionConfig):
        mlp_width = int(width * config.mlp_ratio)
    elif isinstance(config, Qwen2_5_VLVisionConfig):
        mlp_width = 1.5 * config.intermediate_size  # gate, up and down: three products
    else:
        mlp_width = config.intermediate_size
    full_blocks = set(getattr(config, "fullatt_block_indexes", range(config.depth)))
    window = None
    if isinstance(config, Qwen2_5_VLVisionConfig):
        merge = config.spatial_merge_size
        window = window_span(grid, config.window_size // config.patch_size // merge, merge)
    return sum(layer_flops(tokens, width, mlp_width, recomputed, None if block in full_blocks else window)
               for block in range(config.depth))


__all__ = [
    "QWEN_TOWERS",
    "qwen_vision_config",
    "build_qwen_tower",
    "normalisation",
    "temporal_patches",
    "block_flops",
    "fixed_flops",
    "fixed_share",
    "tower_flops",
]
