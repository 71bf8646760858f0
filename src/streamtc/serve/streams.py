"""One served stream's state in the engine (`ServedStream`) and its queued questions: what the
scheduler reads and the front describes. Fields are guarded by the engine's lock."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import STCConfig
from ..session import StreamingSession
from ..sources import FrameSampler
from .settings import StreamSpec

EVENTS_KEPT = 512  # recent events kept per stream for subscribers that join or fall behind

ViewKey = tuple[STCConfig | None, str, int | None]  # (STC settings, memory, window): one model view each


@dataclass
class Question:
    """A question waiting for the model."""

    text: str
    options: list[str] | None
    max_new_tokens: int
    after: int  # frames queued on the stream before the question (sync questions wait for them)
    sync: bool
    top_logprobs: int | None
    future: Future
    on_token: Any = None  # called with each answer token's text as it is generated (streamed answers)
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class ServedStream:
    """A stream: its settings, its session once started, its queues, counters and recent events."""

    id: str
    spec: StreamSpec
    key: ViewKey
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
    saved: tuple[int, str] | None = None  # (frames done, state) of the last save
    saved_at: float = -math.inf  # time.monotonic() of the last save; none yet: a new stream's first is due at once
    restored: dict[str, Any] | None = None  # what a restart restored (see `store.restored_note`)
    checkpoint_ms: float | None = None  # how long the last checkpoint held the stream
    writing: bool = False  # a checkpoint of it is being committed

    def __post_init__(self) -> None:
        if self.spec.source is None:
            self.sampler = FrameSampler(self.spec.fps)

    @property
    def mark(self) -> tuple[int, str]:
        """What a save of the stream now would hold: its processed frames and its state."""
        return self.done, self.state

    def can_answer(self, question: Question) -> bool:
        """Whether a question can be answered now: a sync question once the frames queued before
        it are processed; any other once the stream has a frame (or none is coming yet)."""
        if question.sync:
            return self.done >= question.after
        return self.done > 0 or not self.frames

    def emit(self, event: dict[str, Any]) -> dict[str, Any]:
        """Number and keep an event; returns it as subscribers see it."""
        self.event_seq += 1
        event = {"seq": self.event_seq, "stream": self.id, **event}
        self.events.append(event)
        return event

    def describe(self) -> dict[str, Any]:
        """The stream as the API shows it."""
        spec, (stc, memory, window_tokens) = self.spec, self.key
        return {
            "id": self.id, "name": spec.name, "source": spec.source, "kind": "push" if spec.source is None else "source",
            "state": self.state, "error": self.error, "created": self.created, "fps": spec.fps,
            "stc": None if stc is None else stc.to_dict(), "memory": memory, "window_tokens": window_tokens,
            "realtime": spec.realtime, "loop": spec.loop, "frames_queued": self.queued, "frames_done": self.done,
            "frames_waiting": len(self.frames), "frames_dropped": self.dropped,
            "questions_waiting": len(self.questions), "last_timestamp": self.last_timestamp,
            "stats": self.stats, "restored": self.restored, "checkpoint_ms": self.checkpoint_ms,
        }

    def nothing_to_answer(self) -> str:
        """Why the stream, without a processed frame, cannot be answered, and what to do, in the API's words."""
        if self.spec.source is None:
            return (f"stream {self.id} has no processed frame to answer on yet: push one first "
                    f"(POST /v1/streams/{self.id}/frames or the push websocket)")
        if self.state == "error":
            return (f"stream {self.id} failed before its first frame ({self.error}); there is nothing to answer "
                    "on: delete it and open the source again")
        return f"stream {self.id} has no processed frame to answer on yet: its source has not delivered one"

    def record(self, saved: str) -> dict[str, Any]:
        """What `StreamStore` keeps of the stream besides its session: its settings (STC and memory
        resolved, so a restart with other defaults keeps them), its state, and what the save is
        (`saved`: "shutdown" or "checkpoint"; the store adds when, and the session's frames and last
        timestamp)."""
        spec, (stc, memory, window_tokens) = self.spec, self.key
        return {"id": self.id, "created": self.created, "state": self.state, "spec": {
            "source": spec.source, "fps": spec.fps, "stc": None if stc is None else stc.to_dict(),
            "memory": memory, "window_tokens": window_tokens, "realtime": spec.realtime, "loop": spec.loop,
            "max_seconds": spec.max_seconds, "name": spec.name},
            "saved": saved}


__all__ = ["EVENTS_KEPT", "Question", "ServedStream", "ViewKey"]
