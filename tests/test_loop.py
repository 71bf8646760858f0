"""The streaming loop (`streamtc.loop.StreamLoop`): which frames each question sees, inclusive (run)
and exclusive (evaluation), chunking, a source failing mid-way, and the time tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from streamtc.errors import VideoSourceError
from streamtc.loop import TIME_TOLERANCE, StreamLoop
from streamtc.sources import Frame


def frames(*times: float) -> list[Frame]:
    return [Frame(np.zeros((2, 2, 3), np.uint8), t, i) for i, t in enumerate(times)]


def play(times, source, **options) -> tuple[list[tuple[str, object]], StreamLoop]:
    """The loop's events in order: ("push", frame times) and ("ask", question index)."""
    events: list[tuple[str, object]] = []
    stop = options.pop("stop", False)
    loop = StreamLoop(times, lambda chunk: events.append(("push", [f.timestamp for f in chunk])), **options)
    for index in loop.play(source, stop_when_answered=stop):
        events.append(("ask", index))
    return events, loop


def test_an_inclusive_question_sees_the_frame_at_its_time_an_exclusive_one_does_not():
    events, loop = play([2.0, 0.5], frames(0, 1, 2, 3))
    assert events == [("push", [0]), ("ask", 1), ("push", [1]), ("push", [2]), ("ask", 0), ("push", [3])]
    assert loop.pending == [] and loop.frames_pushed == 4 and loop.last_time == 3
    events, _ = play([2.0], frames(0, 1, 2, 3), inclusive=False)
    assert events == [("push", [0]), ("push", [1]), ("ask", 0), ("push", [2]), ("push", [3])]


def test_timestamps_within_the_tolerance_count_as_at_the_question_time():
    near = 0.5 * TIME_TOLERANCE
    inclusive, _ = play([2.0], frames(1, 2 + near, 2 + 3 * TIME_TOLERANCE))
    assert inclusive.index(("ask", 0)) == 2  # after 2 + near, before the frame just past the tolerance
    exclusive, _ = play([2.0], frames(1, 2 - near), inclusive=False)
    assert exclusive == [("push", [1]), ("ask", 0), ("push", [2 - near])]


def test_chunks_are_cut_short_when_a_question_falls_due():
    events, _ = play([2.5], frames(0, 1, 2, 3, 4, 5), chunk_frames=2)
    assert events == [("push", [0, 1]), ("push", [2]), ("ask", 0), ("push", [3, 4]), ("push", [5])]


def test_questions_past_the_end_stay_pending_and_reached_takes_those_at_the_last_frame():
    events, loop = play([9.0, 3.0, 3.0], frames(0, 1, 2, 3))
    assert ("ask", 1) not in events and loop.pending == [1, 2, 0]  # ties keep their order
    assert list(loop.reached(loop.last_time)) == [1, 2] and loop.pending == [0]


def test_stop_when_answered_reads_no_further():
    events, loop = play([1.0], frames(0, 1, 2, 3), inclusive=False, stop=True)
    assert events == [("push", [0]), ("ask", 0)] and loop.frames_read == 2


def test_a_failing_source_has_its_frames_pushed_before_the_error():
    def failing():
        yield from frames(0, 1, 2)
        raise VideoSourceError("cut file")

    events: list[list[float]] = []
    loop = StreamLoop([5.0], lambda chunk: events.append([f.timestamp for f in chunk]), chunk_frames=4)
    with pytest.raises(VideoSourceError, match="cut file"):
        list(loop.play(failing()))
    assert events == [[0, 1, 2]] and loop.pending == [0] and loop.last_time == 2


def test_steps_reports_each_pushed_chunk_where_it_was_pushed():
    pushed: list[list[float]] = []
    loop = StreamLoop([2.5], lambda chunk: pushed.append([f.timestamp for f in chunk]), chunk_frames=2)
    steps = [s if isinstance(s, int) else [f.timestamp for f in s] for s in loop.steps(frames(0, 1, 2, 3, 4))]
    assert steps == [[0, 1], [2], 0, [3, 4]]  # each chunk right after its push, the question where it fell due
    assert [s for s in steps if not isinstance(s, int)] == pushed
