"""A stream's LLM memory: the KV-cache policies that make, bound and restore one stream's cache.

    policies    `CachePolicy`, `CacheBlock`, `FullCache`, `SlidingWindowCache`
    retrieval   `RetrievalCache`: ReKV's window + offloaded frame blocks retrieved per question
    offload     where offloaded blocks live: `HostStore` (host memory), `DiskStore` (files, budget)
"""

from .offload import BlockInfo, DiskStore, HostStore, OffloadStore
from .policies import CacheBlock, CachePolicy, FullCache, SlidingWindowCache
from .retrieval import MemoryStats, RetrievalCache, select_blocks

__all__ = ["BlockInfo", "CacheBlock", "CachePolicy", "DiskStore", "FullCache", "HostStore", "MemoryStats",
           "OffloadStore", "RetrievalCache", "SlidingWindowCache", "select_blocks"]
