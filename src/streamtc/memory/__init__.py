"""A stream's LLM memory: the KV-cache policies that make, bound and restore one stream's cache.

    policies           `CachePolicy`, `CacheBlock`, `FullCache`, `SlidingWindowCache`
    streaming_window   `StreamingWindowCache`: StreamingVLM's window for per-chunk-turn streams
    retrieval          `RetrievalCache`: ReKV's window + offloaded frame blocks retrieved per question
    offload            where offloaded blocks live: `HostStore` (host memory), `DiskStore` (files, budget)
    names              `memory_policy("full" | "window" | "retrieval" | "streaming-vlm", ...)`: a policy factory by name
    persist            saving a stream's memory to a directory (atomic, verified snapshots)
"""

from . import persist
from .offload import BlockInfo, DiskStore, HostStore, OffloadStore
from .policies import CacheBlock, CachePolicy, FullCache, SlidingWindowCache
from .retrieval import MemoryStats, RetrievalCache, select_blocks
from .streaming_window import StreamingWindowCache
from .names import MEMORIES, memory_policy

__all__ = ["MEMORIES", "BlockInfo", "CacheBlock", "CachePolicy", "DiskStore", "FullCache", "HostStore", "MemoryStats",
           "OffloadStore", "RetrievalCache", "SlidingWindowCache", "StreamingWindowCache", "memory_policy", "persist",
           "select_blocks"]
