"""`STCCacher`: attach STC-Cacher to a transformers vision tower, reversibly, with per-stream state.

    cacher = STCCacher(CacherConfig(cache_interval=2, update_ratio=0.25)).attach(model)
    out = model(pixel_values=chunk)        # one tower forward = one chunk of one stream's frames
    with cacher.stream(other_state): ...   # serve another stream with the same model
    cacher.reset(); cacher.detach()

Mechanics. `attach` finds the vision tower by class (a registry, not attribute paths: a tower
class names how to find its layers, which module's forward encodes one chunk, and how to read the
chunk's geometry from that forward's arguments), rebinds `forward` on each layer instance (the class
forward is untouched, so `detach` restores the original exactly) and puts hooks on the chunk module
and on the first layer. The chunk module's pre-hook reads the chunk's geometry (reuse units, tokens
per unit, width, grid); the first layer's pre-hook, which sees the embedded hidden states, plans the
chunk once on the host: refresh or selective, how many tokens to recompute, and for the beyond-paper
options the first layer's similarity to the reference or the pixel change (the chunk's pixels are
taken by a pre-hook on the tower). The layers then only execute the plan: no
host syncs, logging or counters inside them. The chunk module's post-hook advances the stream's
chunk counter.

Reuse unit: a frame for SigLIP/CLIP-style towers (their encoder takes [frames, tokens, width]); a
temporal patch (two frames fused by the Conv3d patch embedding, one attention segment) for the
Qwen2-VL, Qwen2.5-VL and Qwen3-VL towers, whose blocks take the flat [units * tokens, width] sequence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

import torch
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
from ..errors import InputError, StreamStateError, UnsupportedModelError
from . import functional as F
from . import kernels, patch_qwen_vl, patch_vit
from .state import CacherState, CacherStats


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


def mlp_width(layer: nn.Module) -> int:
    """The hidden width of a layer's MLP (its first projection's output size), for the FLOP model."""
    return next(m for m in layer.mlp.modules() if isinstance(m, nn.Linear)).out_features


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


_ENCODER_TOWER = TowerSpec(encoder_layers, lambda tower: tower.encoder, _encoder_layout)
_QWEN_TOWER = TowerSpec(lambda tower: tower.blocks, lambda tower: tower, _qwen_layout)

# Vision tower class -> how to find its layers and read a chunk's geometry.
TOWERS: dict[type[nn.Module], TowerSpec] = {
    SiglipVisionModel: _ENCODER_TOWER,
    Siglip2VisionModel: _ENCODER_TOWER,
    CLIPVisionModel: _ENCODER_TOWER,
    Idefics3VisionTransformer: _ENCODER_TOWER,
    Dinov2Model: _ENCODER_TOWER,
    Dinov2WithRegistersModel: _ENCODER_TOWER,
    Qwen2VisionTransformerPretrainedModel: _QWEN_TOWER,
    Qwen2_5_VisionTransformerPretrainedModel: _QWEN_TOWER,
    Qwen3VLVisionModel: _QWEN_TOWER,
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


@dataclass
class ChunkPlan:
    """What every layer does for the chunk being encoded; built once per tower forward."""

    state: CacherState
    layout: ChunkLayout
    refresh: bool
    num_recomputed: int
    adaptive_refresh: bool = False
    shared_index: torch.Tensor | None = None  # [U, k] for selection="shared"
    first_layer_keys: torch.Tensor | None = None  # [U, T, C] when the planner already computed them
    subsample: Subsample | None = None  # over_budget="subsample": encode these tokens exactly, no reference
    group: int = 1  # tokens selected together (granularity="merge_block": a 2x2 merge block)
    recomputed: torch.Tensor | None = None  # [L, U, k] each non-refresh layer's selection, written as it runs


class Subsample(NamedTuple):
    """An over-budget chunk's token subset: every layer runs exactly on `rows` and hands on all
    T tokens, each dropped token carrying the output of the nearest kept one (`fill`)."""

    rows: torch.Tensor  # [T'] token positions encoded
    fill: torch.Tensor  # [T] for each token, its source position within `rows`


class LayerPaths(NamedTuple):
    """The two forwards of a patched layer: exact-with-reference-write, and selective."""

    refresh: Callable[..., torch.Tensor]
    selective: Callable[..., torch.Tensor]


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


def _tower_spec(tower: nn.Module) -> TowerSpec:
    return TOWERS[next(cls for cls in type(tower).__mro__ if cls in TOWERS)]


def check_attachable(model: nn.Module, config: CacherConfig) -> list[nn.Module]:
    """The layers an STCCacher with `config` would patch in the vision tower of `model`; raises
    UnsupportedModelError naming the fix when it cannot attach (unsupported tower or layer,
    accelerate hooks, an option the tower does not support). Tools call it to skip such settings."""
    tower = find_vision_tower(model)
    spec = _tower_spec(tower)
    if config.granularity == "merge_block" and spec is not _QWEN_TOWER:
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


def attached_cacher(model: nn.Module) -> STCCacher | None:
    """The STCCacher currently attached to the vision tower of `model`, if any."""
    return getattr(find_vision_tower(model), "_streamtc_cacher", None)


class STCCacher:
    """STC-Cacher for one model: patches its vision tower and holds the active stream's state."""

    def __init__(self, config: CacherConfig | None = None) -> None:
        self.config = config if config is not None else CacherConfig()
        self._default_state = CacherState()
        self._state = self._default_state
        self._plan: ChunkPlan | None = None
        self._layout: ChunkLayout | None = None  # read by the chunk module's pre-hook, planned at the first layer
        self._tower: nn.Module | None = None
        self._spec: TowerSpec | None = None
        self._layers: list[nn.Module] = []
        self._saved_forwards: list[Any] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._chunk_pixels: torch.Tensor | None = None  # the tower's input of the chunk being encoded
        self._paths: dict[Any, LayerPaths] = {}
        # oneDNN matrix products on CPU (kernels.py); inductor chooses its own when compiling.
        self._onednn = (
            self.config.cpu_kernels == "onednn" and self.config.compile_mode is None and kernels.onednn_available()
        )

    # -- attaching ---------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._tower is not None

    def attach(self, model: nn.Module) -> Self:
        """Patch the vision tower of `model` in place; returns self."""
        if self.attached:
            raise StreamStateError("this STCCacher is already attached to a model; call detach() first")
        tower = find_vision_tower(model)
        if attached_cacher(tower) is not None:
            raise StreamStateError(f"{type(tower).__name__} already has an STCCacher attached; detach that one first")
        spec, layers = _tower_spec(tower), check_attachable(tower, self.config)
        self._tower, self._layers, self._spec = tower, layers, spec
        self._mlp_width = mlp_width(layers[0])
        for index, layer in enumerate(layers):
            patch = LAYER_PATCHES[type(layer)]
            self._saved_forwards.append(layer.__dict__.get("forward"))
            layer.forward = functools.partial(
                self._layer_forward, index, layer, patch, self._paths_for(patch), patch.eager_attention_for(layer)
            )
        chunk_module = spec.chunk_module(tower)
        self._hooks = [
            tower.register_forward_pre_hook(self._take_pixels, with_kwargs=True),
            chunk_module.register_forward_pre_hook(self._begin_chunk, with_kwargs=True),
            layers[0].register_forward_pre_hook(self._plan_chunk, with_kwargs=True),
            chunk_module.register_forward_hook(self._end_chunk, with_kwargs=True),
        ]
        tower._streamtc_cacher = self
        return self

    def _paths_for(self, patch: Any) -> LayerPaths:
        """The patch's refresh and selective forwards, compiled once per cacher when configured.

        Compiled functions take the layer module as an argument; dynamo lifts its parameters as
        graph inputs, so all layers of a tower share one graph per chunk shape.
        """
        if patch not in self._paths:
            paths = LayerPaths(patch.refresh_forward, patch.selective_forward)
            if self.config.compile_mode is not None:
                paths = LayerPaths(*(
                    torch.compile(fn, mode=self.config.compile_mode, dynamic=False, fullgraph=True) for fn in paths
                ))
            self._paths[patch] = paths
        return self._paths[patch]

    def detach(self) -> None:
        """Restore the original forwards exactly; the cacher can then attach to another model."""
        if not self.attached:
            return
        for layer, saved in zip(self._layers, self._saved_forwards):
            if saved is None:
                del layer.forward
            else:
                layer.forward = saved
        for hook in self._hooks:
            hook.remove()
        del self._tower._streamtc_cacher
        self._tower, self._layers, self._saved_forwards, self._hooks = None, [], [], []
        self._plan = self._layout = None

    # -- streams -----------------------------------------------------------------------------

    def new_state(self) -> CacherState:
        """A fresh per-stream state, to be used with `stream(state)`."""
        return CacherState()

    @contextmanager
    def stream(self, state: CacherState) -> Iterator[CacherState]:
        """Make `state` the active stream for tower forwards inside the block."""
        if not isinstance(state, CacherState):
            raise InputError(f"stream() takes a CacherState (from new_state()), got {type(state).__name__}")
        previous, self._state = self._state, state
        try:
            yield state
        finally:
            self._state = previous

    @property
    def state(self) -> CacherState:
        """The active stream's state."""
        return self._state

    def reset(self) -> None:
        """Start a new stream on the active state: drop the reference, counter back to 0."""
        self._state.reset()

    @property
    def stats(self) -> CacherStats:
        """Counters of the active stream: chunks, refresh chunks, tokens recomputed per layer."""
        return self._state.stats

    def last_recomputed(self, state: CacherState | None = None) -> torch.Tensor | None:
        """Which tokens each layer recomputed in the latest chunk of `state` (default: the active
        stream): [L, U, k] token positions per layer and reuse unit, in the order the layers see
        the tokens (Qwen2.5-VL: window order); None when the chunk refreshed (every token, every
        layer) or before the first chunk. See `CacherState.last_recomputed`."""
        return (self._state if state is None else state).last_recomputed

    # -- per chunk (host side) ---------------------------------------------------------------

    def _take_pixels(self, tower: nn.Module, args: tuple, kwargs: dict) -> None:
        """Keep the chunk's pixels for the adaptive "pixels" signal (a reference, no copy)."""
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        self._chunk_pixels = pixels if isinstance(pixels, torch.Tensor) else None

    def _begin_chunk(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Chunk module pre-hook: read the chunk's geometry; the first layer plans it."""
        self._plan, self._layout = None, self._spec.chunk_layout(self._tower, args, kwargs)

    def _plan_chunk(self, first_layer: nn.Module, args: tuple, kwargs: dict) -> None:
        """First layer pre-hook: plan the chunk from its embedded hidden states (once, on the host)."""
        layout, self._layout = self._layout, None
        if layout is None:  # the layer is called outside a tower forward
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]
        state, config = self._state, self.config
        state.check_compatible(hidden_states)
        adaptive = config.refresh == "adaptive"
        if adaptive:
            affordable = config.refresh_budget is None or F.within_refresh_budget(
                state.chunk_index, state.stats.refresh_chunks, config.refresh_budget
            )
            on_schedule = affordable and state.chunk_index - state.last_refresh_chunk >= config.cache_interval
        else:
            affordable, on_schedule = False, state.chunk_index % config.cache_interval == 0
        refresh = (
            not state.has_reference
            or on_schedule
            or state.reference_shape != (len(self._layers), layout.tokens, layout.width)
            or state.grid != layout.grid
        )
        group = self._tower.config.spatial_merge_size ** 2 if config.granularity == "merge_block" else 1
        num_recomputed = F.grouped_count(F.num_recomputed_tokens(layout.tokens, config.update_ratio), group)
        plan = ChunkPlan(state, layout, refresh, num_recomputed, group=group)
        pixels, self._chunk_pixels = self._chunk_pixels, None
        if pixels is not None:  # one row per reuse unit (a frame, or a temporal patch's flattened patches)
            pixels = pixels.reshape(layout.units, -1)
        change = self._pixel_change(pixels, state) if not refresh and adaptive and config.refresh_signal == "pixels" else 0.0
        if change > config.refresh_threshold and affordable:
            plan.refresh = plan.adaptive_refresh = True
        elif change > config.subsample_threshold and config.over_budget == "subsample":
            plan.subsample = self._subsample(hidden_states, args[1:], kwargs)
        if not plan.refresh and (config.selection == "shared" or (affordable and config.refresh_signal == "keys")):
            units = hidden_states.reshape(layout.units, layout.tokens, layout.width)
            self._plan_from_first_layer(plan, units, trigger=affordable and config.refresh_signal == "keys")
        if plan.refresh:
            state.prepare_refresh(len(self._layers), layout.tokens, layout.width, hidden_states, grid=layout.grid)
            state.reference_pixels = None if pixels is None else pixels[-1].detach().clone()
        elif plan.subsample is None:
            plan.recomputed = torch.empty(len(self._layers), layout.units, num_recomputed, dtype=torch.long,
                                          device=hidden_states.device)
        self._plan = plan

    def _subsample(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> Subsample | None:
        """The strided token subset of an over-budget chunk (first layer's inputs), or None where it
        does not apply: towers other than the [frames, tokens, width] encoders, an attention mask
        (padded inputs), no square patch grid."""
        mask = kwargs.get("attention_mask", args[0] if args else None)
        if self._spec is not _ENCODER_TOWER or hidden_states.dim() != 3 or mask is not None:
            return None
        num_tokens, device = hidden_states.shape[1], hidden_states.device
        prefix = prefix_tokens(self._tower)
        side = math.isqrt(num_tokens - prefix)
        if side * side != num_tokens - prefix:
            return None
        kept = F.strided_grid_index(side, self.config.subsample_ratio)
        rows = torch.cat([torch.arange(prefix), kept + prefix])
        fill = torch.cat([torch.arange(prefix), F.nearest_kept(side, kept) + prefix])
        return Subsample(rows.to(device), fill.to(device))

    def _pixel_change(self, pixels: torch.Tensor | None, state: CacherState) -> float:
        """Adaptive "pixels" signal: the largest relative pixel change of the chunk's frames to the reference.

        A chunk whose pixels cannot be compared (the encoder called without its tower, a new frame
        size) counts as infinitely moved. One host sync per chunk, here, outside the layers.
        """
        reference = state.reference_pixels
        if pixels is None or reference is None or pixels.shape[1:] != reference.shape:
            return math.inf
        return float(F.relative_pixel_change(pixels, reference).max())

    def _plan_from_first_layer(self, plan: ChunkPlan, hidden_states: torch.Tensor, trigger: bool) -> None:
        """Beyond-paper options: one look at the first layer's keys decides the chunk.

        trigger (adaptive, within the refresh budget): refresh when, for any frame, the tokens that
        would be reused have a median key cosine to the reference below the threshold (one host
        sync per chunk, here, outside the layers). shared: the first layer's k least similar
        tokens become the index set of every layer.
        """
        first = self._layers[0]
        keys = LAYER_PATCHES[type(first)].layer_keys(first, hidden_states, self._onednn)  # [U, T, C]
        plan.first_layer_keys = keys  # the first layer uses them, refresh or not
        similarity = F.key_similarity(keys, plan.state.layer(0).unit_keys)
        if trigger:
            reused = F.reused_similarity(similarity, plan.num_recomputed)
            if float(reused.min()) < self.config.refresh_threshold:
                plan.refresh, plan.adaptive_refresh = True, True
                return
        if self.config.selection == "shared":
            plan.shared_index = F.select_dynamic_tokens(similarity, plan.num_recomputed, plan.group)

    def _end_chunk(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        plan, self._plan, self._layout = self._plan, None, None
        if plan is None:
            return
        state, stats = plan.state, plan.state.stats
        units, num_tokens, frames, width = plan.layout.units, plan.layout.tokens, plan.layout.frames, plan.layout.width
        full_flops = F.layer_flops(num_tokens, width, self._mlp_width)
        if plan.refresh:
            recomputed, flops = num_tokens, full_flops
        elif plan.subsample is not None:
            recomputed = len(plan.subsample.rows)
            flops = F.layer_flops(recomputed, width, self._mlp_width)
        else:
            recomputed = plan.num_recomputed
            flops = F.layer_flops(num_tokens, width, self._mlp_width, recomputed)
        recomputed *= units
        if len(stats.recomputed_tokens_per_layer) != len(self._layers):
            stats.recomputed_tokens_per_layer = [0] * len(self._layers)
        stats.recomputed_tokens_per_layer = [n + recomputed for n in stats.recomputed_tokens_per_layer]
        stats.total_tokens_per_layer += units * num_tokens
        stats.chunks += 1
        stats.frames += frames
        stats.tokens_per_frame = num_tokens
        stats.refresh_chunks += int(plan.refresh)
        stats.adaptive_refreshes += int(plan.adaptive_refresh)
        stats.subsampled_chunks += int(plan.subsample is not None)
        stats.flops += units * len(self._layers) * flops
        stats.full_flops += units * len(self._layers) * full_flops
        if plan.refresh:
            state.has_reference = True
            state.last_refresh_chunk = state.chunk_index
        state.chunk_index += 1
        if plan.subsample is not None:
            state.last_recomputed = plan.subsample.rows.expand(len(self._layers), units, -1)
        else:
            state.last_recomputed = plan.recomputed  # None after a refresh: every token

    # -- per layer (device side) -------------------------------------------------------------

    def _layer_forward(
        self,
        index: int,
        layer: nn.Module,
        patch: Any,
        paths: LayerPaths,
        eager_fallback: Any,
        hidden_states: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        plan = self._plan
        if plan is None:  # called outside a tower forward: behave exactly like the original layer
            return type(layer).forward(layer, hidden_states, *args, **kwargs)
        if plan.subsample is not None:  # the exact layer on the kept tokens; the reference is not touched
            rows, fill = plan.subsample
            out = type(layer).forward(layer, hidden_states.index_select(1, rows), *args, **kwargs)
            return out.index_select(1, fill)
        reference = plan.state.layer(index)
        hidden_states = hidden_states.contiguous()  # embeddings arrive transposed: one layout, one compiled graph
        inputs = patch.layer_inputs(*args, **kwargs)
        keys = plan.first_layer_keys if index == 0 else None
        try:
            if plan.refresh:
                return paths.refresh(
                    layer, hidden_states, *inputs, reference=reference, eager_fallback=eager_fallback, keys=keys,
                    onednn=self._onednn,
                )
            out, recomputed = paths.selective(
                layer,
                hidden_states,
                *inputs,
                reference=reference,
                num_recomputed=plan.num_recomputed,
                eager_fallback=eager_fallback,
                index=plan.shared_index,
                keys=keys,
                onednn=self._onednn,
                group=plan.group,
            )
            plan.recomputed[index].copy_(recomputed)  # a device copy: no host sync
            return out
        except BaseException:
            # The layer may have left its reference half-written (refresh) or holding the
            # chunk's values (selective, one frame): the stream's next chunk refreshes.
            plan.state.has_reference = False
            raise


__all__ = [
    "STCCacher",
    "ChunkPlan",
    "ChunkLayout",
    "TowerSpec",
    "attached_cacher",
    "check_attachable",
    "find_vision_tower",
    "encoder_layers",
    "mlp_width",
    "prefix_tokens",
    "TOWERS",
    "SUPPORTED_TOWERS",
    "LAYER_PATCHES",
]
