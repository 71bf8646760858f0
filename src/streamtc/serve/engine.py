"""The model side of `streamtc serve`: one loaded model, one `StreamingSession` per stream, and a
scheduler that serves the model to the streams fairly from a single worker thread.

    engine = Engine(StreamingSession.from_preset("tiny-llava-ov", stc=None), default_stc=STCConfig())
    stream = engine.create_stream(StreamSpec(source="demo", fps=1.0)).result()   # a server-read source
    push = engine.create_stream(StreamSpec()).result()                           # a push stream
    engine.push_frame(push["id"], image, timestamp=0.0)
    answer = engine.ask(stream["id"], "What is happening?").result()
    engine.close()

Threads. Model work (session creation, frames, questions, checkpoints) runs on one worker thread: a
model is not safe to call from two threads at once, and one thread keeps every stream's results
identical to the same stream served alone. Callers (the asyncio HTTP front, reader threads of
server-read sources) only queue work and get `concurrent.futures.Future`s back.

Scheduling. Streams take turns, round robin, one unit of work per turn: a due checkpoint, else a
question when the stream has one ready, else one queued frame (one chunk). A question therefore
jumps the frames queued on its own stream (it is answered on the video processed so far), and no
stream waits for more than one unit of every other stream. A question asked with `sync=True` waits
instead until the frames queued before it are processed (deterministic replays, tests). Stream
creation is served before the round.

Model views. Each `StreamingSession` attaches its STC-Cacher to the model it is given, and a model
holds one Cacher. The engine keeps the loaded model untouched (the no-STC streams run on it) and
gives every distinct (STC settings, memory policy) a *view*: a copy of the module tree whose
parameters and buffers are the loaded model's own tensors (no weights copied), with its own
Cacher. Streams with those settings are spawned from that view's root session; a view is released
when its last stream closes, and `max_model_views` bounds the views of the open streams.

Events. Each stream keeps its recent events (a frame processed, an answer, a state change)
numbered from 1; `events_after` returns those newer than a number, and the `listener` callback is
called (from whichever thread produced the event) so an async front can wake its subscribers.

Persistence (docs/persistence.md). With `persist_dir`, a graceful shutdown saves every stream
(`StreamStore`); with `checkpoint_every` as well, each stream that changed is saved that often: its
files are written as one unit of its turn and committed (hashed, fsynced) by a writer thread while
it goes on. `resume()` restores every saved stream's newest complete save under its id and logs what
it restored and what may be lost. Deleting a stream removes its save. `on_close(info, session)` is
called for every stream closed (at shutdown and on delete).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import STCConfig
from ..errors import ConfigError, InputError, StreamTCError
from ..factory import derive_session
from ..session import StreamingSession
from ..variants import Variant
from .errors import LimitExceeded, StreamClosed, StreamNotFound
from .events import frame_event
from .frames import check_side
from .offload import OwnedOffloadDir
from .reader import read_source
from .settings import ServeLimits, ServeMemory, SourcePolicy, StreamSpec
from .store import PendingSave, SaveWriter, StreamStore, restored_note
from .streams import Question, ServedStream, ViewKey

logger = logging.getLogger(__name__)

IDLE_TICK_S = 0.25  # how often an idle worker looks for a due checkpoint


class Engine:
    """Streams on one loaded model, served by one worker thread (see the module docstring).

    base: a session on the loaded model without STC (`stc=None`); its model is never patched.
    default_stc: what a stream with stc="default" gets (None: no STC).
    listener: called as listener(stream_id, event) after every event (from any thread).
    on_close: called as on_close(info, session) for each stream closed (shutdown or delete).
    memory: the streams' LLM memory (`ServeMemory`: full by default); with an offload_dir, the
        streams' folders go in one folder this engine owns there (`OwnedOffloadDir`).
    persist_dir: save streams here at shutdown (and `resume()` them at the next start); None: not saved.
    checkpoint_every: with persist_dir, also save each changed stream this often (seconds; None: only
        at shutdown).
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
        checkpoint_every: float | None = None,
        threads: int | None = None,
        id_prefix: str = "",
    ) -> None:
        if base.stc is not None:
            raise ConfigError("the engine's base session must run without STC (stc=None); STC is set per stream")
        if checkpoint_every is not None and (persist_dir is None or not checkpoint_every > 0):
            raise ConfigError(f"checkpoint_every must be None or > 0 seconds, with persist_dir; got {checkpoint_every!r}")
        self.base = base
        self.default_stc = default_stc
        self.limits = limits
        self.sources = sources
        self._offload = None if memory.offload_dir is None else OwnedOffloadDir(memory.offload_dir)
        self.memory = memory if self._offload is None else dataclasses.replace(memory, offload_dir=self._offload.path)
        self.listener = listener
        self.on_close = on_close
        self.store = None if persist_dir is None else StreamStore(persist_dir)
        self._writer = SaveWriter()
        self.checkpoint_every = checkpoint_every
        self.id_prefix = id_prefix
        self._base_key: ViewKey = (None, "full", None)
        self._roots: dict[ViewKey, StreamingSession] = {self._base_key: base}
        text = base.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # keys and values of one token in every layer: turns the cache's bytes into tokens held
        self._kv_bytes_per_token = (2 * text.num_hidden_layers * text.num_key_value_heads * head_dim
                                    * base.model.dtype.itemsize)
        self._streams: dict[str, ServedStream] = {}
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
        Raises at once for a refused source (AccessDenied, InputError) or a limit (streams, views)."""
        location = self.sources.resolve(spec.source) if spec.source is not None else None
        stc = self.default_stc if spec.stc == "default" else spec.stc
        key: ViewKey = (stc, *self.memory.resolve(spec))
        with self._lock:
            self._check_open()
            if len(self._streams) >= self.limits.max_streams:
                raise LimitExceeded(f"the server holds its limit of {self.limits.max_streams} streams "
                                    "(--max-streams); delete one first")
            views = {s.key for s in self._streams.values()} | {key}
            if sum(1 for k in views if k[0] is not None and k[0].cacher is not None) > self.limits.max_model_views:
                raise LimitExceeded(f"the open streams use the limit of {self.limits.max_model_views} distinct STC "
                                    "settings (--max-model-views); use settings an open stream uses, or close one")
            stream = ServedStream(id=self.id_prefix + secrets.token_hex(4), spec=spec, key=key, created=time.time())
            self._streams[stream.id] = stream
            self._control.append(lambda: self._start(stream, location))
            self._lock.notify_all()
        return stream.ready

    def push_frame(self, stream_id: str, image: np.ndarray, timestamp: float | None = None) -> dict[str, Any]:
        """Queue a client's frame on a push stream; frames between the stream's fps instants are
        dropped (sampled by timestamp, seconds; None: time since the stream's first frame)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise InputError(f"a frame must be RGB uint8 [H, W, 3], got {image.dtype} {image.shape}")
        check_side(image.shape[1], image.shape[0], self.limits)
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
            max_new_tokens: int | None = None, sync: bool = False, top_logprobs: int | None = None,
            on_token: Callable[[str], None] | None = None) -> Future:
        """Queue a question; the future resolves to the answer's dict (timings in ms, queue_ms
        included). sync: answer after the frames queued before it (else on the video so far).
        top_logprobs: also return the k most likely first answer tokens with their log-probabilities
        (one more question pre-fill). max_new_tokens: None is 32, or the limit if lower.
        on_token: called on the worker with the text each answer token adds, as it is generated."""
        max_new_tokens = self.limits.check_question(question, options, max_new_tokens, top_logprobs)
        with self._lock:
            stream = self._get(stream_id)
            if stream.state == "closed":
                raise StreamClosed(f"stream {stream_id} is closed")
            future: Future = Future()
            stream.questions.append(Question(question, list(options) if options else None, max_new_tokens,
                                             stream.queued, sync, top_logprobs, future, on_token))
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
            with self._lock:
                self._check_open()
                if len(self._streams) >= self.limits.max_streams:
                    logger.warning("not resuming stream %s: the server holds its limit of streams", record["id"])
                    continue
                stream = ServedStream(id=record["id"], spec=spec, key=(stc, *self.memory.resolve(spec)),
                                      created=record["created"])
                self._streams[stream.id] = stream
                self._control.append(lambda stream=stream, location=location, saved=(record, saved):
                                     self._start(stream, location, saved))
                self._lock.notify_all()
            futures.append(stream.ready)
        return futures

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.describe() for s in self._streams.values()]

    def describe(self, stream_id: str) -> dict[str, Any]:
        with self._lock:
            return self._get(stream_id).describe()

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
            records = {stream.id: stream.record("shutdown") for stream in streams}
            self._streams.clear()
            self._lock.notify_all()
        for stream in streams:
            self._finish(stream)
        self._worker.join(timeout=60)  # its current unit of work, then it stops
        self._writer.close()  # the checkpoints in flight are committed before the shutdown saves
        for stream in streams:
            self._closed(stream, records[stream.id])
        for root in self._roots.values():
            root.close()
        if self._offload is not None:
            self._offload.release()
        logger.info("shut down: closed %d open streams", len(streams))

    # -- internals (lock held where noted) -------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise StreamClosed("the server is shutting down")

    def _get(self, stream_id: str) -> ServedStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamNotFound(f"no stream {stream_id!r}; GET /v1/streams lists the open ones")
        return stream

    def _emit(self, stream: ServedStream, event: dict[str, Any]) -> None:
        """Record an event (lock held) and tell the listener."""
        event = stream.emit(event)
        if self.listener is not None:
            try:
                self.listener(stream.id, event)
            except Exception:  # a broken listener must not stop the model
                logger.exception("event listener failed")

    def _enqueue_locked(self, stream: ServedStream, image: np.ndarray, timestamp: float, codec: Any = None) -> None:
        """(Lock held.) Queue a frame with its number and the decoder's side data (None for pushed images)."""
        stream.frames.append((image, timestamp, stream.queued, codec))
        stream.queued += 1
        self._lock.notify_all()

    def _finish(self, stream: ServedStream) -> None:
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

    def _closed(self, stream: ServedStream, record: dict[str, Any] | None) -> None:
        """A finished stream (no model work on it runs any more): saved with `record` at shutdown or
        its save forgotten on delete (record None), the `on_close` hook, then the session's close
        (the Cacher is detached once the last session sharing it closes) and its view's release."""
        if stream.session is None:
            self._release_views()
            return
        if self.store is not None and record is None:
            self._writer.submit(lambda: self.store.forget(stream.id))  # after its checkpoints' commits
        elif self.store is not None:
            try:
                self.store.save(record, stream.session)
            except Exception:  # one stream's failed save must not stop the others'
                logger.exception("stream %s could not be saved", stream.id)
        if self.on_close is not None:
            with self._lock:
                info = stream.describe()
            self.on_close(info, stream.session)
        stream.session.close()
        if record is None:
            self._release_views()

    def _release_views(self) -> None:
        """Worker: close the root sessions (model views) that no open or starting stream uses."""
        with self._lock:
            used = {s.key for s in self._streams.values()}
            unused = [key for key in self._roots if key != self._base_key and key not in used]
            roots = [self._roots.pop(key) for key in unused]
        for root in roots:
            root.close()

    # -- worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        tick = IDLE_TICK_S if self.checkpoint_every is not None else None  # idle streams' checkpoints fall due
        while True:
            with self._lock:
                job = self._next_job()
                while job is None and not self._closing:
                    self._lock.wait(tick)
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
        now = time.monotonic()
        for step in range(len(order)):
            stream = order[(self._turn + step) % len(order)]
            job = self._turn_job(stream, now)
            if job is not None:
                self._turn = (self._turn + step + 1) % len(order)
                return job
        return None

    def _turn_job(self, stream: ServedStream, now: float) -> Callable[[], None] | None:
        """(Lock held.) A stream's unit of work: a due checkpoint, a ready question, or a frame."""
        if (self.checkpoint_every is not None and stream.mark != stream.saved and not stream.writing
                and now - stream.saved_at >= self.checkpoint_every):
            return lambda: self._checkpoint(stream)
        question = next((q for q in stream.questions if stream.can_answer(q)), None)
        if question is not None:
            stream.questions.remove(question)
            return lambda: self._answer(stream, question)
        if stream.frames:
            frame = stream.frames.popleft()
            self._lock.notify_all()  # a reader waiting for queue space
            return lambda: self._process(stream, *frame)
        return None

    def _start(self, stream: ServedStream, location: str | Path | None,
               saved: tuple[dict[str, Any], Path] | None = None) -> None:
        """Worker: spawn the stream's session (making its model view first if needed), loaded from
        the (record, session directory) `saved` for a resumed stream, and start its reader."""
        try:
            session = self._spawn(stream.key, None if saved is None else saved[1])
        except Exception as error:  # settings the model rejects: this stream fails, nothing else
            logger.exception("stream %s could not start", stream.id)
            with self._lock:
                self._streams.pop(stream.id, None)
                stream.state, stream.error = "error", str(error)
            self._release_views()
            if stream.ready.set_running_or_notify_cancel():
                stream.ready.set_exception(error)
            return
        finished = None if saved is None or saved[0]["state"] not in ("ended", "error") else saved[0]["state"]
        with self._lock:
            if stream.state == "closed":
                return
            stream.session, stream.state = session, finished or "playing"
            if saved is not None:  # resumed: counters and the sampling grid continue; its save is current
                self._restored(stream, session, saved[0], finished)
                stream.saved, stream.saved_at = stream.mark, time.monotonic()
            stream.stats = session.stats.to_dict()
            self._emit(stream, {"type": "state", "state": stream.state})
            info = stream.describe()
        if location is not None and not finished:
            threading.Thread(target=self._read, args=(stream, location, stream.last_timestamp),
                             name=f"streamtc-read-{stream.id}", daemon=True).start()
        if stream.ready.set_running_or_notify_cancel():
            stream.ready.set_result(info)

    def _spawn(self, key: ViewKey, saved: Path | None) -> StreamingSession:
        """Worker: a session for a stream with these settings, from its view's root (made now if it
        is the first), loaded from the session save `saved` if given."""
        root = self._roots.get(key)
        if root is None:
            stc, memory, window_tokens = key
            root = derive_session(self.base, Variant("STC" if stc is not None else "no STC", stc=stc),
                                  share_weights=True, cache_policy=self.memory.policy(memory, window_tokens))
            self._roots[key] = root
        session = root.spawn()
        if saved is not None:
            try:
                session.load(saved)
            except BaseException:
                session.close()
                raise
        return session

    def _restored(self, stream: ServedStream, session: StreamingSession, record: dict[str, Any],
                  finished: str | None) -> None:
        """(Lock held.) A resumed stream continues its counters and sampling grid; what was restored
        and what may be lost is logged, shown in its description, and marked in its save."""
        stream.queued = stream.done = session.frames
        stream.last_timestamp = session.last_timestamp
        if stream.sampler is not None and stream.last_timestamp is not None:
            stream.sampler.take(stream.last_timestamp)
        if finished:
            stream.source_end = (finished, None)
        level, line, stream.restored = restored_note(record, session)
        logger.log(level, "%s", line)
        self._emit(stream, {"type": "restored", **stream.restored})
        try:
            self.store.mark_resumed(record)
        except OSError:
            logger.exception("stream %s: could not mark its save as resumed", stream.id)

    def _checkpoint(self, stream: ServedStream) -> None:
        """Worker: write the save of a stream that changed since its last one, between two of its
        units of work (so it is consistent); the writer thread commits it (hashes, fsyncs) while the
        stream goes on. A failed save is logged and tried again an interval later."""
        with self._lock:
            if stream.state == "closed":
                return
            record, mark, stream.writing = stream.record("checkpoint"), stream.mark, True
        started = time.perf_counter()
        try:
            pending = self.store.begin(record, stream.session)
        except Exception:
            logger.exception("stream %s: checkpoint failed; trying again in %s s", stream.id, self.checkpoint_every)
            pending, mark = None, stream.saved
        with self._lock:
            stream.saved, stream.saved_at, stream.writing = mark, time.monotonic(), pending is not None
            stream.checkpoint_ms = (time.perf_counter() - started) * 1e3
        if pending is not None:
            self._writer.submit(lambda: self._commit(stream, pending))

    def _commit(self, stream: ServedStream, pending: PendingSave) -> None:
        """Writer thread: commit a checkpoint (a failed one is written again at the next interval)."""
        try:
            pending.commit()
        except Exception:
            logger.exception("stream %s: checkpoint failed; trying again in %s s", stream.id, self.checkpoint_every)
            with self._lock:
                stream.saved = None
        finally:
            with self._lock:
                stream.writing = False

    def _process(self, stream: ServedStream, image: np.ndarray, timestamp: float, number: int, codec: Any) -> None:
        """Worker: one frame (with its codec side data, if the server decoded it) through the stream's
        session, and its event."""
        session = stream.session
        before = session.stats
        try:
            session.push(image[None], [timestamp], codec=[codec])
            after = session.stats
        except Exception as error:  # a frame the model rejects fails alone
            logger.warning("stream %s: frame %d failed: %s", stream.id, number, error)
            with self._lock:
                stream.done = number + 1
                self._emit(stream, {"type": "error", "frame": number, "timestamp": timestamp, "error": str(error)})
            return
        event = frame_event(session, before, after, number, timestamp, self._kv_bytes_per_token)
        with self._lock:
            stream.done = number + 1
            stream.last_frame, stream.stats = image, after.to_dict()
            if stream.spec.source is not None:
                stream.last_timestamp = timestamp
            if stream.state != "closed":
                self._emit(stream, event)
                self._end_if_drained(stream)

    def _answer(self, stream: ServedStream, question: Question) -> None:
        """Worker: answer one question on the stream's video so far."""
        if not question.future.set_running_or_notify_cancel():
            return  # the client went away before its turn
        queue_ms = (time.perf_counter() - question.queued) * 1e3
        try:
            if stream.session.frames == 0:
                raise InputError(stream.nothing_to_answer())
            answer = stream.session.ask(question.text, question.options, max_new_tokens=question.max_new_tokens,
                                        on_token=question.on_token)
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

    def _read(self, stream: ServedStream, location: str | Path, resume_after: float | None = None) -> None:
        """Reader thread: the stream's source into its queue (`read_source`), then its end."""
        reason = read_source(stream.spec, location, stream.stop, lambda image, timestamp, codec:
                             self._enqueue_blocking(stream, image, timestamp, codec), resume_after)
        with self._lock:
            stream.source_end = ("error", reason) if reason else ("ended", None)
            self._end_if_drained(stream)

    def _end_if_drained(self, stream: ServedStream) -> None:
        """(Lock held.) Once the reader is done and its frames are processed, the stream ends."""
        if stream.source_end is None or stream.frames or stream.done < stream.queued or stream.state != "playing":
            return
        stream.state, stream.error = stream.source_end
        self._emit(stream, {"type": "state", "state": stream.state, "error": stream.error})

    def _enqueue_blocking(self, stream: ServedStream, image: np.ndarray, timestamp: float, codec: Any) -> bool:
        """Queue a frame read by the server, waiting while the queue is full; False once stopped."""
        with self._lock:
            while len(stream.frames) >= self.limits.max_queue_frames and not stream.stop.is_set():
                self._lock.wait(0.5)
            if stream.stop.is_set():
                return False
            self._enqueue_locked(stream, image, timestamp, codec)
            return True


__all__ = ["Engine"]
