"""streamtc: Streaming Token Compression (STC) for Hugging Face transformers VideoLLMs."""

from .cacher import CacherState, STCCacher
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
from .pruner import KeptTokens, PrunerState, STCPruner
from .session import Answer, SlidingWindowCache, StreamingSession

__version__ = "0.1.0"

__all__ = [
    "StreamingSession",
    "SlidingWindowCache",
    "Answer",
    "STCCacher",
    "CacherState",
    "STCPruner",
    "PrunerState",
    "KeptTokens",
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
