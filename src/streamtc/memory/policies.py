"""KV-cache policies: how one stream's cache is made, bounded, and restored after a question.

A `StreamingSession` owns one policy per stream (made by its `cache_policy` factory). The policy
creates the transformers cache, hears about every block the session pre-fills (the chat prefix, or
pending frames in one forward) and scopes each question (`with policy.question(cache)`), leaving
the video-only cache exactly as it was on exit, errors included. The session counts positions
itself, so positions stay right when a policy evicts.

Persistence: `save(cache, directory)` writes the cache and the policy's bookkeeping into a
directory private to the policy (safetensors for tensors, JSON for bookkeeping; see
`streamtc.memory.persist`), and `restore(config, directory)` on a fresh instance (built with the
same `settings()`) returns the same cache with the bookkeeping restored. A policy holding state
outside the cache saves and restores that too.

    FullCache            keep every token (the uncompressed baseline's memory).
    SlidingWindowCache   keep the chat prefix and the newest frames, at most N visual tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache

from ..checks import positive_int
from ..errors import SnapshotError
from .persist import load_cache_layers, read_json, save_cache_layers, write_json


@dataclass(frozen=True)
class CacheBlock:
    """A run of tokens appended to the cache in one pre-fill.

    kind: "prompt" (the chat prompt before the video) or "frame" (one frame's kept tokens; for
    Qwen-VL hosts a temporal patch of two frames, and in per-chunk-turn protocols the turn's own
    text travels with the chunk's first and last frame block, so evicting frames evicts their turns).
    Frame blocks pending together (see "Pre-fill batching" in `streamtc.session`) are pre-filled in
    one forward. start: index of its first token in the cache when appended; length: its token
    count. position: RoPE position of its first token (the temporal/text row for M-RoPE hosts).
    frame/timestamp: which (first) video frame, for frame blocks. text_head / text_tail: prompt text
    at the block's start / end (a per-chunk turn's opening and closing text; the rest are visual tokens).
    """

    kind: Literal["prompt", "frame"]
    start: int
    length: int
    position: int
    frame: int | None = None
    timestamp: float | None = None
    text_head: int = 0
    text_tail: int = 0


class CachePolicy(ABC):
    """How one stream's KV cache is made, bounded, and restored after a question.

    One instance per session (it may keep per-stream bookkeeping); `new_cache` starts a stream.
    """

    @abstractmethod
    def new_cache(self, config: PretrainedConfig) -> Cache:
        """A fresh cache for a new stream (and forget the previous stream's bookkeeping)."""

    def on_append(self, cache: Cache, blocks: Sequence[CacheBlock]) -> int | None:
        """Called after `blocks` (the chat prefix, or pending frames) were pre-filled into
        `cache`, in one forward; bounded policies evict here. Returns how many positions the
        stream's next tokens move down (a policy that re-indexes positions after an eviction), or
        None / 0 when positions run on."""

    @abstractmethod
    def question(self, cache: Cache) -> AbstractContextManager[Cache]:
        """Scope one question: yield the cache it is pre-filled and decoded on; on exit (errors
        included) leave `cache` exactly as it was on entry."""

    def bind(self, language_model: nn.Module) -> None:
        """Called at each stream's start with the LLM decoder the cache belongs to (a policy that
        hooks its attention layers, such as `RetrievalCache`, keeps it)."""

    def memory_stats(self) -> dict[str, Any]:
        """The policy's own counters for `SessionStats.memory` (empty: nothing beyond the cache)."""
        return {}

    def close(self) -> None:
        """Release what the policy holds outside the cache (files); the session calls it on close."""

    def settings(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON values) that make this policy again; saved
        with a stream so that a restore can rebuild the policy."""
        return {}

    def bookkeeping(self) -> dict[str, Any]:
        """This policy's per-stream state besides the cache, as JSON (see `save`)."""
        return {}

    def load_bookkeeping(self, state: dict[str, Any]) -> None:
        """Take back what `bookkeeping` returned."""

    def save(self, cache: Cache, directory: Path) -> None:
        """Write `cache`'s keys and values and this policy's bookkeeping under `directory`
        (created, empty, private to this policy)."""
        save_cache_layers(cache, directory)
        write_json(directory / "policy.json", {"class": type(self).__name__, "bookkeeping": self.bookkeeping()})

    def restore(self, config: PretrainedConfig, directory: Path) -> Cache:
        """The inverse of `save`, on a fresh instance: the saved cache (tensors on the CPU; the
        session moves them to the model's device) with the bookkeeping restored."""
        record = read_json(directory / "policy.json")
        if record.get("class") != type(self).__name__:
            raise SnapshotError(f"this memory was saved by a {record.get('class')}, not a {type(self).__name__}")
        cache = load_cache_layers(self.new_cache(config), directory)
        self.load_bookkeeping(record["bookkeeping"])
        return cache


class FullCache(CachePolicy):
    """Keep every token (the uncompressed baseline's memory; grows with the stream)."""

    def new_cache(self, config: PretrainedConfig) -> Cache:
        return DynamicCache(config=config)

    @contextmanager
    def question(self, cache: Cache) -> Iterator[Cache]:
        length = cache.get_seq_length()
        try:
            yield cache
        finally:
            extra = cache.get_seq_length() - length
            if extra > 0:
                cache.crop(-extra)


class SlidingWindowCache(FullCache):
    """Bound a stream's memory: keep the chat prefix and the newest frames, at most
    `max_visual_tokens` visual tokens (whole frames evicted oldest first; the newest frame is kept
    even when it alone is larger).

    The prefix stays as the attention sink (StreamingLLM); kept keys keep the positions they were
    pre-filled at (they are stored rotated), and the session's position counter runs on, so
    nothing is re-encoded. Frames pre-filled after an eviction attend only to the window, as in
    ReKV's local window. ReKV additionally retrieves evicted frame blocks per question: that is
    `RetrievalCache` (`streamtc.memory.retrieval`). Use: `StreamingSession(..., cache_policy=lambda: SlidingWindowCache(15_000))`.
    """

    def __init__(self, max_visual_tokens: int) -> None:
        positive_int(max_visual_tokens, "max_visual_tokens")
        self.max_visual_tokens = max_visual_tokens
        self._prefix_tokens = 0
        self._frame_tokens: deque[int] = deque()  # token count of each frame in the cache, oldest first
        self.visual_tokens = 0  # visual tokens in the cache now

    def new_cache(self, config: PretrainedConfig) -> Cache:
        self._prefix_tokens, self._frame_tokens, self.visual_tokens = 0, deque(), 0
        return super().new_cache(config)

    def settings(self) -> dict[str, Any]:
        return {"max_visual_tokens": self.max_visual_tokens}

    def bookkeeping(self) -> dict[str, Any]:
        return {"prefix_tokens": self._prefix_tokens, "frame_tokens": list(self._frame_tokens)}

    def load_bookkeeping(self, state: dict[str, Any]) -> None:
        self._prefix_tokens = int(state["prefix_tokens"])
        self._frame_tokens = deque(int(n) for n in state["frame_tokens"])
        self.visual_tokens = sum(self._frame_tokens)

    def on_append(self, cache: Cache, blocks: Sequence[CacheBlock]) -> None:
        for block in blocks:
            if block.kind == "prompt":
                self._prefix_tokens += block.length
            else:
                self._frame_tokens.append(block.length)
                self.visual_tokens += block.length
        evicted = 0
        while len(self._frame_tokens) > 1 and self.visual_tokens > self.max_visual_tokens:
            oldest = self._frame_tokens.popleft()
            evicted += oldest
            self.visual_tokens -= oldest
        if evicted:
            start, stop = self._prefix_tokens, self._prefix_tokens + evicted
            for layer in cache.layers:
                layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys[..., stop:, :]], dim=-2)
                layer.values = torch.cat([layer.values[..., :start, :], layer.values[..., stop:, :]], dim=-2)


__all__ = ["CacheBlock", "CachePolicy", "FullCache", "SlidingWindowCache"]
