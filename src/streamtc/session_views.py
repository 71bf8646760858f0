"""Read-only views of a `StreamingSession`'s stream, for tools and tests: its KV cache and cache
policy, the host's position state, the Cacher's and Pruner's per-stream state, and its progress and
counters. The objects returned are the session's own (not copies): read them, do not change them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache

from .cacher import CacherState, STCCacher
from .hosts import EncodedChunk, HostStream, Placed, RecomputedTokens, VideoHost
from .measure import peak_memory_bytes
from .memory import CacheBlock, CachePolicy
from .pruner import PrunerState, STCPruner
from .session_types import SessionStats


class SessionViews:
    """The read-only properties of `StreamingSession` (its base class); the session sets and
    updates the attributes declared here."""

    host: VideoHost
    _device: torch.device
    _cache: Cache
    _policy: CachePolicy
    _cache_policy_factory: Callable[[], CachePolicy]
    _stream: HostStream
    _cacher: STCCacher | None
    _cacher_state: CacherState | None
    _pruner: STCPruner | None
    _pruner_state: PrunerState | None
    _stop_ids: set[int]
    _frames: int
    _last_timestamp: float | None
    _last_kept: list[list[int]] | None
    _last_chunk: EncodedChunk | None
    _waiting: list[tuple[torch.Tensor, float | None, Any]]
    _pending: list[tuple[Placed, CacheBlock]]
    _stats: SessionStats

    @property
    def cache(self) -> Cache:
        """The video-only KV cache of the stream (pending kept tokens not yet in it)."""
        return self._cache

    @property
    def memory(self) -> CachePolicy:
        """The stream's cache policy: what it holds, evicts, offloads and retrieves."""
        return self._policy

    @property
    def cache_policy(self) -> Callable[[], CachePolicy]:
        """The factory this session makes each stream's cache policy with."""
        return self._cache_policy_factory

    @property
    def host_stream(self) -> HostStream:
        """The host's prompt and position state of the stream (the next position, protocol state)."""
        return self._stream

    @property
    def cacher(self) -> STCCacher | None:
        """The attached STC-Cacher (shared with spawned sessions), or None."""
        return self._cacher

    @property
    def cacher_state(self) -> CacherState | None:
        """This stream's Cacher state (references, schedule, counters), or None without a Cacher."""
        return self._cacher_state

    @property
    def pruner(self) -> STCPruner | None:
        """The STC-Pruner (shared with spawned sessions), or None."""
        return self._pruner

    @property
    def pruner_state(self) -> PrunerState | None:
        """This stream's Pruner state (its history of anchors), or None without a Pruner."""
        return self._pruner_state

    @property
    def waiting_frames(self) -> int:
        """Frames pushed but not yet encoded (short of a host step, e.g. a Qwen-VL frame waiting for its pair)."""
        return len(self._waiting)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Token ids that end an answer."""
        return frozenset(self._stop_ids)

    @property
    def _pending_tokens(self) -> int:
        """Kept tokens waiting for their pre-fill."""
        return sum(block.length for _, block in self._pending)

    # -- the stream's progress and counters ---------------------------------------------------

    @property
    def frames(self) -> int:
        """Frames pushed since the last reset."""
        return self._frames

    @property
    def last_timestamp(self) -> float | None:
        """Timestamp of the last frame pushed, a frame waiting for its pair included (None when it
        carried none, or before a push): where a resumed source continues."""
        return next((t for _, t, _ in reversed(self._waiting) if t is not None), self._last_timestamp)

    @property
    def last_kept_indices(self) -> list[list[int]] | None:
        """Per frame of the latest pushed chunk, the positions (ascending, in the frame's pooled token
        grid) the Pruner or selector kept; None when every token is kept (no pruning) or before a push."""
        return self._last_kept

    @property
    def last_recomputed(self) -> RecomputedTokens | None:
        """Which vision-tower tokens the Cacher recomputed in the latest pushed chunk, per layer and
        pruner frame, as cells of the frame's patch grid (`cells` None: the chunk refreshed, every
        token); None without a Cacher or before a push."""
        if self._cacher is None or self._last_chunk is None:
            return None
        return self.host.recomputed_tokens(self._last_chunk, self._cacher.last_recomputed(self._cacher_state))

    @property
    def last_pruner_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the token grid `last_kept_indices` index (row-major); None before a push."""
        return None if self._last_chunk is None else self.host.pruner_grid(self._last_chunk)

    @property
    def stats(self) -> SessionStats:
        """A snapshot of the stream's counters, with the peak memory read now."""
        stats = dataclasses.replace(self._stats)
        stats.peak_memory_bytes = peak_memory_bytes(self._device)
        if self._cacher_state is not None:
            stats.cacher = self._cacher_state.stats.to_dict()
        stats.pending_tokens = self._pending_tokens
        stats.memory = self._policy.memory_stats() or None
        stats.cache_tokens = self._cache.get_seq_length()
        stats.kv_cache_bytes = sum(
            layer.keys.nbytes + layer.values.nbytes
            for layer in self._cache.layers if getattr(layer, "keys", None) is not None
        )
        return stats


__all__ = ["SessionViews"]
