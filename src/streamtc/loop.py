"""The streaming loop: push a source's frames and ask each question when the stream reaches its time.

    loop = StreamLoop([3.0, 8.0], push=lambda frames: session.push(...), chunk_frames=1)
    for index in loop.play(source):
        ...ask question `index`: every frame it may see has been pushed, no later frame has
    loop.pending                     # questions the stream never reached (asked by the caller at the end)

`streamtc run` and the benchmark evaluation (`streamtc.eval.streaming.run_video`) both stream
through it; they differ only in which frames a question sees:

- inclusive (run): a question at t sees the frames at or before t, as a viewer at t has seen
  them ("the stream reaches t" includes the frame shown at t);
- exclusive (evaluation): a question at its clip's cut c sees the frames strictly before c, as the
  benchmarks cut their clips ([0, c)).

One time tolerance, TIME_TOLERANCE = 1 microsecond, absorbs the rounding of frame timestamps: they
come from a container's integer presentation times times its time base (1/90000 s for MPEG-TS, a
frame of 29.97 fps is 1001/30000 s), so a frame meant for 3 s can read 2.9999999 or 3.0000001. A
microsecond is far above that rounding and far below any frame interval (a 1000 fps camera's is
1 ms), so it never merges two frames. A frame within the tolerance of a question's time counts as at
that time: seen by an inclusive question, not by an exclusive one.

Frames are pushed in chunks of `chunk_frames` (one vision-tower forward each); a chunk is cut short
when a question falls due, so that the question sees its frames. A source that fails mid-way
(`VideoSourceError`) has the frames read before the failure pushed, then the error propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from .errors import VideoSourceError

if TYPE_CHECKING:
    from .sources import Frame

TIME_TOLERANCE = 1e-6  # seconds; see the module docstring


class StreamLoop:
    """Questions at `times` (seconds, any order) over one stream, pushed through `push`.

    push: called with each chunk of frames (a list of `Frame`, in time order). chunk_frames:
    frames per push at most. inclusive: whether a question at t sees a frame at t (see the module
    docstring).
    """

    def __init__(self, times: Sequence[float], push: Callable[[list[Frame]], object], *, chunk_frames: int = 1,
                 inclusive: bool = True) -> None:
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.times = list(times)
        self.pending = sorted(range(len(self.times)), key=self.times.__getitem__)  # stable: ties keep their order
        self.frames_read = 0  # frames taken from the source
        self.frames_pushed = 0
        self.last_time: float | None = None  # timestamp of the last frame pushed
        self._push, self._chunk_frames, self._inclusive = push, chunk_frames, inclusive
        self._buffer: list[Frame] = []

    def sees(self, frame_time: float, question_time: float) -> bool:
        """Whether a question at `question_time` sees a frame at `frame_time`."""
        if self._inclusive:
            return frame_time <= question_time + TIME_TOLERANCE
        return frame_time < question_time - TIME_TOLERANCE

    def due(self, frame_time: float) -> bool:
        """Whether the next pending question must be asked before a frame at `frame_time` is pushed."""
        return bool(self.pending) and not self.sees(frame_time, self.times[self.pending[0]])

    def flush(self) -> list[Frame]:
        """Push the frames waiting for a full chunk; returns them (empty when none waited)."""
        chunk, self._buffer = self._buffer, []
        if chunk:
            self._push(chunk)
            self.frames_pushed += len(chunk)
            self.last_time = chunk[-1].timestamp
        return chunk

    def play(self, source: Iterable[Frame], *, stop_when_answered: bool = False) -> Iterator[int]:
        """Push `source`'s frames; yield each question's index when it falls due (ask it before
        resuming). Ends with every frame pushed; questions the stream did not pass stay in
        `pending`. stop_when_answered: stop reading once no question is left (every frame after
        the last question is skipped)."""
        for step in self.steps(source, stop_when_answered=stop_when_answered):
            if isinstance(step, int):
                yield step

    def steps(self, source: Iterable[Frame], *, stop_when_answered: bool = False) -> Iterator[int | list[Frame]]:
        """`play`, also yielding each chunk once it is pushed (a list of frames), so that a caller
        can report progress between questions."""
        try:
            for frame in source:
                self.frames_read += 1
                while self.due(frame.timestamp):
                    if chunk := self.flush():
                        yield chunk
                    yield self.pending.pop(0)
                if stop_when_answered and not self.pending:
                    break
                self._buffer.append(frame)
                if len(self._buffer) >= self._chunk_frames and (chunk := self.flush()):
                    yield chunk
        except VideoSourceError:
            if chunk := self.flush():  # frames read before the failure are sound
                yield chunk
            raise
        if chunk := self.flush():
            yield chunk

    def reached(self, until: float) -> Iterator[int]:
        """Yield (and remove) the pending questions a stream that ended at `until` has reached."""
        while self.pending and self.times[self.pending[0]] <= until + TIME_TOLERANCE:
            yield self.pending.pop(0)


__all__ = ["TIME_TOLERANCE", "StreamLoop"]
