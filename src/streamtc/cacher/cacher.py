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
taken by a pre-hook on the tower). The layers then only execute the plan: no host syncs, logging or
counters inside them. The chunk module's post-hook advances the stream's chunk counter; where a reuse
failed its check (`reuse_check`), the tower's post-hook runs the tower again and returns that output.

Reuse unit: a frame for SigLIP/CLIP-style towers (their encoder takes [frames, tokens, width]); a
temporal patch (two frames fused by the Conv3d patch embedding, one attention segment) for the
Qwen2-VL, Qwen2.5-VL and Qwen3-VL towers, whose blocks take the flat [units * tokens, width] sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

import torch
from torch import nn

from ..config import CacherConfig
from ..errors import InputError, StreamStateError
from . import budget, downscale, kernels
from . import functional as F
from .downscale import Downscale, QwenDownscale, Subsample
from .hints import ChunkHints, token_change
from .state import CacherState, CacherStats
from .towers import (
    ENCODER_TOWER,
    LAYER_PATCHES,
    ChunkLayout,
    TowerSpec,
    attention_spans,
    block_input_sources,
    check_attachable,
    find_vision_tower,
    mlp_width,
    prefix_tokens,
    tower_spec,
    window_side,
)


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
    downscale: Downscale | QwenDownscale | None = None  # over_budget="downscale": the frame on a smaller grid
    group: int = 1  # tokens selected together (granularity="merge_block": a 2x2 merge block)
    recomputed: torch.Tensor | None = None  # [L, U, k] each non-refresh layer's selection, written as it runs
    drift: torch.Tensor | None = None  # [L, U] the reuse check: each reused layer's attention drift, written as it runs
    signals: budget.BudgetSignals | None = None  # refresh="budget": what the chunk was planned on


class _BlockInputsTaken(Exception):
    """Ends a tower forward run only to read its blocks' inputs (`STCCacher._small_grid_inputs`)."""


class LayerPaths(NamedTuple):
    """The two forwards of a patched layer: exact-with-reference-write, and selective."""

    refresh: Callable[..., torch.Tensor]
    selective: Callable[..., torch.Tensor]


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
        self._downscale_pixels: torch.Tensor | None = None  # the same, while the chunk is planned
        self._paths: dict[Any, LayerPaths] = {}
        # While a Qwen downscale reads the small grid's block inputs from the tower's own forward
        # (`_small_grid_inputs`): the hooks stand aside and the first blocks' inputs are kept here.
        self._block_inputs: list[tuple[torch.Tensor, tuple, dict]] | None = None
        self._block_inputs_wanted = 0
        # The reuse check: the chunk whose reuse failed it (until the tower's forward ends: a reuse needs the
        # tower's pixels, so it only happens inside one), and that chunk while the tower encodes it again.
        self._rejected: ChunkPlan | None = None
        self._retrying: ChunkPlan | None = None
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
        spec, layers = tower_spec(tower), check_attachable(tower, self.config)
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
            tower.register_forward_hook(self._end_tower, with_kwargs=True),
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
                compile_fn = functools.partial(torch.compile, mode=self.config.compile_mode, dynamic=False, fullgraph=True)
                paths = LayerPaths(*map(compile_fn, paths))
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

    def hint(self, hints: ChunkHints | None) -> None:
        """Codec hints for the active stream's next chunk (refresh="budget" uses them; other settings
        ignore them). They are consumed by that chunk; a chunk without hints falls back to pixels."""
        if hints is not None and not isinstance(hints, ChunkHints):
            raise InputError(f"hint() takes ChunkHints or None, got {type(hints).__name__}")
        self._state.next_hints = hints

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
        if self._block_inputs is not None:
            return
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        self._chunk_pixels = pixels if isinstance(pixels, torch.Tensor) else None
        self._rejected = None  # a forward that raised may have left one

    def _end_tower(self, tower: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Tower post-hook: a chunk whose reuse failed its check is encoded again by the whole tower (its
        own forward, so every output it returns, hidden states included, comes from that encode), planned
        as stale; that output replaces this one."""
        rejected, self._rejected = self._rejected, None
        if rejected is None:
            return None
        self._retrying = rejected
        try:
            return tower(*args, **kwargs)
        finally:
            self._retrying = None

    def _begin_chunk(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Chunk module pre-hook: read the chunk's geometry; the first layer plans it."""
        if self._block_inputs is not None:
            return
        self._plan, self._layout = None, self._spec.chunk_layout(self._tower, args, kwargs)

    def _plan_chunk(self, first_layer: nn.Module, args: tuple, kwargs: dict) -> None:
        """First layer pre-hook: plan the chunk from its embedded hidden states (once, on the host)."""
        if self._block_inputs is not None:
            return
        layout, self._layout = self._layout, None
        if layout is None:  # the layer is called outside a tower forward
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]
        state, config = self._state, self.config
        state.check_compatible(hidden_states)
        needs_reference = (
            not state.has_reference
            or state.reference_shape != (len(self._layers), layout.tokens, layout.width)
            or state.grid != layout.grid
        )
        group = self._tower.config.spatial_merge_size ** 2 if config.granularity == "merge_block" else 1
        num_recomputed = F.grouped_count(F.num_recomputed_tokens(layout.tokens, config.update_ratio), group)
        plan = ChunkPlan(state, layout, needs_reference, num_recomputed, group=group)
        self._downscale_pixels, self._chunk_pixels = self._chunk_pixels, None
        pixels = self._downscale_pixels
        if pixels is not None:  # one row per reuse unit (a frame, or a temporal patch's flattened patches)
            pixels = pixels.reshape(layout.units, -1)
        hints, state.next_hints = state.next_hints, None
        if hints is not None:
            hints.check_fits(layout.units, layout.tokens)
            state.stats.hinted_chunks += 1
        if config.refresh == "budget":
            self._plan_budget(plan, hidden_states, pixels, hints, args[1:], kwargs)
        else:
            self._plan_schedule(plan, hidden_states, pixels, args[1:], kwargs)
        checked = config.reuse_check is not None and self._spec is ENCODER_TOWER
        if plan.refresh:
            state.prepare_refresh(len(self._layers), layout.tokens, layout.width, hidden_states, grid=layout.grid,
                                  probe=checked)
            state.reference_pixels = None if pixels is None else pixels[-1].detach().clone()
        elif plan.subsample is None and plan.downscale is None:
            plan.recomputed = torch.empty(len(self._layers), layout.units, plan.num_recomputed, dtype=torch.long,
                                          device=hidden_states.device)
            if checked and state.probe_queries is not None and self._retrying is None:
                plan.drift = hidden_states.new_zeros(len(self._layers), layout.units, dtype=torch.float32)
        self._downscale_pixels = None
        self._plan = plan

    def _plan_schedule(self, plan: ChunkPlan, hidden_states: torch.Tensor, pixels: torch.Tensor | None,
                       args: tuple, kwargs: dict) -> None:
        """refresh="fixed" and "adaptive": the paper's schedule and its pixel/key triggers."""
        state, config, layout = plan.state, self.config, plan.layout
        if config.refresh == "adaptive":
            affordable = config.refresh_budget is None or F.within_refresh_budget(
                state.chunk_index, state.stats.refresh_chunks, config.refresh_budget
            )
            on_schedule = affordable and state.chunk_index - state.last_refresh_chunk >= config.cache_interval
        else:
            affordable, on_schedule = False, state.chunk_index % config.cache_interval == 0
        plan.refresh = plan.refresh or on_schedule
        adaptive = config.refresh == "adaptive"
        change = (F.largest_pixel_change(pixels, state.reference_pixels)
                  if not plan.refresh and adaptive and config.refresh_signal == "pixels" else 0.0)
        if change > config.refresh_threshold and affordable:
            plan.refresh = plan.adaptive_refresh = True
        elif change > config.subsample_threshold and config.over_budget == "subsample":
            plan.subsample = self._subsample(hidden_states, args, kwargs)
        if not plan.refresh and (config.selection == "shared" or (affordable and config.refresh_signal == "keys")):
            units = hidden_states.reshape(layout.units, layout.tokens, layout.width)
            self._plan_from_first_layer(plan, units, trigger=affordable and config.refresh_signal == "keys")

    def _plan_budget(self, plan: ChunkPlan, hidden_states: torch.Tensor, pixels: torch.Tensor | None,
                     hints: ChunkHints | None, args: tuple, kwargs: dict) -> None:
        """refresh="budget": spend the stream's FLOP budget on this chunk (see `budget`)."""
        state, config, layout = plan.state, self.config, plan.layout
        full = self._unit_flops(layout)
        target = config.flop_budget or F.schedule_ratio(
            full, self._unit_flops(layout, F.num_recomputed_tokens(layout.tokens, config.update_ratio)),
            config.cache_interval)
        if self._retrying is None:
            change = state.accumulate_change(hints, plan.refresh)
            signals = self._budget_signals(plan, pixels, hints, change)
            state.previous_cut = signals.cut
            state.previous_pixels = None if pixels is None else pixels[-1].detach().clone()
        else:  # encoded again after its reuse failed the check: stale, on the signals it was planned on
            change, signals = None, self._retrying.signals._replace(stale=True)
        plan.signals = signals
        chunk_full = layout.units * full
        decision = budget.decide(
            signals, budget.credit(target, state.stats.flops, state.stats.full_flops, chunk_full), target)
        if plan.refresh or decision.action == "refresh":
            plan.adaptive_refresh = not plan.refresh
            plan.refresh = True
            state.change_since_reference = None if hints is None else torch.zeros_like(hints.change)
            return
        if decision.action == "downscale":  # what the tower allows of over_budget, else reuse below
            if config.over_budget == "downscale":
                plan.downscale = self._downscale(hidden_states, layout, args, kwargs, decision.spend)
            if plan.downscale is None and config.over_budget != "reuse":
                plan.subsample = self._subsample(hidden_states, args, kwargs, decision.spend)
            if plan.downscale is not None or plan.subsample is not None:
                return
        plan.num_recomputed = F.grouped_count(
            F.num_recomputed_tokens(layout.tokens, config.update_ratio), plan.group)
        if change is not None and config.token_signal != "keys" and self._spec is ENCODER_TOWER:
            units = hidden_states.reshape(layout.units, layout.tokens, layout.width)
            self._select_by_change(plan, units, token_change(change, layout.tokens))
        elif config.selection == "shared":
            self._plan_from_first_layer(plan, hidden_states.reshape(layout.units, layout.tokens, layout.width),
                                        trigger=False)

    def _budget_signals(self, plan: ChunkPlan, pixels: torch.Tensor | None, hints: ChunkHints | None,
                        change: torch.Tensor | None) -> budget.BudgetSignals:
        """Stale and cut, from codec hints where the chunk has them, else from pixel change."""
        state, config = plan.state, self.config
        if hints is not None:
            cut = bool(hints.cut.any())
        else:  # the stream's first frame cuts from nothing
            cut = state.previous_pixels is not None and (
                F.largest_pixel_change(pixels, state.previous_pixels) > config.cut_threshold)
        if plan.refresh or (hints is not None and cut):
            stale = True
        else:
            moved = F.largest_pixel_change(pixels, state.reference_pixels)
            changed = None if change is None else float(change.mean(dim=1).max())
            stale = budget.is_stale(moved, changed, config.stale_threshold, config.stale_share)
        age = state.chunk_index - state.last_refresh_chunk if state.has_reference else 0
        return budget.BudgetSignals(stale, cut, state.previous_cut, age, not plan.refresh)

    def _select_by_change(self, plan: ChunkPlan, hidden_states: torch.Tensor, token_change: torch.Tensor) -> None:
        """token_signal "codec" / "codec+keys": one index set for every layer, the tokens that changed
        most since the reference (by the first layer's key cosine, lowered by twice the change)."""
        if self.config.token_signal == "codec":
            plan.shared_index = F.select_dynamic_tokens(-token_change, plan.num_recomputed, plan.group)
            return
        first = self._layers[0]
        keys = LAYER_PATCHES[type(first)].layer_keys(first, hidden_states, self._onednn)
        plan.first_layer_keys = keys
        similarity = F.key_similarity(keys, plan.state.layer(0).unit_keys) - 2.0 * token_change
        plan.shared_index = F.select_dynamic_tokens(similarity, plan.num_recomputed, plan.group)

    def _downscale(self, hidden_states: torch.Tensor, layout: ChunkLayout, args: tuple, kwargs: dict, spend: float
                   ) -> Downscale | QwenDownscale | None:
        """The chunk's downscaled encode within `spend` of its full cost, or None where it does not
        apply (see `downscale.supports_downscale`; also padded inputs, non-square prefixes)."""
        pixels = self._downscale_pixels
        if self._spec is not ENCODER_TOWER:
            return None if pixels is None else self._qwen_downscale(pixels, layout, spend)
        mask = kwargs.get("attention_mask", args[0] if args else None)
        if mask is not None or pixels is None or not downscale.supports_downscale(self._tower):
            return None
        prefix = prefix_tokens(self._tower)
        patch = self._tower.config.patch_size
        full_grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        if full_grid[0] * full_grid[1] + prefix != hidden_states.shape[1]:
            return None
        grid = downscale.downscale_grid(full_grid, self._downscale_cost(layout, prefix), spend)
        embedded = downscale.embed_downscaled(self._tower, pixels, grid, patch)
        return Downscale(grid, full_grid, prefix, embedded.to(hidden_states.dtype))

    def _downscale_cost(self, layout: ChunkLayout, prefix: int) -> Callable[[tuple[int, int]], float]:
        """A small grid's encode as a share of the full one, by the FLOP model."""
        full = self._unit_flops(layout)
        return lambda small: self._unit_flops(layout._replace(tokens=prefix + small[0] * small[1], grid=small)) / full

    def _qwen_downscale(self, pixels: torch.Tensor, layout: ChunkLayout, spend: float) -> QwenDownscale:
        """A Qwen tower's chunk on a smaller grid of merge blocks: its patch rows resized, and every
        block's inputs on that grid from the tower's own forward (`_small_grid_inputs`)."""
        config = self._tower.config
        merge = config.spatial_merge_size
        grid = downscale.downscale_grid(layout.grid, self._downscale_cost(layout, 0), spend, multiple=merge)
        rows = downscale.resize_patch_rows(pixels, layout.grid, grid, merge, config.patch_size)
        sources = block_input_sources(self._tower, len(self._layers))
        taken = self._small_grid_inputs(rows, torch.tensor([[layout.units, *grid]], device=rows.device),
                                        max(sources) + 1)
        return QwenDownscale(grid, layout.grid, merge, window_side(self._tower), taken[0][0],
                             [taken[source][1:] for source in sources])

    def _small_grid_inputs(self, rows: torch.Tensor, grid_thw: torch.Tensor, count: int
                           ) -> list[tuple[torch.Tensor, tuple, dict]]:
        """(hidden states, args, kwargs) the first `count` blocks receive in the tower's forward on
        `rows`: the embedding, rotary positions, attention segments and windows exactly as the tower
        makes them. The blocks do not run, and the forward stops once the last of them has its inputs
        (before any DeepStack merger or the patch merger)."""
        self._block_inputs, self._block_inputs_wanted = [], count
        try:
            self._tower(rows, grid_thw=grid_thw)
        except _BlockInputsTaken:
            pass
        finally:
            taken, self._block_inputs = self._block_inputs, None
        return taken

    def _subsample(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict,
                   ratio: float | None = None) -> Subsample | None:
        """The strided token subset of an over-budget chunk, or None where it does not apply: towers
        other than the [frames, tokens, width] encoders, an attention mask (padded inputs), no square
        patch grid. ratio: the share of the grid kept (default subsample_ratio; refresh="budget"
        passes what the budget pays for)."""
        mask = kwargs.get("attention_mask", args[0] if args else None)
        if self._spec is not ENCODER_TOWER or hidden_states.dim() != 3 or mask is not None:
            return None
        ratio = self.config.subsample_ratio if ratio is None else ratio
        return downscale.strided_subset(hidden_states.shape[1], prefix_tokens(self._tower), ratio, hidden_states.device)

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

    def _unit_flops(self, layout: ChunkLayout, recomputed: int | None = None) -> float:
        """The FLOP model of one unit through every layer: in full (recomputed=None) or non-refresh."""
        spans = attention_spans(self._tower, len(self._layers), layout)
        return F.stack_flops(layout.tokens, layout.width, self._mlp_width, spans, recomputed)

    def _end_chunk(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Chunk module post-hook: count the pass and the chunk; a reuse that failed its check is counted
        as a pass only, and left to the tower's post-hook to encode again."""
        if self._block_inputs is not None:
            return
        plan, self._plan, self._layout = self._plan, None, None
        if plan is None:
            return
        state, stats, layout = plan.state, plan.state.stats, plan.layout
        full_flops = self._unit_flops(layout)
        recomputed, flops = self._pass_cost(plan, full_flops)
        stats.count_pass(len(self._layers), layout.units, recomputed, flops)
        if plan.drift is not None and float(plan.drift.mean(dim=0).max()) > self.config.reuse_check:
            stats.failed_reuses += 1
            self._rejected = plan  # the tower's post-hook encodes it again
            return
        stats.count_chunk(layout.units, layout.frames, layout.tokens, full_flops, refresh=plan.refresh,
                          adaptive=plan.adaptive_refresh, subsampled=plan.subsample is not None,
                          downscaled=plan.downscale is not None)
        if plan.refresh:
            state.has_reference = True
            state.last_refresh_chunk = state.chunk_index
        state.chunk_index += 1
        if plan.subsample is not None:
            state.last_recomputed = plan.subsample.rows.expand(len(self._layers), layout.units, -1)
        elif plan.downscale is not None:
            state.last_recomputed = None  # every token, encoded afresh at a lower resolution
        else:
            state.last_recomputed = plan.recomputed  # None after a refresh: every token

    def _pass_cost(self, plan: ChunkPlan, full_flops: float) -> tuple[int, float]:
        """Tokens recomputed per layer and FLOPs (the FLOP model) of one pass over a unit of the chunk."""
        layout, width = plan.layout, plan.layout.width
        if plan.refresh:
            return layout.tokens, full_flops
        if plan.subsample is not None:
            recomputed = len(plan.subsample.rows)
            return recomputed, len(self._layers) * F.layer_flops(recomputed, width, self._mlp_width)
        if plan.downscale is not None:
            recomputed = plan.downscale.tokens
            return recomputed, self._unit_flops(layout._replace(tokens=recomputed, grid=plan.downscale.grid))
        flops = self._unit_flops(layout, plan.num_recomputed)
        if plan.drift is not None:  # the reuse check (encoder towers: every layer attends over all tokens)
            flops += len(self._layers) * F.probe_flops(len(plan.state.probe_index), width, layout.tokens)
        return plan.num_recomputed, flops

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
        if self._block_inputs is not None:  # reading a small grid's block inputs: keep them, run nothing
            self._block_inputs.append((hidden_states, args, kwargs))
            if len(self._block_inputs) == self._block_inputs_wanted:
                raise _BlockInputsTaken
            return hidden_states
        plan = self._plan
        if plan is None:  # called outside a tower forward: behave exactly like the original layer
            return type(layer).forward(layer, hidden_states, *args, **kwargs)
        if plan.subsample is not None:  # the exact layer on the kept tokens; the reference is not touched
            rows, fill = plan.subsample
            out = type(layer).forward(layer, hidden_states.index_select(1, rows), *args, **kwargs)
            return out.index_select(1, fill)
        if plan.downscale is not None:  # the exact layer on the small grid, handed on at full size
            small = plan.downscale
            small_args, small_kwargs = small.layer_arguments(index, args, kwargs)
            small.hidden = patch.refresh_forward(layer, small.hidden, *patch.layer_inputs(*small_args, **small_kwargs),
                                                 reference=None, eager_fallback=eager_fallback, onednn=self._onednn)
            return small.to_full(small.hidden)
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
                **({} if plan.drift is None else {"drift": plan.drift[index]}),
            )
            plan.recomputed[index].copy_(recomputed)  # a device copy: no host sync
            return out
        except BaseException:
            # The layer may have left its reference half-written (refresh) or holding the
            # chunk's values (selective, one frame): the stream's next chunk refreshes.
            plan.state.has_reference = False
            raise


__all__ = ["STCCacher", "ChunkPlan", "Subsample", "attached_cacher"]
