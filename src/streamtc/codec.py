"""Codec side data: what the video decoder already knows about change, read from frames decoded anyway.

    with PyAVSource("street.mp4", fps=1.0) as source:          # side_data=True by default
        for frame in source:
            change = frame.codec.change_map((16, 16))         # [16, 16] in [0, 1], or frame.codec is None

A decoder of H.264 or of the MPEG-1/2/4 Part 2 and H.263 family knows, for every frame it decodes,
which blocks were copied from another frame (one motion vector each), which were coded anew (intra),
and whether the whole frame was coded anew (an I-frame). PyAV exports the vectors with the decoder
option `flags2=+export_mvs`; HEVC, VP9 and AV1 decoders export none, so their frames carry no side data
(`MOTION_VECTOR_CODECS`). `CodecAccumulator` folds every decoded frame between two sampled frames into
one `CodecSideData` on the 16-pixel macroblock grid, attached to the sampled frame by the source.

Motion. A P-frame's vectors point at the previous anchor (I- or P-frame) in display order, so they span
every frame since it; summed over the interval's P-frames they give, per cell, the distance its content
travelled across and down (in source pixels), each decoded frame counted once. The two axes stay apart
until `change_map` measures them in the patch grid's own units (a patch of a wide frame resized to a
square input is wider than it is tall). B-frames re-measure the same motion
against the same anchors, at reference distances the side data does not state (only past or future),
so they add intra-coded cells but no motion; a stream without B-frames (most cameras) has a P-frame
per frame. The sum can shift by up to one anchor spacing (3-4 frames for x264) across a sampling
boundary, and a block predicted from an older anchor (multiple references) counts its longer span.

Cuts. An interval holds a cut when (a) it holds an I-frame other than the stream's first, unless the
distance in decoded frames from the previous I-frame equals a distance already seen between two
earlier I-frames (the periodic keyframe cadence: x264's keyint, a camera's GOP; an encoder restarts its
cadence at a cut, so the keyframe one GOP after a cut is recognised too), or (b) a P/B frame in it
has more than `CUT_INTRA_SHARE` of its area intra-coded (encoders without scene-cut detection code a
new shot as a mostly-intra P-frame). A pan codes as vectors, with only the entering strip intra, and
is no cut. The first periodic keyframe of a stream has no cadence to match and so counts as a cut
(one needless refresh per stream); a cut that falls exactly on the cadence is seen only through (b).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import av
import numpy as np
from av.sidedata.sidedata import SideDataContainer
from av.video.frame import PictureType

from .checks import positive_int
from .errors import ConfigError, InputError, StreamStateError

# Decoders (PyAV's codec_context.name) that export motion vectors with flags2=+export_mvs (checked with PyAV 18).
MOTION_VECTOR_CODECS = frozenset(
    {"h264", "mpeg1video", "mpeg2video", "mpeg4", "h263", "msmpeg4", "msmpeg4v2", "wmv2", "flv"}
)
EXPORT_MVS_OPTIONS = {"flags2": "+export_mvs"}
# A P/B frame with more of its area intra-coded than this starts a new shot. Measured on the street clip
# re-encoded by x264 without scene-cut detection at 160-640 px wide: its P-frames at cuts are 0.75-0.90
# intra with the ultrafast preset (live encoders' choice), 0.92-1.0 with veryfast or medium; elsewhere
# at most 0.60. An exposure step on a static camera (OpenCV's cup.mp4) reaches 0.77 and counts as a
# cut: a needless refresh costs FLOPs, a missed cut costs accuracy.
CUT_INTRA_SHARE = 0.7
MACROBLOCK = 16  # pixels; the grid of CodecSideData
_BATCH = 32  # P/B frames whose vectors are rasterised together (numpy calls per batch, not per frame)
_INTRA_TYPES = frozenset({PictureType.I, PictureType.SI, PictureType.BI})
_MOTION_FIELDS = ("dst_x", "dst_y", "w", "h", "motion_x", "motion_y", "motion_scale")


def _overlap(extent: int, block: int, parts: int) -> np.ndarray:
    """[parts, cells]: the share of each of `parts` equal spans of [0, extent) pixels covered by each
    `block`-pixel cell (the last cell is clipped to the extent); rows sum to 1."""
    cells = -(-extent // block)
    part_edges = np.linspace(0.0, extent, parts + 1)
    cell_edges = np.minimum(np.arange(cells + 1) * block, extent).astype(np.float64)
    low = np.maximum(part_edges[:-1, None], cell_edges[None, :-1])
    high = np.minimum(part_edges[1:, None], cell_edges[None, 1:])
    return np.clip(high - low, 0.0, None) / (extent / parts)


@dataclass(frozen=True)
class CodecSideData:
    """What the decoder said about one sampled frame, accumulated over every decoded frame since the
    previous sampled frame (this one included).

    motion_x, motion_y: [Hb, Wb] per macroblock cell of the frame (Hb = ceil(height / block)): how
        far its content travelled over the interval across and down, in source pixels (sums over the
        interval's P-frames of |vector x| and |vector y|; smaller blocks contribute by area,
        intra-coded area contributes 0). Kept apart because a tower's patch is rarely square in
        source pixels: a 640 x 272 frame resized to 16 x 16 patches has patches 40 wide and 17 tall.
    intra: [Hb, Wb] in [0, 1]: the share of the interval's P/B frames in which the cell was intra-coded
        (no vector covers it), by area; all ones when the interval holds only I-frames.
    intra_share: the intra-coded share of frame area, mean over the interval's P/B frames (1.0 if none).
    cut: the interval holds a scene cut (see the module docstring for the rule).
    decoded_frames, keyframes: frames accumulated (>= 1) and the I-frames among them.
    height, width: the decoded frame in pixels (the grid covers it, the last row/column partly).
    """

    motion_x: np.ndarray
    motion_y: np.ndarray
    intra: np.ndarray
    intra_share: float
    cut: bool
    decoded_frames: int
    keyframes: int
    height: int
    width: int
    block: int = MACROBLOCK

    def __post_init__(self) -> None:
        cells = (-(-self.height // self.block), -(-self.width // self.block))
        shapes = {"motion_x": self.motion_x.shape, "motion_y": self.motion_y.shape, "intra": self.intra.shape}
        if any(shape != cells for shape in shapes.values()):
            raise InputError(
                f"{', '.join(f'{name} {shape}' for name, shape in shapes.items())} must all be {cells}: the "
                f"{self.block}-pixel grid of a {self.height}x{self.width} frame"
            )

    @property
    def motion(self) -> np.ndarray:
        """[Hb, Wb]: the distance each cell's content travelled, in source pixels."""
        return np.hypot(self.motion_x, self.motion_y)

    def change_map(self, grid: tuple[int, int], motion_scale: float = 1.0) -> np.ndarray:
        """[gh, gw] float32 in [0, 1]: how much each cell of a patch grid laid over the whole frame
        changed, as the area-weighted mean of max(intra, min(1, travel / motion_scale)) over it.

        The whole frame maps onto the grid (a tower's input is the frame resized without cropping), so
        a patch spans width / gw by height / gh source pixels; travel is measured in those patches
        along each axis (the hypotenuse of the two). motion_scale: the travel, in patches, that counts
        as a full change.
        """
        rows, cols = (positive_int(n, "grid size", error=InputError) for n in grid)
        if not motion_scale > 0:
            raise ConfigError(f"motion_scale must be > 0, got {motion_scale!r}")
        travel = np.hypot(self.motion_x * (cols / self.width), self.motion_y * (rows / self.height))
        change = np.maximum(self.intra, np.minimum(1.0, travel / motion_scale))
        down = _overlap(self.height, self.block, rows)
        across = _overlap(self.width, self.block, cols)
        return (down @ change @ across.T).astype(np.float32)


@dataclass
class _Interval:
    """Sums over the decoded frames since the last sampled frame, on one frame size's grid; the vectors
    of the latest P/B frames wait in `pending` (is a P-frame, a copy of its vectors) to be rasterised."""

    height: int
    width: int
    motion: np.ndarray = field(init=False)
    intra: np.ndarray = field(init=False)
    pending: list[tuple[bool, np.ndarray | None]] = field(default_factory=list)
    inter_frames: int = 0
    intra_share: float = 0.0
    decoded: int = 0
    keyframes: int = 0
    cut: bool = False

    def __post_init__(self) -> None:
        self.motion = np.zeros((2, *self.cells))  # across, down
        self.intra = np.zeros(self.cells)

    @property
    def cells(self) -> tuple[int, int]:
        return -(-self.height // MACROBLOCK), -(-self.width // MACROBLOCK)

    def fold(self, cut_intra_share: float) -> None:
        """Rasterise the pending frames into the sums (a frame over `cut_intra_share` intra is a cut)."""
        if not self.pending:
            return
        intra, motion = _rasterise(self.cells, self.pending)
        shares = intra.mean(axis=(1, 2))
        self.intra += intra.sum(axis=0)
        self.motion += motion
        self.intra_share += float(shares.sum())
        self.inter_frames += len(self.pending)
        self.cut |= bool((shares > cut_intra_share).any())
        self.pending = []


class CodecAccumulator:
    """Folds the side data of each decoded frame into one `CodecSideData` per sampled frame.

    `add(frame)` for every decoded frame in display order; `take()` when a frame is sampled returns the
    data of the frames added since the previous `take()` and starts a new interval. The keyframe
    cadence used by the cut rule belongs to the stream and lives across intervals. A change of frame
    size starts the maps afresh on the new grid and counts as a cut.
    """

    def __init__(self, cut_intra_share: float = CUT_INTRA_SHARE) -> None:
        if not 0.0 < cut_intra_share <= 1.0:
            raise ConfigError(f"cut_intra_share must lie in (0, 1], got {cut_intra_share!r}")
        self.cut_intra_share = cut_intra_share
        self._interval: _Interval | None = None
        self._frames = 0  # decoded frames added over the stream
        self._last_keyframe: int | None = None
        self._keyframe_gaps: set[int] = set()

    def add(self, frame: av.VideoFrame) -> None:
        """Accumulate one decoded frame (its type and, for P/B frames, its exported motion vectors)."""
        # `frame.side_data` caches a container that points back at the frame: a reference cycle that only
        # the garbage collector frees, which keeps decoded pictures alive and slows decoding by about half.
        side = SideDataContainer(frame).get("MOTION_VECTORS")
        intra = frame.pict_type in _INTRA_TYPES or bool(frame.key_frame)
        picture = "I" if intra else "B" if frame.pict_type == PictureType.B else "P"
        self.add_decoded(frame.height, frame.width, picture, None if side is None else side.to_ndarray())

    def add_decoded(self, height: int, width: int, picture: str, vectors: np.ndarray | None) -> None:
        """Accumulate one decoded frame given as its size, type ("I", "P" or "B") and exported vectors
        (the structured array of `MOTION_VECTORS.to_ndarray()`, None when the frame has none)."""
        if picture not in ("I", "P", "B"):
            raise InputError(f"picture type must be 'I', 'P' or 'B', got {picture!r}")
        interval = self._interval
        if interval is None or (interval.height, interval.width) != (height, width):
            resized = interval is not None and interval.decoded > 0
            self._interval = interval = self._restart(height, width, interval)
            interval.cut |= resized
        interval.decoded += 1
        if picture == "I":
            interval.keyframes += 1
            interval.cut |= self._periodic_keyframe() is False
        else:
            # A copy: the exported array is a view that would keep the decoded frame alive.
            interval.pending.append((picture == "P", None if vectors is None else vectors.copy()))
            if len(interval.pending) == _BATCH:
                interval.fold(self.cut_intra_share)
        self._frames += 1

    def take(self) -> CodecSideData:
        """The side data of the frames added since the previous take (the sampled frame last); resets."""
        interval = self._interval
        if interval is None or interval.decoded == 0:
            raise StreamStateError("no decoded frame was added since the last sampled frame")
        interval.fold(self.cut_intra_share)
        inter = interval.inter_frames
        data = CodecSideData(
            motion_x=interval.motion[0].astype(np.float32),
            motion_y=interval.motion[1].astype(np.float32),
            intra=(interval.intra / inter if inter else np.ones_like(interval.intra)).astype(np.float32),
            intra_share=interval.intra_share / inter if inter else 1.0,
            cut=interval.cut,
            decoded_frames=interval.decoded,
            keyframes=interval.keyframes,
            height=interval.height,
            width=interval.width,
        )
        self._interval = _Interval(interval.height, interval.width)
        return data

    @staticmethod
    def _restart(height: int, width: int, previous: _Interval | None) -> _Interval:
        """A fresh interval on the grid of a new frame size, keeping the counts of `previous`."""
        interval = _Interval(height, width)
        if previous is not None:
            interval.decoded, interval.keyframes, interval.cut = previous.decoded, previous.keyframes, previous.cut
        return interval

    def _periodic_keyframe(self) -> bool | None:
        """Record an I-frame at the current position: None for the stream's first, else whether its
        distance from the previous one matches the cadence seen so far."""
        previous, self._last_keyframe = self._last_keyframe, self._frames
        if previous is None:
            return None
        gap = self._frames - previous
        periodic = gap in self._keyframe_gaps
        self._keyframe_gaps.add(gap)
        return periodic


def _popcount16(x: np.ndarray) -> np.ndarray:
    """Set bits of each 16-bit value (integer array)."""
    x = x - ((x >> 1) & 0x5555)
    x = (x & 0x3333) + ((x >> 2) & 0x3333)
    x = (x + (x >> 4)) & 0x0F0F
    return (x + (x >> 8)) & 0x1F


def _rasterise(
    cells: tuple[int, int], frames: list[tuple[bool, np.ndarray | None]]
) -> tuple[np.ndarray, np.ndarray]:
    """P/B frames (is a P-frame, its vectors or None) on their macroblock grid `cells`: per frame the
    intra-coded (uncovered) share of each cell's area [F, Hb, Wb], and the sums over the P-frames of each
    cell's area-weighted |motion x| and |motion y| in pixels [2, Hb, Wb] (intra-coded area counts 0).

    Each block becomes a 16-bit mask of the 4 x 4-pixel squares it covers in its macroblock. One
    direction's blocks tile a macroblock without overlap (H.264 partitions, MPEG-4's four 8 x 8
    vectors), so summing a direction's masks is their union; the union of both directions counts a
    block a B-frame predicts from both sides once. A block reaching past its macroblock (no codec in
    `MOTION_VECTOR_CODECS` exports one) is clipped to it. Vectorised over all frames and vectors at once.
    """
    count, (rows, cols) = len(frames), cells
    arrays = [v for _, v in frames if v is not None and len(v)]
    if not arrays:
        return np.ones((count, rows, cols)), np.zeros((2, *cells))
    # Concatenated as bytes: numpy's concatenate of structured arrays goes field by field, 100x slower.
    vectors = np.concatenate([v.view(np.uint8) for v in arrays]).view(arrays[0].dtype)
    missing = [name for name in ("source", *_MOTION_FIELDS) if name not in (vectors.dtype.names or ())]
    if missing:
        raise InputError(f"motion vectors lack the fields {missing}")
    sizes = [0 if v is None else len(v) for _, v in frames]
    width, height = vectors["w"].astype(np.int64), vectors["h"].astype(np.int64)
    left, top = vectors["dst_x"] - width // 2, vectors["dst_y"] - height // 2  # dst is the block's centre
    mb_x, mb_y = left >> 4, top >> 4
    inside = (mb_x >= 0) & (mb_x < cols) & (mb_y >= 0) & (mb_y < rows)
    at_x, at_y = (left & 15) >> 2, (top & 15) >> 2  # the block's first 4-pixel square in its macroblock
    span_x, span_y = np.minimum((width + 3) >> 2, 4 - at_x), np.minimum((height + 3) >> 2, 4 - at_y)
    # Bit 4 * row + column: a row of span_x bits, repeated on span_y rows (0x1111 >> ... picks the rows).
    mask = (((1 << span_x) - 1) << at_x) * (((1 << (4 * span_y)) - 1) // 15 << (4 * at_y))
    frame_of = np.repeat(np.arange(count), sizes)
    cell = ((frame_of * rows + mb_y) * cols + mb_x)[inside]
    bins = count * rows * cols
    later = (vectors["source"] > 0)[inside]  # predicted from a later frame: B-frames' second direction
    masks = np.bincount(cell * 2 + later, weights=mask[inside], minlength=2 * bins).astype(np.int64)
    covered = _popcount16(masks[0::2] | masks[1::2])
    intra = 1.0 - covered.reshape(count, rows, cols) / 16.0
    is_p = np.repeat(np.array([p for p, _ in frames]), sizes)  # B-frames add no motion
    scale = np.maximum(vectors["motion_scale"].astype(np.float64), 1.0)
    weight = is_p * (_popcount16(mask) / 16.0) / scale
    motion = [np.bincount(cell, weights=(np.abs(vectors[axis]) * weight)[inside], minlength=bins)
              .reshape(count, rows, cols).sum(axis=0) for axis in ("motion_x", "motion_y")]
    return intra, np.stack(motion)


__all__ = [
    "CUT_INTRA_SHARE",
    "EXPORT_MVS_OPTIONS",
    "MOTION_VECTOR_CODECS",
    "CodecAccumulator",
    "CodecSideData",
]
