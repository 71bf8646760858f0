"""Typed errors raised by streamtc. Each names the problem and, where possible, the fix."""


class StreamTCError(Exception):
    """Base class of every error streamtc raises on purpose."""


class ConfigError(StreamTCError, ValueError):
    """A configuration value is missing, unknown or outside its valid range."""


class UnsupportedModelError(StreamTCError, TypeError):
    """The model (or the part of it streamtc must patch) is not a supported architecture."""


class StreamStateError(StreamTCError, RuntimeError):
    """Per-stream state does not fit the input (shape, dtype, device) or is used out of order."""


class InputError(StreamTCError, ValueError):
    """A tensor, frame or question given by the caller has the wrong shape, type or value."""


class VideoSourceError(StreamTCError, OSError):
    """A video file or stream cannot be opened or decoded."""


class WeightsError(StreamTCError, OSError):
    """Pretrained weights cannot be fetched, verified or converted."""


class OffloadError(StreamTCError, OSError):
    """Offloaded KV blocks of a stream cannot be read back intact (a file deleted, truncated or altered)."""


class SnapshotError(StreamTCError, OSError):
    """A saved stream cannot be written, or cannot be read back as saved (missing, torn, corrupt,
    another format version, or saved on another model)."""


__all__ = [
    "StreamTCError",
    "ConfigError",
    "UnsupportedModelError",
    "StreamStateError",
    "InputError",
    "VideoSourceError",
    "WeightsError",
    "OffloadError",
    "SnapshotError",
]
