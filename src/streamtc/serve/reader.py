"""The reader of a server-read source (a file, URL, webcam or built-in clip): one thread per
stream that opens the source, samples it at the stream's fps, paces it at its own speed when
realtime, loops it when asked, and hands each frame to the engine's queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StreamTCError
from ..loop import TIME_TOLERANCE
from ..sources import open_source
from .settings import StreamSpec


def read_source(spec: StreamSpec, location: str | Path, stop: threading.Event,
                enqueue: Callable[[np.ndarray, float, Any], bool], resume_after: float | None = None) -> str | None:
    """Read `location` into `enqueue(image, stream_time, codec side data or None)` until the source ends, `stop` is set or
    `enqueue` returns False (the stream stopped). A resumed stream skips the frames up to stream
    time `resume_after` (already processed) and is paced from the first frame after it. Returns
    None when the source ended normally, else why it stopped early (cannot open, decode error)."""
    offset = 0.0
    try:
        while not stop.is_set():
            source = open_source(location, fps=spec.fps, max_seconds=spec.max_seconds)
            started, last = time.monotonic(), 0.0
            try:
                for frame in source:
                    last = frame.timestamp
                    if resume_after is not None:
                        if offset + frame.timestamp <= resume_after + TIME_TOLERANCE:
                            continue
                        resume_after, started = None, time.monotonic() - frame.timestamp  # paced from here
                    if spec.realtime and stop.wait(max(0.0, started + frame.timestamp - time.monotonic())):
                        break
                    if not enqueue(frame.image, offset + frame.timestamp, frame.codec):
                        break
            finally:
                source.close()
            reason = source.error if source.ended_early else None
            if reason or not spec.loop:
                return reason
            offset += last + 1.0 / spec.fps
    except StreamTCError as error:  # cannot open / decode: this stream only
        return str(error)
    return None


__all__ = ["read_source"]
