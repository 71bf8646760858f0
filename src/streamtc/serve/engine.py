"""The model side of `streamtc serve`: one loaded model, one `StreamingSession` per stream, and a
scheduler that serves the model to the streams fairly from a single worker thread.

    engine = Engine(StreamingSession.from_preset("tiny-llava-ov", stc=None), default_stc=STCConfig())
    stream = engine.create_stream(StreamSpec(source="demo", fps=1.0)).result()   # a server-read source
    push = engine.create_stream(StreamSpec()).result()                           # a push stream
    engine.push_frame(push["id"], image, timestamp=0.0)
    answer = engine.ask(stream["id"], "What is happening?").result()
    engine.close()

Threads. Model work (session creation, frames, questions) runs on one worker thread: a model is
not safe to call from two threads at once, and one thread keeps every stream's results identical to
the same stream served alone. Callers (the asyncio HTTP front, reader threads of server-read
sources) only queue work and get `concurrent.futures.Future`s back.

Scheduling. Streams take turns, round robin, one unit of work per turn: a question when the
stream has one ready, else one queued frame (one chunk). A question therefore jumps the frames
queued on its own stream (it is answered on the video processed so far), and no stream waits for
more than one unit of every other stream. A question asked with `sync=True` waits instead until
the frames queued before it are processed (deterministic replays, tests). Stream creation is
served before the round.

Model views. Each `StreamingSession` attaches its STC-Cacher to the model it is given, and a model
holds one Cacher. The engine keeps the loaded model untouched (the no-STC streams run on it) and
gives every distinct (STC settings, memory policy) a *view*: a copy of the module tree whose
parameters and buffers are the loaded model's own tensors (no weights copied), with its own
Cacher. Streams with those settings are spawned from that view's root session.

Events. Each stream keeps its recent events (a frame processed, an answer, a state change)
numbered from 1; `events_after` returns those newer than a number, and the `listener` callback is
called (from whichever thread produced the event) so an async front can wake its subscribers.

Persistence. With `persist_dir`, a graceful shutdown saves every stream's session and settings
under persist_dir/<stream id> (`StreamStore`), and `resume()` registers the saved streams again
under their ids, each session loaded from its save: a server-read file resumes after the last frame
the stream processed (queued, unprocessed frames are read again), a push stream waits for its
client, a finished stream stays finished with its memory. Deleting a stream removes its save.
`on_close(info, session)` is called as well for every stream closed (at shutdown and on delete).
"""

from __future__ import annotations

import io
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..checks import positive_int
from ..config import STCConfig
from ..errors import ConfigError, InputError, StreamTCError
from ..factory import derive_session
from ..memory import MEMORIES, memory_policy
from ..session import StreamingSession
from ..sources import BUILTIN_CLIPS, FrameSampler, builtin_clip_path, open_source
from ..variants import Variant
from .store import StreamStore

logger = logging.getLogger(__name__)

DEFAULT_NEW_TOKENS = 32  # answer length when a question does not say
EVENTS_KEPT = 512  # recent events kept per stream for subscribers that join or fall behind


# -- errors -------------------------------------------------------------------------------------


class ServeError(StreamTCError):
    """A request the server refuses; `status` is the HTTP status the front answers with."""

    status = 400


class StreamNotFound(ServeError, KeyError):
    status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "stream not found"


class AccessDenied(ServeError, PermissionError):
    status = 403


class LimitExceeded(ServeError):
    """A configured limit (streams, queue, sizes, lengths); status 413 or 429."""

    def __init__(self, message: str, status: int = 429) -> None:
        super().__init__(message)
        self.status = status


class StreamClosed(ServeError):
    status = 409


# -- settings -----------------------------------------------------------------------------------


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



# -- frames -------------------------------------------------------------------------------------


def decode_frame(data: bytes, limits: ServeLimits, *, width: int | None = None, height: int | None = None) -> np.ndarray:
    """An uploaded frame as RGB uint8 [H, W, 3]: JPEG/PNG (any format PIL reads) or, with width
    and height, raw RGB bytes. Raises InputError (corrupt, wrong size) or LimitExceeded (413)."""
    if len(data) > limits.max_upload_bytes:
        raise LimitExceeded(f"frame of {len(data)} bytes exceeds the limit of {limits.max_upload_bytes} bytes "
                            "(--max-upload-bytes)", status=413)
    if (width is None) != (height is None):
        raise InputError("raw RGB frames need both width and height")
    if width is not None:
        if width < 1 or height < 1:
            raise InputError(f"width and height must be >= 1, got {width}x{height}")
        _check_side(width, height, limits)
        if len(data) != width * height * 3:
            raise InputError(f"raw RGB frame of {width}x{height} needs {width * height * 3} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_side(image.width, image.height, limits)  # before decoding the pixels
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise InputError(f"cannot decode the frame ({len(data)} bytes): not an image format PIL reads "
                         "(send JPEG or PNG, or raw RGB with width and height)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"cannot decode the frame: corrupt or truncated image ({error})") from None


def _check_side(width: int, height: int, limits: ServeLimits) -> None:
    if max(width, height) > limits.max_frame_side:
        raise LimitExceeded(f"frame of {width}x{height} exceeds the limit of {limits.max_frame_side} pixels a side "
                            "(--max-frame-side)", status=413)


def encode_jpeg(image: np.ndarray, max_side: int = 480) -> bytes:
    """JPEG of an RGB frame, scaled down to at most `max_side` pixels a side (for the web page)."""
    picture = Image.fromarray(image)
    picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


# -- streams ------------------------------------------------------------------------------------


@dataclass
class _Question:
    text: str
    options: list[str] | None
    max_new_tokens: int
    after: int  # frames queued on the stream before the question (sync questions wait for them)
    sync: bool
    top_logprobs: int | None
    future: Future
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class _Stream:
    id: str
    spec: StreamSpec
    created: float
    state: str = "starting"  # starting, playing, ended, error, closed
    error: str | None = None
    session: StreamingSession | None = None
    frames: deque = field(default_factory=deque)  # (image, timestamp, number)
    questions: deque = field(default_factory=deque)
    queued: int = 0  # frames queued so far
    done: int = 0  # frames processed (or failed) so far
    dropped: int = 0
    events: deque = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    event_seq: int = 0
    last_frame: np.ndarray | None = None
    last_timestamp: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    source_end: tuple[str, str | None] | None = None  # (state, error) once a reader is done
    sampler: FrameSampler | None = None
    push_clock: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    ready: Future = field(default_factory=Future)


class Engine:
    """Streams on one loaded model, served by one worker thread (see the module docstring).

    base: a session on the loaded model without STC (`stc=None`); its model is never patched.
    default_stc: what a stream with stc="default" gets (None: no STC).
    listener: called as listener(stream_id, event) after every event (from any thread).
    on_close: called as on_close(info, session) for each stream closed (shutdown or delete).
    memory: the streams' LLM memory (`ServeMemory`: full by default).
    persist_dir: save streams here at shutdown (and `resume()` them at the next start); None: not saved.
    threads: torch intra-op threads for the worker (None: leave as is).
    """

    def __init__(
        self,
        base: StreamingSession,
        default_stc: STCConfig | None = None,
        *,
        limits: ServeLimits = ServeLimits(),
        sources: SourcePolicy = SourcePolicy(),
        memory: ServeMemory = ServeMemory(),
        listener: Callable[[str, dict[str, Any]], None] | None = None,
        on_close: Callable[[dict[str, Any], StreamingSession], None] | None = None,
        persist_dir: Path | str | None = None,
        threads: int | None = None,
        id_prefix: str = "",
    ) -> None:
        if base.stc is not None:
            raise ConfigError("the engine's base session must run without STC (stc=None); STC is set per stream")
        self.base = base
        self.default_stc = default_stc
        self.limits = limits
        self.sources = sources
        self.memory = memory
        self.listener = listener
        self.on_close = on_close
        self.store = None if persist_dir is None else StreamStore(persist_dir)
        self.id_prefix = id_prefix
        self._roots: dict[tuple[STCConfig | None, str, int | None], StreamingSession] = {(None, "full", None): base}
        text = base.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # keys and values of one token in every layer: turns the cache's bytes into tokens held
        self._kv_bytes_per_token = (2 * text.num_hidden_layers * text.num_key_value_heads * head_dim
                                    * base.model.dtype.itemsize)
        self._streams: dict[str, _Stream] = {}
        self._turn = 0  # round-robin position over the stream order
        self._control: deque[Callable[[], None]] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._threads = threads
        self._worker = threading.Thread(target=self._work, name="streamtc-model", daemon=True)
        self._worker.start()

    # -- public API (any thread) ----------------------------------------------------------------

    def create_stream(self, spec: StreamSpec) -> Future:
        """Register a stream; the future resolves to its description once its session is ready.
        Raises at once for a refused source (AccessDenied, InputError) or the stream limit."""
        location = self.sources.resolve(spec.source) if spec.source is not None else None
        stc = self.default_stc if spec.stc == "default" else spec.stc
        with self._lock:
            self._check_open()
            if len(self._streams) >= self.limits.max_streams:
                raise LimitExceeded(f"the server holds its limit of {self.limits.max_streams} streams "
                                    "(--max-streams); delete one first")
            key = (stc, *self.memory.resolve(spec))
            views = sum(1 for k in self._roots if k[0] is not None and k[0].cacher is not None)
            if key not in self._roots and stc is not None and stc.cacher is not None and views >= self.limits.max_model_views:
                raise LimitExceeded(f"the server holds its limit of {self.limits.max_model_views} distinct STC "
                                    "settings (--max-model-views); use settings an existing stream uses")
            stream = _Stream(id=self.id_prefix + secrets.token_hex(4), spec=spec, created=time.time())
            if spec.source is None:
                stream.sampler = FrameSampler(spec.fps)
            self._streams[stream.id] = stream
            self._control.append(lambda: self._start(stream, key, location))
            self._lock.notify_all()
        return stream.ready

    def push_frame(self, stream_id: str, image: np.ndarray, timestamp: float | None = None) -> dict[str, Any]:
        """Queue a client's frame on a push stream; frames between the stream's fps instants are
        dropped (sampled by timestamp, seconds; None: time since the stream's first frame)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise InputError(f"a frame must be RGB uint8 [H, W, 3], got {image.dtype} {image.shape}")
        _check_side(image.shape[1], image.shape[0], self.limits)
        with self._lock:
            stream = self._get(stream_id)
            if stream.spec.source is not None:
                raise InputError(f"stream {stream_id} reads its own source; frames can only be pushed to a push "
                                 "stream (create one without a source)")
            if stream.state not in ("starting", "playing"):
                raise StreamClosed(f"stream {stream_id} is {stream.state}; it takes no more frames")
            now = time.monotonic()
            if timestamp is None:
                stream.push_clock = now if stream.push_clock is None else stream.push_clock
                timestamp = now - stream.push_clock
            if not math.isfinite(timestamp) or timestamp < 0:
                raise InputError(f"timestamp must be a finite number of seconds >= 0, got {timestamp!r}")
            if stream.last_timestamp is not None and timestamp < stream.last_timestamp:
                raise InputError(f"timestamps must not go back: {timestamp} after {stream.last_timestamp}")
            if len(stream.frames) >= self.limits.max_queue_frames:
                raise LimitExceeded(f"stream {stream_id} has {len(stream.frames)} frames waiting (the limit, "
                                    "--max-queue-frames); send frames more slowly or at a lower fps")
            if not stream.sampler.take(timestamp):
                stream.dropped += 1
                return {"accepted": False, "reason": f"between the stream's {stream.spec.fps} fps instants",
                        "timestamp": timestamp}
            stream.last_timestamp = timestamp
            self._enqueue_locked(stream, image, timestamp)
            return {"accepted": True, "frame": stream.queued - 1, "timestamp": timestamp, "queued": len(stream.frames)}

    def ask(self, stream_id: str, question: str, options: Sequence[str] | None = None, *,
            max_new_tokens: int | None = None, sync: bool = False, top_logprobs: int | None = None) -> Future:
        """Queue a question; the future resolves to the answer's dict (timings in ms, queue_ms
        included). sync: answer after the frames queued before it (else on the video so far).
        top_logprobs: also return the k most likely first answer tokens with their log-probabilities
        (one more question pre-fill). max_new_tokens: None is 32, or the limit if lower."""
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_NEW_TOKENS, self.limits.max_new_tokens)
        if not isinstance(question, str) or not question.strip():
            raise InputError("question must be a non-empty string")
        if len(question) > self.limits.max_question_chars:
            raise LimitExceeded(f"question of {len(question)} characters exceeds the limit of "
                                f"{self.limits.max_question_chars} (--max-question-chars)", status=413)
        if options is not None:
            if len(options) > self.limits.max_options:
                raise LimitExceeded(f"{len(options)} options exceed the limit of {self.limits.max_options}", status=413)
            if any(not isinstance(o, str) or not o.strip() or len(o) > self.limits.max_question_chars for o in options):
                raise InputError("options must be non-empty strings no longer than a question")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not (
                1 <= max_new_tokens <= self.limits.max_new_tokens):
            raise InputError(f"max_new_tokens must be an int in [1, {self.limits.max_new_tokens}], got {max_new_tokens!r}")
        if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int)
                                         or not 1 <= top_logprobs <= 20):
            raise InputError(f"top_logprobs must be None or an int in [1, 20], got {top_logprobs!r}")
        with self._lock:
            stream = self._get(stream_id)
            if stream.state == "closed":
                raise StreamClosed(f"stream {stream_id} is closed")
            future: Future = Future()
            stream.questions.append(_Question(question, list(options) if options else None, max_new_tokens,
                                              stream.queued, sync, top_logprobs, future))
            self._lock.notify_all()
        return future

    def delete(self, stream_id: str) -> None:
        """Stop a stream: its reader stops, queued work is dropped, pending questions fail."""
        with self._lock:
            stream = self._streams.pop(self._get(stream_id).id)
            self._lock.notify_all()
        self._finish(stream)
        with self._lock:  # the hook runs on the worker, after the stream's last unit of work
            self._control.append(lambda: self._closed(stream, None))
            self._lock.notify_all()

    def resume(self) -> list[Future]:
        """Register the streams saved in `persist_dir` again (once, at start); each future resolves
        to the stream's description once its session is loaded. A stream whose source is no longer
        allowed, or past the stream limit, is skipped with a warning and its save kept."""
        futures: list[Future] = []
        for record, saved in self.store.saved() if self.store is not None else []:
            data = record["spec"]
            data.setdefault("memory", "window" if data.get("window_tokens") else "full")  # saves before memories
            stc = None if data["stc"] is None else STCConfig.from_dict(data["stc"])
            spec = StreamSpec(**{**data, "stc": stc})
            try:
                location = self.sources.resolve(spec.source) if spec.source is not None else None
            except StreamTCError as error:
                logger.warning("not resuming stream %s: %s", record["id"], error)
                continue
            finished = record["state"] if record["state"] in ("ended", "error") else None
            with self._lock:
                self._check_open()
                if len(self._streams) >= self.limits.max_streams:
                    logger.warning("not resuming stream %s: the server holds its limit of streams", record["id"])
                    continue
                stream = _Stream(id=record["id"], spec=spec, created=record["created"])
                if spec.source is None:
                    stream.sampler = FrameSampler(spec.fps)
                self._streams[stream.id] = stream
                self._control.append(lambda stream=stream, key=(stc, *self.memory.resolve(spec)), saved=saved,
                                     finished=finished, location=location:
                                     self._start(stream, key, None if finished else location, saved, finished))
                self._lock.notify_all()
            futures.append(stream.ready)
        return futures

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._describe(s) for s in self._streams.values()]

    def describe(self, stream_id: str) -> dict[str, Any]:
        with self._lock:
            return self._describe(self._get(stream_id))

    def events_after(self, stream_id: str, seq: int) -> tuple[list[dict[str, Any]], int]:
        """Events numbered above `seq` (oldest first) and the newest number."""
        with self._lock:
            stream = self._get(stream_id)
            return [e for e in stream.events if e["seq"] > seq], stream.event_seq

    def latest_frame(self, stream_id: str) -> np.ndarray | None:
        with self._lock:
            return self._get(stream_id).last_frame

    def close(self) -> None:
        """Graceful shutdown: stop accepting work, close every stream (`on_close` hook), stop the
        worker after its current unit of work, detach the Cachers."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            streams = list(self._streams.values())
            records = {stream.id: self._record(stream) for stream in streams}
            self._streams.clear()
            self._lock.notify_all()
        for stream in streams:
            self._finish(stream)
        self._worker.join(timeout=60)  # its current unit of work, then it stops
        for stream in streams:
            self._closed(stream, records[stream.id])
        for root in self._roots.values():
            root.close()
        logger.info("shut down: closed %d open streams", len(streams))

    # -- internals (lock held where noted) -------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise StreamClosed("the server is shutting down")

    def _get(self, stream_id: str) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamNotFound(f"no stream {stream_id!r}; GET /v1/streams lists the open ones")
        return stream

    def _describe(self, stream: _Stream) -> dict[str, Any]:
        spec = stream.spec
        stc = self.default_stc if spec.stc == "default" else spec.stc
        memory, window_tokens = self.memory.resolve(spec)
        return {
            "id": stream.id, "name": spec.name, "source": spec.source, "kind": "push" if spec.source is None else "source",
            "state": stream.state, "error": stream.error, "created": stream.created, "fps": spec.fps,
            "stc": None if stc is None else stc.to_dict(), "memory": memory, "window_tokens": window_tokens,
            "realtime": spec.realtime, "loop": spec.loop, "frames_queued": stream.queued, "frames_done": stream.done,
            "frames_waiting": len(stream.frames), "frames_dropped": stream.dropped,
            "questions_waiting": len(stream.questions), "last_timestamp": stream.last_timestamp,
            "stats": stream.stats,
        }

    def _record(self, stream: _Stream) -> dict[str, Any]:
        """(Lock held.) What `StreamStore` keeps of a stream besides its session: its settings
        (STC and memory resolved, so a restart with other defaults keeps them) and its state."""
        spec = stream.spec
        stc = self.default_stc if spec.stc == "default" else spec.stc
        memory, window_tokens = self.memory.resolve(spec)
        return {"id": stream.id, "created": stream.created, "state": stream.state, "spec": {
            "source": spec.source, "fps": spec.fps, "stc": None if stc is None else stc.to_dict(),
            "memory": memory, "window_tokens": window_tokens, "realtime": spec.realtime, "loop": spec.loop,
            "max_seconds": spec.max_seconds, "name": spec.name}}

    def _emit(self, stream: _Stream, event: dict[str, Any]) -> None:
        """Record an event (lock held) and tell the listener."""
        stream.event_seq += 1
        event = {"seq": stream.event_seq, "stream": stream.id, **event}
        stream.events.append(event)
        if self.listener is not None:
            try:
                self.listener(stream.id, event)
            except Exception:  # a broken listener must not stop the model
                logger.exception("event listener failed")

    def _enqueue_locked(self, stream: _Stream, image: np.ndarray, timestamp: float) -> None:
        stream.frames.append((image, timestamp, stream.queued))
        stream.queued += 1
        self._lock.notify_all()

    def _finish(self, stream: _Stream) -> None:
        """Close a stream removed from the registry: stop its reader, drop its frames, fail its questions."""
        stream.stop.set()
        with self._lock:
            stream.state = "closed"
            stream.frames.clear()
            questions = list(stream.questions)
            stream.questions.clear()
            self._emit(stream, {"type": "state", "state": "closed"})
            self._lock.notify_all()
        for question in questions:
            if question.future.set_running_or_notify_cancel():
                question.future.set_exception(StreamClosed(f"stream {stream.id} was closed before the answer"))
        if not stream.ready.done() and stream.ready.set_running_or_notify_cancel():
            stream.ready.set_exception(StreamClosed(f"stream {stream.id} was closed while starting"))

    def _closed(self, stream: _Stream, record: dict[str, Any] | None) -> None:
        """A finished stream (no model work on it runs any more): saved with `record` at shutdown or
        its save forgotten on delete (record None), the `on_close` hook, then the session's close
        (the Cacher is detached once the last session sharing it closes)."""
        if stream.session is None:
            return
        if self.store is not None:
            try:
                if record is None:
                    self.store.forget(stream.id)
                else:
                    self.store.save(record, stream.session)
            except Exception:  # one stream's failed save must not stop the others'
                logger.exception("stream %s could not be saved", stream.id)
        if self.on_close is not None:
            with self._lock:
                info = self._describe(stream)
            self.on_close(info, stream.session)
        stream.session.close()

    # -- worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        while True:
            with self._lock:
                job = self._next_job()
                while job is None and not self._closing:
                    self._lock.wait()
                    job = self._next_job()
                if job is None:
                    return
            try:
                job()
            except Exception:  # each job reports its own errors; this keeps the worker alive regardless
                logger.exception("model worker job failed")

    def _next_job(self) -> Callable[[], None] | None:
        """The next unit of work (lock held): creation first, then one stream's turn."""
        if self._control:
            return self._control.popleft()
        order = [s for s in self._streams.values() if s.session is not None]
        for step in range(len(order)):
            stream = order[(self._turn + step) % len(order)]
            question = next((q for q in stream.questions if self._ready(stream, q)), None)
            if question is not None:
                stream.questions.remove(question)
                self._turn = (self._turn + step + 1) % len(order)
                return lambda: self._answer(stream, question)
            if stream.frames:
                frame = stream.frames.popleft()
                self._turn = (self._turn + step + 1) % len(order)
                self._lock.notify_all()  # a reader waiting for queue space
                return lambda: self._process(stream, *frame)
        return None

    @staticmethod
    def _ready(stream: _Stream, question: _Question) -> bool:
        """Whether a question can be answered now: a sync question once the frames queued before
        it are processed; any other once the stream has a frame (or none is coming yet)."""
        if question.sync:
            return stream.done >= question.after
        return stream.done > 0 or not stream.frames

    def _start(self, stream: _Stream, key: tuple[STCConfig | None, str, int | None], location: str | Path | None,
               saved: Path | None = None, finished: str | None = None) -> None:
        """Worker: spawn the stream's session (making its model view first if needed), loaded from
        `saved` for a resumed stream (`finished`: the state of a source that had ended)."""
        try:
            root = self._roots.get(key)
            if root is None:
                root = self._make_root(*key)
                self._roots[key] = root
            session = root.spawn()
            if saved is not None:
                try:
                    session.load(saved)
                except BaseException:
                    session.close()
                    raise
        except Exception as error:  # settings the model rejects: this stream fails, nothing else
            logger.exception("stream %s could not start", stream.id)
            with self._lock:
                self._streams.pop(stream.id, None)
                stream.state, stream.error = "error", str(error)
            if stream.ready.set_running_or_notify_cancel():
                stream.ready.set_exception(error)
            return
        with self._lock:
            if stream.state == "closed":
                return
            stream.session, stream.state = session, finished or "playing"
            if saved is not None:  # resumed: counters and the sampling grid continue
                stream.queued = stream.done = session.frames
                stream.last_timestamp = session.last_timestamp
                if stream.sampler is not None and stream.last_timestamp is not None:
                    stream.sampler.take(stream.last_timestamp)
                if finished:
                    stream.source_end = (finished, None)
            stream.stats = session.stats.to_dict()
            self._emit(stream, {"type": "state", "state": stream.state})
            info = self._describe(stream)
        if location is not None:
            threading.Thread(target=self._read, args=(stream, location, stream.last_timestamp),
                             name=f"streamtc-read-{stream.id}", daemon=True).start()
        if stream.ready.set_running_or_notify_cancel():
            stream.ready.set_result(info)

    def _make_root(self, stc: STCConfig | None, memory: str, window_tokens: int | None) -> StreamingSession:
        """A root session for these settings: the loaded model without a Cacher, else a view."""
        policy = self.memory.policy(memory, window_tokens)
        return derive_session(self.base, Variant("STC" if stc is not None else "no STC", stc=stc), share_weights=True,
                              cache_policy=policy)

    def _process(self, stream: _Stream, image: np.ndarray, timestamp: float, number: int) -> None:
        """Worker: one frame through the stream's session, and its event."""
        session = stream.session
        before = session.stats
        try:
            session.push(image[None], [timestamp])
            after = session.stats
        except Exception as error:  # a frame the model rejects fails alone
            logger.warning("stream %s: frame %d failed: %s", stream.id, number, error)
            with self._lock:
                stream.done = number + 1
                self._emit(stream, {"type": "error", "frame": number, "timestamp": timestamp, "error": str(error)})
            return
        event = self._frame_event(session, before, after, number, timestamp, self._kv_bytes_per_token)
        with self._lock:
            stream.done = number + 1
            stream.last_frame, stream.stats = image, after.to_dict()
            if stream.spec.source is not None:
                stream.last_timestamp = timestamp
            if stream.state != "closed":
                self._emit(stream, event)
                self._end_if_drained(stream)

    @staticmethod
    def _frame_event(session: StreamingSession, before: Any, after: Any, number: int, timestamp: float,
                     kv_bytes_per_token: int) -> dict:
        """Per-frame event: timings, the Cacher's recomputation, the Pruner's kept positions, and
        the tokens the stream holds (in the KV cache, plus kept tokens waiting for their pre-fill).

        Token maps are of the first pruner frame of the chunk the frame completed (None when it
        completed none, e.g. the first frame of a Qwen-VL temporal patch): `pruner.kept`, positions
        in the pruner's [rows, cols] grid; `cacher.recomputed`, per cell of the tower's patch grid
        [rows, cols] (row-major), in how many of the `layers` layers the Cacher recomputed that
        token (None when the chunk refreshed: every token in every layer)."""
        encoded = after.visual_tokens_encoded - before.visual_tokens_encoded
        cacher = None
        if after.cacher is not None:
            tokens = after.cacher["tokens_per_frame"]
            recomputed = after.cacher["recomputed_tokens_per_layer"]
            previous = (before.cacher or {}).get("recomputed_tokens_per_layer") or [0] * len(recomputed)
            record = session.last_recomputed if encoded else None
            counts = None if record is None else record.counts()
            cacher = {
                "refresh": after.cacher["refresh_chunks"] > (before.cacher or {}).get("refresh_chunks", 0),
                "recomputed_per_layer": [a - b for a, b in zip(recomputed, previous)],
                "tokens": tokens, "layers": len(recomputed),
                "grid": None if record is None else list(record.grid),
                "recomputed": None if counts is None else counts[0].tolist(),
            }
        kept = session.last_kept_indices if encoded else None
        grid = session.last_pruner_grid
        return {
            "type": "frame", "frame": number, "timestamp": timestamp,
            "vit_ms": after.vit_ms - before.vit_ms, "prune_ms": after.prune_ms - before.prune_ms,
            "prefill_ms": after.prefill_ms - before.prefill_ms,
            "pruner": None if kept is None else {"kept": kept[0], "tokens": encoded, "grid": list(grid)},
            "cacher": cacher,
            "tokens_encoded": encoded, "tokens_kept": encoded if kept is None else len(kept[0]),
            "cache_tokens": after.kv_cache_bytes // kv_bytes_per_token + after.pending_tokens,
            "visual_tokens": after.visual_tokens,
            "pending_tokens": after.pending_tokens, "kv_cache_bytes": after.kv_cache_bytes,
        }

    def _answer(self, stream: _Stream, question: _Question) -> None:
        """Worker: answer one question on the stream's video so far."""
        if not question.future.set_running_or_notify_cancel():
            return  # the client went away before its turn
        queue_ms = (time.perf_counter() - question.queued) * 1e3
        try:
            answer = stream.session.ask(question.text, question.options, max_new_tokens=question.max_new_tokens)
            top = None
            if question.top_logprobs:
                logprobs = stream.session.next_token_logits(question.text, question.options).log_softmax(-1)
                values, ids = logprobs.topk(question.top_logprobs)
                top = [{"token_id": i, "logprob": v} for i, v in zip(ids.tolist(), values.tolist())]
        except Exception as error:
            question.future.set_exception(error)
            with self._lock:
                self._emit(stream, {"type": "error", "question": question.text, "error": str(error)})
            return
        result = {**answer.to_dict(), "queue_ms": queue_ms, "latency_ms": queue_ms + answer.total_ms,
                  "options": question.options, "stream": stream.id, "top_logprobs": top}
        with self._lock:
            stream.stats = stream.session.stats.to_dict()
            self._emit(stream, {"type": "answer", **result})
        question.future.set_result(result)

    # -- server-read sources (one reader thread per stream) -----------------------------------

    def _read(self, stream: _Stream, location: str | Path, resume_after: float | None = None) -> None:
        """Read the stream's source into its queue (waiting for space), paced when realtime; a
        resumed stream skips the frames up to stream time `resume_after` (already processed)."""
        spec, offset, reason = stream.spec, 0.0, None
        try:
            while not stream.stop.is_set():
                source = open_source(location, fps=spec.fps, max_seconds=spec.max_seconds)
                started, last = time.monotonic(), 0.0
                try:
                    for frame in source:
                        last = frame.timestamp
                        if resume_after is not None:
                            if offset + frame.timestamp <= resume_after + 1e-9:
                                continue
                            resume_after, started = None, time.monotonic() - frame.timestamp  # paced from here
                        if spec.realtime and stream.stop.wait(max(0.0, started + frame.timestamp - time.monotonic())):
                            break
                        if not self._enqueue_blocking(stream, frame.image, offset + frame.timestamp):
                            break
                finally:
                    source.close()
                if source.ended_early:
                    reason = source.error
                if not spec.loop or reason:
                    break
                offset += last + 1.0 / spec.fps
        except StreamTCError as error:  # cannot open / decode: this stream only
            reason = str(error)
        with self._lock:
            stream.source_end = ("error", reason) if reason else ("ended", None)
            self._end_if_drained(stream)

    def _end_if_drained(self, stream: _Stream) -> None:
        """(Lock held.) Once the reader is done and its frames are processed, the stream ends."""
        if stream.source_end is None or stream.frames or stream.done < stream.queued or stream.state != "playing":
            return
        stream.state, stream.error = stream.source_end
        self._emit(stream, {"type": "state", "state": stream.state, "error": stream.error})

    def _enqueue_blocking(self, stream: _Stream, image: np.ndarray, timestamp: float) -> bool:
        """Queue a frame read by the server, waiting while the queue is full; False once stopped."""
        with self._lock:
            while len(stream.frames) >= self.limits.max_queue_frames and not stream.stop.is_set():
                self._lock.wait(0.5)
            if stream.stop.is_set():
                return False
            self._enqueue_locked(stream, image, timestamp)
            return True


def resident_memory_bytes() -> int:
    """The process's resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


__all__ = [
    "AccessDenied", "Engine", "LimitExceeded", "ServeError", "ServeLimits", "ServeMemory", "SourcePolicy",
    "StreamClosed", "StreamNotFound", "StreamSpec", "decode_frame", "encode_jpeg", "origin_of", "resident_memory_bytes",
]
