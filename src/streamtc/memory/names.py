"""Memories by name, as the command line and the benchmarks choose them (`--memory`).

    full        `FullCache`: every token (grows with the stream).
    window      `SlidingWindowCache(window_tokens)`: the prefix and the newest frames; older ones forgotten.
    retrieval   `RetrievalCache(window_tokens, retrieve_frames, offload_dir, offload_budget)`: the
                window, older frames offloaded (host memory, or disk under offload_dir) and retrieved
                per question.
    streaming-vlm  `StreamingWindowCache()`: StreamingVLM's window of the last 16 chunks' vision and
                16 rounds' text, positions re-indexed (the per-chunk-turn "livecc" protocol only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .policies import CachePolicy, FullCache, SlidingWindowCache
from .retrieval import RetrievalCache
from .streaming_window import StreamingWindowCache

MEMORIES = ("full", "window", "retrieval", "streaming-vlm")


def memory_policy(kind: str, window_tokens: int = 15_000, retrieve_frames: int = 64,
                  offload_dir: str | Path | None = None, offload_budget: int | None = None) -> Callable[[], CachePolicy]:
    """The cache-policy factory `kind` names (settings checked now, so a bad one fails before a stream)."""
    if kind not in MEMORIES:
        raise ConfigError(f"unknown memory {kind!r}; choose from {', '.join(MEMORIES)}")
    if kind != "retrieval" and (offload_dir is not None or offload_budget is not None):
        raise ConfigError(f"offload_dir and offload_budget are for the retrieval memory, not {kind!r}")
    if kind == "full":
        return FullCache
    if kind == "streaming-vlm":
        return StreamingWindowCache
    if kind == "window":
        SlidingWindowCache(window_tokens)
        return lambda: SlidingWindowCache(window_tokens)
    RetrievalCache(window_tokens, retrieve_frames, offload_budget=offload_budget, offload_dir=offload_dir)  # validates
    if offload_dir is not None:  # each stream's private directory is made in it at its first offload
        usable_directory(Path(offload_dir))
    return lambda: RetrievalCache(window_tokens, retrieve_frames, offload_dir=offload_dir, offload_budget=offload_budget)


def usable_directory(path: Path) -> None:
    """Make `path` if missing and check it takes files: a stream finds out now, not at its first
    offload hours in."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"offload_dir {path} cannot be made: {error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"offload_dir {path} is not writable")


__all__ = ["MEMORIES", "memory_policy"]
