"""What a server and its streams are configured with: limits on clients (`ServeLimits`), the
streams' LLM memory (`ServeMemory`), which sources clients may open (`SourcePolicy`), one stream's
settings (`StreamSpec`), and the browser-origin form (`origin_of`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..checks import positive_int
from ..config import STCConfig
from ..errors import ConfigError, InputError
from ..sources import BUILTIN_CLIPS, builtin_clip_path
from .errors import AccessDenied, LimitExceeded

# Seconds `serve --ray` gives Ray, Ray Serve and every replica's model to come up (and to go down).
RAY_START_TIMEOUT = 300.0

DEFAULT_NEW_TOKENS = 32  # answer length when a question does not say


@dataclass(frozen=True)
class ServeLimits:
    """Limits on what clients may ask of the server; each breach is a 4xx with the limit named."""

    max_streams: int = 16
    max_queue_frames: int = 16
    max_upload_bytes: int = 8 * 1024 * 1024
    max_frame_side: int = 4096
    max_question_chars: int = 2000
    max_options: int = 10
    max_new_tokens: int = 256
    max_model_views: int = 4

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_queue_frames", "max_upload_bytes", "max_frame_side", "max_question_chars",
                     "max_options", "max_new_tokens", "max_model_views"):
            positive_int(getattr(self, name), name)

    def check_question(self, question: str, options: Sequence[str] | None, max_new_tokens: int | None,
                       top_logprobs: int | None) -> int:
        """Refuse a question beyond the limits (InputError, LimitExceeded naming the flag); returns
        its answer length (None: 32, or the limit if lower)."""
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_NEW_TOKENS, self.max_new_tokens)
        if not isinstance(question, str) or not question.strip():
            raise InputError("question must be a non-empty string")
        if len(question) > self.max_question_chars:
            raise LimitExceeded(f"question of {len(question)} characters exceeds the limit of "
                                f"{self.max_question_chars} (--max-question-chars)", status=413)
        if options is not None:
            if len(options) > self.max_options:
                raise LimitExceeded(f"{len(options)} options exceed the limit of {self.max_options}", status=413)
            if any(not isinstance(o, str) or not o.strip() or len(o) > self.max_question_chars for o in options):
                raise InputError("options must be non-empty strings no longer than a question")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not (
                1 <= max_new_tokens <= self.max_new_tokens):
            raise InputError(f"max_new_tokens must be an int in [1, {self.max_new_tokens}], got {max_new_tokens!r}")
        if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int)
                                         or not 1 <= top_logprobs <= 20):
            raise InputError(f"top_logprobs must be None or an int in [1, 20], got {top_logprobs!r}")
        return max_new_tokens


@dataclass(frozen=True)
class ServeMemory:
    """The LLM memory of the server's streams.

    kind, window_tokens: what a stream that chooses neither gets (`full`, `window`, `retrieval`;
    a stream that sets only window_tokens gets a window). retrieve_frames, offload_dir and
    offload_budget apply to every retrieval stream: offloaded blocks stay in host memory, or go to
    a private directory per stream under offload_dir, at most offload_budget bytes each (the
    oldest deleted first). Clients choose a memory and a window, never a server path.
    """

    kind: str = "full"
    window_tokens: int = 15_000
    retrieve_frames: int = 64
    offload_dir: Path | None = None
    offload_budget: int | None = None

    def __post_init__(self) -> None:
        from ..memory import memory_policy  # imports torch: only once a server is configured

        memory_policy(self.kind, self.window_tokens, self.retrieve_frames)
        memory_policy("retrieval", self.window_tokens, self.retrieve_frames, self.offload_dir, self.offload_budget)

    def resolve(self, spec: StreamSpec) -> tuple[str, int | None]:
        """A stream's memory and window (None for memories without one)."""
        kind = spec.memory or ("window" if spec.window_tokens is not None else self.kind)
        if kind in ("full", "streaming-vlm"):
            return kind, None
        return kind, spec.window_tokens or self.window_tokens

    def policy(self, kind: str, window_tokens: int | None) -> Callable[[], Any]:
        """The cache-policy factory of a resolved memory (the offload settings go to retrieval only)."""
        from ..memory import memory_policy

        retrieval = kind == "retrieval"
        return memory_policy(kind, window_tokens or self.window_tokens, self.retrieve_frames,
                             self.offload_dir if retrieval else None, self.offload_budget if retrieval else None)


@dataclass(frozen=True)
class SourcePolicy:
    """Which sources the server may read on a client's request.

    allow_dirs: video files under these directories (resolved, symlinks followed); allow_schemes:
    URL schemes (rtsp, http, ...) and "webcam" for camera indices. The built-in clips ("demo",
    "bikes", "carphone", "bigbuckbunny") are always allowed. Nothing else is.
    """

    allow_dirs: tuple[Path, ...] = ()
    allow_schemes: frozenset[str] = frozenset()

    def resolve(self, source: str) -> str | Path:
        """The openable spec of `source`, or AccessDenied naming the flag that would allow it."""
        if not isinstance(source, str) or not source.strip():
            raise InputError("source must be a non-empty string (a file, a URL, a webcam index or 'demo')")
        if source == "demo" or source in BUILTIN_CLIPS:
            return builtin_clip_path("bikes" if source == "demo" else source)
        if source.isdigit():
            if "webcam" not in self.allow_schemes:
                raise AccessDenied("webcam sources are not allowed; start the server with --allow-scheme webcam")
            return source
        scheme = urlsplit(source).scheme.lower()
        if len(scheme) > 1:  # one letter would be a Windows drive
            if scheme not in self.allow_schemes:
                raise AccessDenied(f"URL scheme {scheme!r} is not allowed; start the server with --allow-scheme {scheme}")
            return source
        path = Path(source).expanduser().resolve()
        if not any(path.is_relative_to(folder) for folder in self.allow_dirs):
            raise AccessDenied(f"{source} is outside the allowed directories; start the server with --allow-dir DIR")
        if not path.is_file():
            raise InputError(f"{source}: no such file")
        return path


@dataclass(frozen=True)
class StreamSpec:
    """One stream's settings.

    source: None for a push stream (the client sends frames); else a file, URL, webcam index or
        built-in clip name, read by the server (checked against the `SourcePolicy`).
    fps: frames sampled per second of stream time (push streams: of the frames' timestamps).
    stc: the stream's STC settings; "default" takes the server's, None runs without STC.
    memory: the stream's LLM memory (full, window, retrieval, streaming-vlm); None takes the
        server's (`ServeMemory`), or a window when window_tokens is set.
    window_tokens: the window of the window and retrieval memories (None: the server's).
    realtime: server-read files are paced at their own speed (True) or read as fast as the model
        takes them (False). loop: a file starts again at its end (stream time runs on).
    max_seconds: stop a server-read source after this much stream time. name: a label.
    """

    source: str | None = None
    fps: float = 1.0
    stc: STCConfig | None | str = "default"
    memory: str | None = None
    window_tokens: int | None = None
    realtime: bool = True
    loop: bool = False
    max_seconds: float | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fps, (int, float)) or isinstance(self.fps, bool) or not (math.isfinite(self.fps)
                                                                                       and 0 < self.fps <= 60):
            raise ConfigError(f"fps must be a number in (0, 60], got {self.fps!r}")
        if self.stc != "default" and self.stc is not None and not isinstance(self.stc, STCConfig):
            raise ConfigError(f"stc must be 'default', None or an STCConfig, got {self.stc!r}")
        positive_int(self.window_tokens, "window_tokens", optional=True)
        from ..memory import MEMORIES

        if self.memory is not None and self.memory not in MEMORIES:
            raise ConfigError(f"memory must be one of {', '.join(MEMORIES)}, got {self.memory!r}")
        if self.memory in ("full", "streaming-vlm") and self.window_tokens is not None:
            raise ConfigError(f"window_tokens sizes the window and retrieval memories; {self.memory!r} has no window")
        if self.max_seconds is not None and not (isinstance(self.max_seconds, (int, float)) and self.max_seconds > 0):
            raise ConfigError(f"max_seconds must be None or > 0, got {self.max_seconds!r}")
        if self.source is None and (self.loop or self.max_seconds is not None):
            raise ConfigError("loop and max_seconds apply to server-read sources; a push stream has no source")


def origin_of(url: str) -> str | None:
    """`url` as an origin, "scheme://host:port" (default port written out, host lowercased), or
    None when it is not an http(s) origin."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


__all__ = ["DEFAULT_NEW_TOKENS", "ServeLimits", "ServeMemory", "SourcePolicy", "StreamSpec", "origin_of"]
