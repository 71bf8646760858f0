"""Per-stream STC-Cacher state: the reference frame's per-layer tensors, the chunk counter, counters.

One `CacherState` belongs to one stream. It is created by `STCCacher.new_state()` (or the cacher's
own default state), made active with `with cacher.stream(state): ...`, and never shared: two
streams never read each other's reference. `reset()` returns it to the start of a stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch

from ..errors import StreamStateError
from .functional import probe_positions
from .hints import ChunkHints


class LayerReference(NamedTuple):
    """Views of one layer's slices of the reference buffers, each [T, C] (the probe's [P, C]).

    They alias the state's buffers: refresh chunks write into them in place. The probe (a reuse check
    is configured) is a strided subset of token positions whose queries and attention outputs the
    reference keeps, so that a reused chunk can measure how far its reused tokens' attention drifted.
    """

    unit_keys: torch.Tensor  # K_ref / ||K_ref||, for the key cosine
    values: torch.Tensor  # V_ref, post-projection, before the head split
    residual_delta: torch.Tensor  # A_ref + M_ref: attention-block output (after out_proj) plus MLP output
    probe_index: torch.Tensor | None = None  # [P] token positions of the probe
    probe_queries: torch.Tensor | None = None  # [P, C] Q_ref of the probe tokens
    probe_attention: torch.Tensor | None = None  # [P, C] A_ref of the probe tokens (after out_proj and layer scale)


@dataclass
class CacherStats:
    """Counters of one stream, updated once per chunk on the host (never inside a layer)."""

    chunks: int = 0
    frames: int = 0
    refresh_chunks: int = 0  # also what an adaptive refresh_budget has spent
    adaptive_refreshes: int = 0
    subsampled_chunks: int = 0  # over-budget chunks encoded on a strided token subset
    downscaled_chunks: int = 0  # over-budget chunks encoded whole at a lower resolution (refresh="budget")
    failed_reuses: int = 0  # reused chunks whose attention drift failed the reuse check and were encoded again
    hinted_chunks: int = 0  # chunks that came with codec hints
    flops: float = 0.0  # multiply-accumulates of the encoder layers (FLOP model), per the chunks run
    full_flops: float = 0.0  # what the same chunks cost without the cacher
    tokens_per_frame: int = 0
    recomputed_tokens_per_layer: list[int] = field(default_factory=list)
    total_tokens_per_layer: int = 0

    @property
    def recomputed_share(self) -> float:
        """Share of token-layer computations actually performed (1.0 without caching)."""
        if not self.total_tokens_per_layer or not self.recomputed_tokens_per_layer:
            return 1.0
        done = sum(self.recomputed_tokens_per_layer) / len(self.recomputed_tokens_per_layer)
        return done / self.total_tokens_per_layer

    @property
    def flop_ratio(self) -> float:
        """Encoder FLOPs spent relative to the unpatched tower on the same chunks (1.0 before any)."""
        return self.flops / self.full_flops if self.full_flops else 1.0

    def count_pass(self, layers: int, units: int, recomputed: int, flops: float) -> None:
        """Count one encoder pass over a chunk: `recomputed` tokens per unit in every layer, `flops` per unit.
        A pass the reuse check rejected is counted here only (its chunk is counted once, by `count_chunk`)."""
        if len(self.recomputed_tokens_per_layer) != layers:
            self.recomputed_tokens_per_layer = [0] * layers
        self.recomputed_tokens_per_layer = [n + units * recomputed for n in self.recomputed_tokens_per_layer]
        self.flops += units * flops

    def count_chunk(self, units: int, frames: int, tokens: int, full_flops: float, *, refresh: bool,
                    adaptive: bool, subsampled: bool, downscaled: bool) -> None:
        """Count a chunk once, with what the unpatched tower would have spent on it (`full_flops` per
        unit) and how it was encoded (a refresh, adaptive or not; a strided subset; a downscale)."""
        self.total_tokens_per_layer += units * tokens
        self.chunks += 1
        self.frames += frames
        self.tokens_per_frame = tokens
        self.full_flops += units * full_flops
        self.refresh_chunks += int(refresh)
        self.adaptive_refreshes += int(adaptive)
        self.subsampled_chunks += int(subsampled)
        self.downscaled_chunks += int(downscaled)

    def to_dict(self) -> dict:
        return {**asdict(self), "recomputed_share": self.recomputed_share, "flop_ratio": self.flop_ratio}


class CacherState:
    """References and counters of one stream.

    Buffers are [L, T, C] per kind, allocated on the first refresh and rewritten in place by every
    later refresh, so their addresses stay fixed for the life of the stream (what graph capture
    needs). They are reallocated only when the frame's token count or width changes.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the reference and restart the chunk counter: the next chunk refreshes."""
        self.chunk_index = 0
        self.last_refresh_chunk = -1
        self.has_reference = False
        self.unit_keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.residual_delta: torch.Tensor | None = None
        self.probe_index: torch.Tensor | None = None  # a reuse check's probe positions [P], queries and
        self.probe_queries: torch.Tensor | None = None  # attention outputs [L, P, C] (see LayerReference)
        self.probe_attention: torch.Tensor | None = None
        self.grid: tuple[int, ...] | None = None  # the reference's token grid, where the tower has one
        self.reference_pixels: torch.Tensor | None = None  # the reference frame's tower input (adaptive "pixels")
        # refresh="budget": the previous chunk's last frame (its tower input: the cut signal without
        # codec hints), whether that chunk was a cut, the codec change of every patch accumulated
        # since the reference [U, P] (None: no hints since), and the hints for the next chunk.
        self.previous_pixels: torch.Tensor | None = None
        self.previous_cut = False
        self.change_since_reference: torch.Tensor | None = None
        self.next_hints: ChunkHints | None = None
        # [L, U, k] the tokens each layer recomputed in the latest chunk (None: a refresh, or no chunk
        # yet). Per layer, since each layer selects from its own keys; one small tensor per chunk,
        # written on the device (no host sync), read by tools on demand.
        self.last_recomputed: torch.Tensor | None = None
        self.stats = CacherStats()

    def state_dict(self) -> dict[str, Any]:
        """The whole state (reference tensors, schedule, counters) for saving a stream; tensors as
        they are, everything else JSON values."""
        return {
            "chunk_index": self.chunk_index, "last_refresh_chunk": self.last_refresh_chunk,
            "has_reference": self.has_reference, "grid": None if self.grid is None else list(self.grid),
            "unit_keys": self.unit_keys, "values": self.values, "residual_delta": self.residual_delta,
            "reference_pixels": self.reference_pixels, "stats": asdict(self.stats),
            "probe_queries": self.probe_queries, "probe_attention": self.probe_attention,
            "previous_pixels": self.previous_pixels, "previous_cut": self.previous_cut,
            "change_since_reference": self.change_since_reference,
            "next_hints_change": None if self.next_hints is None else self.next_hints.change,
            "next_hints_cut": None if self.next_hints is None else self.next_hints.cut,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        """Take back what `state_dict` returned, tensors moved to `device` (default: where they are)."""

        def tensor(value: torch.Tensor | None) -> torch.Tensor | None:
            return value if value is None or device is None else value.to(device)

        self.chunk_index, self.last_refresh_chunk = int(state["chunk_index"]), int(state["last_refresh_chunk"])
        self.has_reference = bool(state["has_reference"])
        self.grid = None if state["grid"] is None else tuple(int(g) for g in state["grid"])
        self.unit_keys, self.values = tensor(state["unit_keys"]), tensor(state["values"])
        self.residual_delta, self.reference_pixels = tensor(state["residual_delta"]), tensor(state["reference_pixels"])
        self.stats = CacherStats(**state["stats"])
        # Saves made before refresh="budget" (or the reuse check) existed carry none of these: a new stream's values.
        self.probe_queries, self.probe_attention = tensor(state.get("probe_queries")), tensor(state.get("probe_attention"))
        self.probe_index = None if self.probe_queries is None else probe_positions(self.values.shape[1], self.values.device)
        self.previous_pixels = tensor(state.get("previous_pixels"))
        self.previous_cut = bool(state.get("previous_cut", False))
        self.change_since_reference = tensor(state.get("change_since_reference"))
        change, cut = tensor(state.get("next_hints_change")), tensor(state.get("next_hints_cut"))
        self.next_hints = None if change is None else ChunkHints(change, cut)

    @property
    def reference_shape(self) -> tuple[int, int, int] | None:
        """(layers, tokens, width) of the allocated reference, or None before the first refresh."""
        return None if self.values is None else tuple(self.values.shape)

    def check_compatible(self, hidden_states: torch.Tensor) -> None:
        """Raise if a chunk's dtype or device differs from the reference's (e.g. the model moved)."""
        if self.values is None:
            return
        if hidden_states.dtype != self.values.dtype or hidden_states.device != self.values.device:
            raise StreamStateError(
                f"this stream's cacher reference is {self.values.dtype} on {self.values.device}, but the chunk is "
                f"{hidden_states.dtype} on {hidden_states.device}; call reset() on the stream (or the cacher) after "
                "moving or casting the model"
            )

    def prepare_refresh(
        self, num_layers: int, num_tokens: int, width: int, like: torch.Tensor, grid: tuple[int, ...] | None = None,
        probe: bool = False,
    ) -> None:
        """Make sure buffers of the right shape exist, and mark the reference invalid until written.

        grid: the chunk's token grid where the token count alone does not fix positions (Qwen towers).
        probe: keep the reuse check's probe (its positions, queries and attention outputs) as well.
        """
        resized = self.reference_shape != (num_layers, num_tokens, width)
        if resized:
            shape = (num_layers, num_tokens, width)
            self.unit_keys, self.values, self.residual_delta = (
                torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(3)
            )
        if not probe:
            self.probe_index = self.probe_queries = self.probe_attention = None
        elif resized or self.probe_index is None:
            self.probe_index = probe_positions(num_tokens, like.device)
            self.probe_queries, self.probe_attention = (
                torch.empty(num_layers, len(self.probe_index), width, dtype=like.dtype, device=like.device)
                for _ in range(2))
        self.grid = grid
        self.has_reference = False

    def accumulate_change(self, hints: ChunkHints | None, refresh: bool) -> torch.Tensor | None:
        """Accumulate a chunk's codec change into the change since the reference ([U, P]: each patch's
        share changed, combined as independent events; a cut changes everything) and return it. None
        when this chunk or one since the reference came without hints: the pixels decide then."""
        if hints is None or refresh:
            self.change_since_reference = None
            return None
        change = hints.change.to(device=self.values.device, dtype=torch.float32).clamp(0.0, 1.0)
        change = torch.where(hints.cut.to(change.device)[:, None], torch.ones_like(change), change)
        previous = self.change_since_reference
        if previous is not None and previous.shape == change.shape:
            change = 1.0 - (1.0 - previous) * (1.0 - change)
        elif self.last_refresh_chunk != self.chunk_index - 1:
            self.change_since_reference = None  # an earlier chunk since the reference had no hints
            return None
        self.change_since_reference = change
        return change

    def layer(self, index: int) -> LayerReference:
        """The reference slices of encoder layer `index` (views into the state's buffers)."""
        if self.values is None:
            raise StreamStateError("this stream has no cacher reference yet; a refresh chunk must run first")
        probe = self.probe_queries is not None
        return LayerReference(self.unit_keys[index], self.values[index], self.residual_delta[index], self.probe_index,
                              self.probe_queries[index] if probe else None, self.probe_attention[index] if probe else None)


__all__ = ["CacherState", "CacherStats", "LayerReference"]
