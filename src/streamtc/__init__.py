"""streamtc: Streaming Token Compression (STC) for Hugging Face transformers VideoLLMs.

The configs and errors are imported with the package; the Cacher, Pruner and session (which import
torch and transformers, seconds of start-up) on first use, so `streamtc --help` and argument errors
answer at once.
"""

from typing import TYPE_CHECKING

from .lazy import lazy_names

from .config import CacherConfig, PrunerConfig, STCConfig
from .errors import (
    ConfigError,
    InputError,
    StreamStateError,
    StreamTCError,
    UnsupportedModelError,
    VideoSourceError,
    WeightsError,
)

if TYPE_CHECKING:
    from .cacher import CacherState, STCCacher
    from .pruner import KeptTokens, PrunerState, STCPruner
    from .factory import SessionSpec
    from .memory import DiskStore, FullCache, HostStore, RetrievalCache, SlidingWindowCache
    from .session import Answer, StreamingSession
    from .variants import VARIANTS, Variant, get_variant

__version__ = "0.1.0"

# name -> submodule it is imported from when first used
_LAZY = {
    "StreamingSession": "session",
    "FullCache": "memory",
    "SlidingWindowCache": "memory",
    "RetrievalCache": "memory",
    "HostStore": "memory",
    "DiskStore": "memory",
    "Answer": "session",
    "STCCacher": "cacher",
    "CacherState": "cacher",
    "STCPruner": "pruner",
    "PrunerState": "pruner",
    "KeptTokens": "pruner",
    "SessionSpec": "factory",
    "Variant": "variants",
    "VARIANTS": "variants",
    "get_variant": "variants",
}


__getattr__ = lazy_names(__name__, _LAZY)


__all__ = [
    "StreamingSession",
    "FullCache",
    "SlidingWindowCache",
    "RetrievalCache",
    "HostStore",
    "DiskStore",
    "Answer",
    "STCCacher",
    "CacherState",
    "STCPruner",
    "PrunerState",
    "KeptTokens",
    "SessionSpec",
    "Variant",
    "VARIANTS",
    "get_variant",
    "CacherConfig",
    "PrunerConfig",
    "STCConfig",
    "ConfigError",
    "InputError",
    "StreamStateError",
    "StreamTCError",
    "UnsupportedModelError",
    "VideoSourceError",
    "WeightsError",
]
