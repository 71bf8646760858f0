"""A stream's LLM memory: the KV-cache policies that make, bound and restore one stream's cache.

    policies   `CachePolicy`, `CacheBlock`, `FullCache`, `SlidingWindowCache`
    streaming_window   `StreamingWindowCache`: StreamingVLM's window for per-chunk-turn streams
    persist    saving a stream's memory to a directory (atomic, verified snapshots)
"""

from . import persist
from .policies import CacheBlock, CachePolicy, FullCache, SlidingWindowCache
from .streaming_window import StreamingWindowCache

__all__ = ["CacheBlock", "CachePolicy", "FullCache", "SlidingWindowCache", "StreamingWindowCache", "persist"]
