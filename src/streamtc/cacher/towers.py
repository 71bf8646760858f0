"""The vision towers STC-Cacher supports, found by class: where their layers are, which module's one
forward encodes one chunk, and how to read a chunk's geometry from that forward's arguments.

A registry, not attribute paths: `TOWERS` maps a tower class to its `TowerSpec`, `LAYER_PATCHES` a
layer class to the module that runs its refresh and selective forwards. `check_attachable` says why
a model cannot take a Cacher, naming the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionModel
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer, Dinov2Model
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)
from transformers.models.idefics3.modeling_idefics3 import Idefics3EncoderLayer, Idefics3VisionTransformer
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionBlock,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel, Qwen2VLVisionBlock
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionBlock, Qwen3VLVisionModel
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionModel
from transformers.models.siglip2.modeling_siglip2 import Siglip2EncoderLayer, Siglip2VisionModel

from ..config import CacherConfig
from ..errors import InputError, UnsupportedModelError
from . import patch_qwen_vl, patch_vit


class ChunkLayout(NamedTuple):
    """Geometry of one tower forward (one chunk): `units` reuse units of `tokens` tokens, `width` wide.

    frames: video frames the chunk covers (units x frames per unit).
    grid: the units' spatial token grid where the token count alone does not fix every token's
        position (Qwen towers: 16x32 and 32x16 have the same count); a new grid forces a refresh.
    """

    units: int
    tokens: int
    width: int
    frames: int
    grid: tuple[int, ...] | None = None


class TowerSpec(NamedTuple):
    """How the cacher finds its way around one vision tower class."""

    layers: Callable[[nn.Module], nn.ModuleList]  # the tower's layers (blocks), in order
    chunk_module: Callable[[nn.Module], nn.Module]  # the module whose one forward encodes one chunk
    chunk_layout: Callable[[nn.Module, tuple, dict], ChunkLayout]  # (tower, its args, kwargs) -> geometry


def mlp_width(layer: nn.Module) -> float:
    """The MLP's multiply-accumulates per token over 2 x its input width, for the FLOP model: the hidden
    width of a two-layer MLP, 1.5 x it for a gated one (gate, up and down: Qwen2.5-VL)."""
    linears = [m for m in layer.mlp.modules() if isinstance(m, nn.Linear)]
    return sum(m.in_features * m.out_features for m in linears) / (2 * linears[0].in_features)


@functools.lru_cache(maxsize=64)
def window_span(grid: tuple[int, int], window: int, merge: int) -> float:
    """The keys a query attends to on average in Qwen2.5-VL's windowed attention over an h x w patch
    grid: windows of `window` x `window` merged tokens (each `merge` x `merge` patches) tile the grid
    from its top-left corner, cut at the bottom and right edges, so the mean is the sum of the windows'
    squared token counts over the tokens."""
    def squares(merged: int) -> int:
        return sum(min(window, merged - start) ** 2 for start in range(0, merged, window))

    height, width = grid
    return squares(height // merge) * squares(width // merge) * merge**4 / (height * width)


def window_side(tower: nn.Module) -> int | None:
    """The side of Qwen2.5-VL's attention windows in merged tokens (4 at the checkpoints' 112 pixels);
    None for towers without windows."""
    if not isinstance(tower, Qwen2_5_VisionTransformerPretrainedModel):
        return None
    config = tower.config
    return config.window_size // config.patch_size // config.spatial_merge_size


def block_input_sources(tower: nn.Module, num_layers: int) -> list[int]:
    """For each block of a Qwen-VL tower, the first block given the same inputs besides its hidden
    states: every block gets the same rotary positions and attention segments, except that
    Qwen2.5-VL's windowed blocks get the windows as segments (its `fullatt_block_indexes` the whole
    temporal patch)."""
    full = set(tower.config.fullatt_block_indexes) if window_side(tower) is not None else set()
    kinds = [index in full for index in range(num_layers)]
    return [kinds.index(kind) for kind in kinds]


def attention_spans(tower: nn.Module, num_layers: int, layout: ChunkLayout) -> tuple[float | None, ...]:
    """Per layer, the keys a query attends to on average for the FLOP model: None (all of a unit's
    tokens), or in Qwen2.5-VL's windowed blocks (all but `fullatt_block_indexes`) `window_span`."""
    window = window_side(tower)
    if window is None:
        return (None,) * num_layers
    config = tower.config
    span, full = window_span(layout.grid, window, config.spatial_merge_size), set(config.fullatt_block_indexes)
    return tuple(None if index in full else span for index in range(num_layers))


def encoder_layers(tower: nn.Module) -> list[nn.Module]:
    """The encoder layers of a supported tower, in order."""
    encoder = tower.encoder
    return list(encoder.layers if hasattr(encoder, "layers") else encoder.layer)


def prefix_tokens(tower: nn.Module) -> int:
    """Class and register tokens before the patch grid (0 for SigLIP, 1 for CLIP and DINOv2, more with registers)."""
    embeddings = tower.embeddings
    registers = getattr(embeddings, "register_tokens", None)
    has_class = getattr(embeddings, "cls_token", None) is not None or hasattr(embeddings, "class_embedding")
    return int(has_class) + (0 if registers is None else registers.shape[1])


def _encoder_layout(tower: nn.Module, args: tuple, kwargs: dict) -> ChunkLayout:
    """SigLIP/CLIP-style encoders: inputs_embeds [frames, tokens, width], one frame per unit."""
    hidden_states = kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0]
    if hidden_states.dim() != 3:
        raise InputError(f"the encoder expects hidden states [frames, tokens, width], got shape {tuple(hidden_states.shape)}")
    frames, tokens, width = hidden_states.shape
    return ChunkLayout(frames, tokens, width, frames)


def _qwen_layout(tower: nn.Module, args: tuple, kwargs: dict) -> ChunkLayout:
    """Qwen-VL towers: forward(pixel patches, grid_thw); one temporal patch (t = 1 of the grid) per unit.

    The chunk's grid rows must share one (h, w): a stream's chunk is one stream's frames.
    """
    grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
    grids = {(int(h), int(w)) for _, h, w in grid_thw.tolist()}
    if len(grids) != 1:
        raise InputError(
            f"a cached chunk must hold frames of one size, got token grids {sorted(grids)}; encode one video "
            "(frames resized alike) per tower forward"
        )
    (grid,) = grids
    units = int(grid_thw[:, 0].sum())
    frames = units * tower.config.temporal_patch_size
    return ChunkLayout(units, grid[0] * grid[1], tower.patch_embed.proj.out_channels, frames, grid)


ENCODER_TOWER = TowerSpec(encoder_layers, lambda tower: tower.encoder, _encoder_layout)
QWEN_TOWER = TowerSpec(lambda tower: tower.blocks, lambda tower: tower, _qwen_layout)

# Vision tower class -> how to find its layers and read a chunk's geometry.
TOWERS: dict[type[nn.Module], TowerSpec] = {
    SiglipVisionModel: ENCODER_TOWER,
    Siglip2VisionModel: ENCODER_TOWER,
    CLIPVisionModel: ENCODER_TOWER,
    Idefics3VisionTransformer: ENCODER_TOWER,
    Dinov2Model: ENCODER_TOWER,
    Dinov2WithRegistersModel: ENCODER_TOWER,
    Qwen2VisionTransformerPretrainedModel: QWEN_TOWER,
    Qwen2_5_VisionTransformerPretrainedModel: QWEN_TOWER,
    Qwen3VLVisionModel: QWEN_TOWER,
}
SUPPORTED_TOWERS: tuple[type[nn.Module], ...] = tuple(TOWERS)

# Layer class -> the module implementing its refresh and selective forwards. A patch module
# provides eager_attention_for(layer), layer_inputs(*args, **kwargs) (the layer's inputs after the
# hidden states, in the order its forwards take them), layer_keys(layer, hidden_states, onednn),
# refresh_forward, selective_forward, and COMPILABLE.
LAYER_PATCHES: dict[type[nn.Module], Any] = {
    SiglipEncoderLayer: patch_vit,
    Siglip2EncoderLayer: patch_vit,
    CLIPEncoderLayer: patch_vit,
    Idefics3EncoderLayer: patch_vit,
    Qwen2VLVisionBlock: patch_qwen_vl,
    Qwen2_5_VLVisionBlock: patch_qwen_vl,
    Qwen3VLVisionBlock: patch_qwen_vl,
    Dinov2Layer: patch_vit,
    Dinov2WithRegistersLayer: patch_vit,
}


def find_vision_tower(model: nn.Module) -> nn.Module:
    """The single supported vision tower inside `model` (or `model` itself)."""
    towers = [m for m in model.modules() if isinstance(m, SUPPORTED_TOWERS)]
    if not towers:
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_TOWERS)
        raise UnsupportedModelError(
            f"no supported vision tower found in {type(model).__name__}; STC-Cacher supports {supported} "
            "and models that contain one (e.g. LlavaOnevisionForConditionalGeneration, Idefics3/SmolVLM, "
            "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)"
        )
    if len(towers) > 1:
        names = ", ".join(type(t).__name__ for t in towers)
        raise UnsupportedModelError(f"{type(model).__name__} has several vision towers ({names}); attach to one of them")
    return towers[0]


def tower_spec(tower: nn.Module) -> TowerSpec:
    return TOWERS[next(cls for cls in type(tower).__mro__ if cls in TOWERS)]


def check_attachable(model: nn.Module, config: CacherConfig) -> list[nn.Module]:
    """The layers an STCCacher with `config` would patch in the vision tower of `model`; raises
    UnsupportedModelError naming the fix when it cannot attach (unsupported tower or layer,
    accelerate hooks, an option the tower does not support). Tools call it to skip such settings."""
    tower = find_vision_tower(model)
    spec = tower_spec(tower)
    if config.granularity == "merge_block" and spec is not QWEN_TOWER:
        raise UnsupportedModelError(
            f"granularity='merge_block' selects the 2x2 merge blocks of Qwen-VL towers; {type(tower).__name__} has "
            "none: use CacherConfig(granularity='token')"
        )
    layers = list(spec.layers(tower))
    for layer in layers:
        if type(layer) not in LAYER_PATCHES:
            supported = ", ".join(cls.__name__ for cls in LAYER_PATCHES)
            raise UnsupportedModelError(f"encoder layer {type(layer).__name__} is not supported; supported: {supported}")
        if hasattr(layer, "_hf_hook"):
            raise UnsupportedModelError(
                "the vision tower is dispatched with accelerate hooks (device_map); load it on one device to use STC-Cacher"
            )
        if config.compile_mode is not None and not LAYER_PATCHES[type(layer)].COMPILABLE:
            raise UnsupportedModelError(
                f"compile_mode is not supported for {type(layer).__name__} yet; use CacherConfig(compile_mode=None)"
            )
    return layers


__all__ = [
    "ChunkLayout", "ENCODER_TOWER", "LAYER_PATCHES", "QWEN_TOWER", "SUPPORTED_TOWERS", "TOWERS", "TowerSpec",
    "attention_spans", "block_input_sources", "check_attachable", "encoder_layers", "find_vision_tower", "mlp_width", "prefix_tokens",
    "tower_spec", "window_side", "window_span",
]
