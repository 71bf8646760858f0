"""A stream's LLM memory: the KV-cache policies that make, bound and restore one stream's cache.

    policies   `CachePolicy`, `CacheBlock`, `FullCache`, `SlidingWindowCache`
    persist    saving a stream's memory to a directory (atomic, verified snapshots)
"""

from . import persist
from .policies import CacheBlock, CachePolicy, FullCache, SlidingWindowCache

__all__ = ["CacheBlock", "CachePolicy", "FullCache", "SlidingWindowCache", "persist"]
