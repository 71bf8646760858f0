"""streamtc: Streaming Token Compression (STC) for Hugging Face transformers VideoLLMs."""

from .config import CacherConfig, PrunerConfig, STCConfig
from .errors import (
    ConfigError,
    InputError,
    StreamStateError,
    StreamTCError,
    UnsupportedModelError,
    VideoSourceError,
)

__version__ = "0.1.0"

__all__ = [
    "CacherConfig",
    "PrunerConfig",
    "STCConfig",
    "ConfigError",
    "InputError",
    "StreamStateError",
    "StreamTCError",
    "UnsupportedModelError",
    "VideoSourceError",
]
