"""Codec side data from decoded video: clips made here with PyAV's encoders, and the street clip.

Each synthetic clip is rendered from a known scene (a textured square moving over a still
background, a textured scene panning, a hard cut between two scenes), encoded into tmp_path, and
decoded through `PyAVSource`; the expectations come from the rendering (where the square was,
how far the scene moved), never from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from av.video.frame import PictureType
from skimage import data as skimage_data

from streamtc.codec import CUT_INTRA_SHARE, CodecAccumulator, CodecSideData
from streamtc.errors import ConfigError, InputError, StreamStateError
from streamtc.sources import ArraySource, PyAVSource, builtin_clip_path, open_source

pytestmark = pytest.mark.skipif("libx264" not in av.codecs_available, reason="PyAV was built without libx264")

RATE = 25  # frames per second of the synthetic clips
NO_SCENECUT = {"x264-params": "scenecut=0:bframes=0"}  # like most camera encoders: no scene-cut I-frames


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """Random colours in 8-pixel blocks: texture an encoder can track."""
    cells = np.random.default_rng(seed).integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.kron(cells, np.ones((8, 8, 1), np.uint8))[:height, :width].copy()


def encode(path: Path, frames: list[np.ndarray], codec: str = "libx264", **options: str) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = options
        for image in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return path


def pan(
    count: int, speed: int, height: int = 144, width: int = 176, scene: np.ndarray | None = None
) -> list[np.ndarray]:
    """A scene (by default random texture) seen through a window sliding right by `speed` pixels per frame."""
    scene = texture(height, width + speed * count, 1) if scene is None else scene
    return [scene[:height, i * speed : i * speed + width].copy() for i in range(count)]


def read(path: Path, fps: float = 1.0) -> list[CodecSideData]:
    frames = list(PyAVSource(path, fps=fps))
    assert all(f.codec is not None for f in frames)
    return [f.codec for f in frames]


# -- a moving square: the change map lands where the square went ----------------------------------

HEIGHT, WIDTH, SIDE, TOP = 128, 192, 32, 48  # frame, square and its row (pixels); 8 x 12 macroblocks


def square_x(i: int) -> int:
    return 16 + 2 * i  # left edge in frame i: 2 pixels per frame to the right


def square_clip(count: int = 51) -> list[np.ndarray]:
    background, square = texture(HEIGHT, WIDTH, 1), texture(SIDE, SIDE, 7)
    frames = []
    for i in range(count):
        image = background.copy()
        image[TOP : TOP + SIDE, square_x(i) : square_x(i) + SIDE] = square
        frames.append(image)
    return frames


def square_presence(frames: range, grid: tuple[int, int]) -> np.ndarray:
    """[gh, gw]: the share of each grid cell's area under the square, averaged over `frames`."""
    mask = np.zeros((len(frames), HEIGHT, WIDTH))
    for k, i in enumerate(frames):
        mask[k, TOP : TOP + SIDE, square_x(i) : square_x(i) + SIDE] = 1.0
    rows, cols = grid
    return mask.mean(0).reshape(rows, HEIGHT // rows, cols, WIDTH // cols).mean(axis=(1, 3))


@pytest.mark.parametrize("options", [{}, NO_SCENECUT], ids=["x264-default", "no-b-frames"])
def test_change_map_lands_on_the_squares_path_and_leaves_the_background_at_zero(
    tmp_path: Path, options: dict[str, str]
) -> None:
    data = read(encode(tmp_path / "square.mp4", square_clip(), **options))
    assert [d.decoded_frames for d in data] == [1, RATE, RATE]
    for k in (1, 2):
        interval = range((k - 1) * RATE + 1, k * RATE + 1)
        presence = square_presence(interval, (8, 12))
        change = data[k].change_map((8, 12))
        assert change.shape == (8, 12) and change.dtype == np.float32
        assert (change[presence >= 0.4] >= 0.5).all()  # where the square spent a good part of the interval
        # The still background, beyond where the square was within one anchor spacing (4 frames) of
        # the interval (a P-frame's vectors span the frames since the previous anchor).
        background = square_presence(range(interval[0] - 4, interval[-1] + 5), (8, 12)) == 0
        assert background.sum() > 70 and (change[background] < 0.05).all()
        # On a grid that does not align with the macroblocks: the change sits where the square went.
        coarse, expected = data[k].change_map((4, 5)), square_presence(interval, (4, 6))
        columns = (np.arange(5) + 0.5) * WIDTH / 5
        centre = (coarse.sum(0) * columns).sum() / coarse.sum()
        path_centre = (square_x(interval[0]) + square_x(interval[-1]) + SIDE) / 2
        assert centre == pytest.approx(path_centre, abs=12)
        assert (coarse[[0, 3]] < 0.05).all() and expected[[0, 3]].max() == 0  # rows the square never entered


# -- cuts and pans ------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, NO_SCENECUT], ids=["scene-cut-i-frame", "intra-coded-p-frame"])
def test_a_hard_cut_is_flagged_in_its_interval_and_a_pan_is_not(tmp_path: Path, options: dict[str, str]) -> None:
    """Photographs (scikit-image's public-domain coffee cup and astronaut): random texture would not do,
    as an encoder predicts new random blocks from old ones about as well as it codes them anew."""
    coffee, astronaut = skimage_data.coffee(), skimage_data.astronaut()
    shots = pan(30, 1, 176, 240, coffee) + pan(30, 1, 176, 240, astronaut)  # the cut at frame 30
    cut = read(encode(tmp_path / "cut.mp4", shots, **options))
    assert [d.cut for d in cut] == [False, False, True]  # frames 0 | 1-25 | 26-50
    panned = read(encode(tmp_path / "pan.mp4", pan(75, 3, 176, 240, astronaut), **options))
    assert [d.cut for d in panned] == [False, False, False]
    assert all(d.intra_share < 0.3 for d in panned[1:])  # at most the strip entering on the right is new


def test_periodic_keyframes_are_not_cuts_once_their_cadence_is_seen(tmp_path: Path) -> None:
    """MPEG-4 Part 2 with a 12-frame GOP and a scene change at frame 64: the encoder puts I-frames at
    0, 12, 24, 36, 48, 60, at the cut (64) and every 12 frames from it (76, 88, 100)."""
    frames = pan(64, 1, 176, 240, skimage_data.coffee()) + pan(37, 1, 176, 240, skimage_data.astronaut())
    with av.open(str(tmp_path / "gop.avi"), "w") as out:
        stream = out.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = 240, 176, "yuv420p"
        stream.codec_context.gop_size = 12
        for image in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    data = read(tmp_path / "gop.avi")
    with av.open(str(tmp_path / "gop.avi")) as container:
        keyframes = [i for i, f in enumerate(container.decode(video=0)) if f.pict_type == PictureType.I]
    assert keyframes == [0, 12, 24, 36, 48, 60, 64, 76, 88, 100]
    assert [d.keyframes for d in data] == [1, 2, 2, 2, 3]  # frames 0 | 1-25 | 26-50 | 51-75 | 76-100
    # Frames 1-25 hold the first periodic keyframe, which no cadence yet explains: a cut by the rule.
    assert [d.cut for d in data] == [False, True, False, True, False]


# -- accumulation between sampled frames --------------------------------------------------------


@pytest.mark.parametrize(
    "options, tolerance", [({"x264-params": "bframes=0:ref=1"}, 1.0), ({}, 8.0)], ids=["p-frames", "x264-default"]
)
@pytest.mark.parametrize("fps", [1.0, 0.5])
def test_motion_is_summed_over_the_decoded_frames_of_each_interval(
    tmp_path: Path, options: dict[str, str], tolerance: float, fps: float
) -> None:
    """A pan of 2 pixels per frame sampled every 25 (or 50) frames: each interval's content travelled
    2 x its frame count; with B-frames the sum may shift by one anchor spacing across a boundary."""
    data = read(encode(tmp_path / "pan.mp4", pan(101, 2), **options), fps=fps)
    per_interval = round(RATE / fps)
    assert [d.decoded_frames for d in data] == [1] + [per_interval] * (len(data) - 1)
    assert data[0].motion.max() == 0 and data[0].intra_share == 1.0
    for d in data[1:]:
        inside = d.motion[1:-1, 1:-2]  # away from the frame border and the entering strip
        assert np.median(inside) == pytest.approx(2 * d.decoded_frames, abs=tolerance)


# -- sources without codec data -----------------------------------------------------------------


def test_sources_without_codec_data_give_none(tmp_path: Path) -> None:
    frames = pan(30, 2)
    assert all(f.codec is None for f in ArraySource(np.stack(frames), fps=5, native_fps=RATE))
    assert all(f.codec is None for f in open_source([frames[0], frames[1]], fps=1))  # pushed images
    path = encode(tmp_path / "pan.mp4", frames)
    off = PyAVSource(path, side_data=False)
    assert not off.side_data and all(f.codec is None for f in off)
    if "libx265" in av.codecs_available:  # HEVC decoders export no motion vectors
        hevc_path = encode(tmp_path / "pan.hevc.mp4", frames, codec="libx265", **{"x265-params": "log-level=none"})
        hevc = PyAVSource(hevc_path)
        assert not hevc.side_data and all(f.codec is None for f in hevc)


# -- real footage -------------------------------------------------------------------------------


def test_street_clip_carries_side_data_for_every_sampled_frame() -> None:
    """The street clip at 1 fps; its shots change at decoded frames 30, 76, 137 and 187 (measured
    below from the pixels), which fall into the intervals of sampled frames 2, 4, 6 and 8."""
    with av.open(str(builtin_clip_path("bikes"))) as container:
        grey = [f.to_ndarray(format="gray").astype(np.float32) for f in container.decode(video=0)]
    jumps = [i for i in range(1, len(grey)) if np.abs(grey[i] - grey[i - 1]).mean() > 40]
    assert jumps == [30, 76, 137, 187, 242]
    data = read(builtin_clip_path("bikes"))
    assert len(data) == 10 and [d.decoded_frames for d in data] == [1] + [25] * 9
    expected = [any((k - 1) * 25 < j <= k * 25 for j in jumps) for k in range(10)]
    assert [d.cut for d in data] == expected
    for d in data:
        assert d.motion.shape == d.intra.shape == (17, 40) and (d.height, d.width) == (272, 640)
        assert np.isfinite(d.motion).all() and (d.motion >= 0).all() and d.motion.max() < 2000
        assert (0 <= d.intra).all() and (d.intra <= 1).all() and 0 <= d.intra_share <= 1
        change = d.change_map((16, 16))
        assert (0 <= change).all() and (change <= 1).all()
    steady = [d for d, cut in zip(data[1:], expected[1:]) if not cut]
    assert all(d.intra_share < CUT_INTRA_SHARE for d in steady) and all(d.motion.mean() > 1 for d in steady)


# -- the data structure itself ------------------------------------------------------------------


def test_change_map_weights_cells_by_area_and_measures_travel_in_patches_of_each_axis() -> None:
    """A 20 x 40 frame on 16-pixel cells: rows of 16 and 4 pixels, columns of 16, 16 and 8. On a 1 x 1
    grid a patch is 40 pixels across and 20 down; on a 1 x 2 grid 20 by 20."""
    across = np.array([[0.0, 32.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    down = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 0.0]], np.float32)
    intra = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    data = CodecSideData(across, down, intra, 0.2, False, 3, 0, height=20, width=40)
    area = np.outer([16, 4], [16, 16, 8])
    cell = np.array([[0.0, 32 / 40, 1.0], [8 / 20, 0.0, 0.0]])  # max(intra, min(1, travel in patches))
    assert data.change_map((1, 1))[0, 0] == pytest.approx((cell * area).sum() / 800)
    # Columns [0, 20) and [20, 40); 32 pixels across is 1.6 patches of 20: a full change.
    left = (16 * 4 * 1.0 + 4 * 16 * 8 / 20) / 400
    assert data.change_map((1, 2))[0] == pytest.approx([left, (16 * 12 + 16 * 8) / 400])
    assert data.change_map((1, 1), motion_scale=2.0)[0, 0] < data.change_map((1, 1))[0, 0]
    assert data.motion == pytest.approx(np.hypot(across, down))
    with pytest.raises(InputError):
        data.change_map((0, 3))
    with pytest.raises(ConfigError):
        data.change_map((2, 2), motion_scale=0)
    with pytest.raises(InputError, match="16-pixel grid"):
        CodecSideData(across[:1], down, intra, 0.2, False, 3, 0, height=20, width=40)


def test_travel_counts_in_each_axis_patch_size_on_a_wide_frame(tmp_path: Path) -> None:
    """A 96 x 384 frame on a 4 x 4 grid has patches 24 pixels tall and 96 wide. Panning 2 pixels per
    frame for a 25-frame interval moves the content two patches when the pan goes down (a full
    change) and half of one when it goes across."""
    height, width, frames = 96, 384, 51
    across = pan(frames, 2, height=height, width=width)
    scene = texture(height + 2 * frames, width, 3)
    down = [scene[2 * i : 2 * i + height].copy() for i in range(frames)]
    for clip, expected in ((down, 1.0), (across, 50 / 96)):
        data = read(encode(tmp_path / "pan.mp4", clip, **{"x264-params": "bframes=0:ref=1"}))
        inside = data[2].change_map((4, 4))[1:-1, 1:-1]  # away from the entering strip
        assert np.median(inside) == pytest.approx(expected, abs=0.05)


VECTOR = np.dtype([("source", "<i4"), ("w", "u1"), ("h", "u1"), ("src_x", "<i2"), ("src_y", "<i2"),
                   ("dst_x", "<i2"), ("dst_y", "<i2"), ("flags", "<u8"), ("motion_x", "<i4"), ("motion_y", "<i4"),
                   ("motion_scale", "<u2")])  # PyAV's MotionVectors.to_ndarray()


def vectors(*blocks: tuple[int, int, int, int, int, int, int]) -> np.ndarray:
    """(source, x, y, w, h, motion_x, motion_y) per block, top-left corner in pixels, motion in quarter pixels."""
    array = np.zeros(len(blocks), VECTOR)
    for row, (source, x, y, w, h, mx, my) in zip(array, blocks):
        row["source"], row["w"], row["h"], row["dst_x"], row["dst_y"] = source, w, h, x + w // 2, y + h // 2
        row["motion_x"], row["motion_y"], row["motion_scale"] = mx, my, 4
    return array


def test_blocks_are_weighted_by_area_and_a_block_predicted_twice_counts_once() -> None:
    """A 32 x 48 frame (2 x 3 macroblocks). P-frame: a 16 x 16 block moved 2 px (8/4) over cell (0, 0);
    an 8 x 8 block (top left) and a 16 x 8 block (bottom) moved 5 px (3-4-5 triangle) over 3/4 of cell
    (0, 1); the rest intra-coded. Then a B-frame predicting cell (1, 2) from both directions (two vectors
    for one block)."""
    accumulator = CodecAccumulator()
    accumulator.add_decoded(32, 48, "I", None)
    accumulator.take()
    moved = vectors((-1, 0, 0, 16, 16, 8, 0), (-1, 16, 0, 8, 8, 12, 16), (-1, 16, 8, 16, 8, 12, 16))
    accumulator.add_decoded(32, 48, "P", moved)
    accumulator.add_decoded(32, 48, "B", vectors((-1, 32, 16, 16, 16, 40, 0), (1, 32, 16, 16, 16, -40, 0)))
    data = accumulator.take()
    # Cell (0, 1): 3 and 4 pixels (of a 5-pixel move) over 3/4 of its area. B-frames add no motion.
    assert data.motion_x == pytest.approx(np.array([[2.0, 2.25, 0.0], [0.0, 0.0, 0.0]]))
    assert data.motion_y == pytest.approx(np.array([[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]))
    assert data.motion == pytest.approx(np.array([[2.0, 3.75, 0.0], [0.0, 0.0, 0.0]]))
    p_intra, b_intra = np.array([[0.0, 0.25, 1.0], [1.0, 1.0, 1.0]]), np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert data.intra == pytest.approx((p_intra + b_intra) / 2)
    assert data.intra_share == pytest.approx((p_intra.mean() + b_intra.mean()) / 2)
    assert (data.decoded_frames, data.keyframes, data.cut) == (2, 0, True)  # the B-frame is 5/6 intra: a cut


def test_accumulator_rejects_misuse() -> None:
    accumulator = CodecAccumulator()
    with pytest.raises(StreamStateError):
        accumulator.take()
    with pytest.raises(InputError):
        accumulator.add_decoded(32, 32, "X", None)
    with pytest.raises(ConfigError):
        CodecAccumulator(cut_intra_share=0.0)
    accumulator.add_decoded(32, 32, "I", None)
    accumulator.add_decoded(32, 32, "P", None)  # a P-frame without vectors is all intra-coded: a cut
    data = accumulator.take()
    assert (data.decoded_frames, data.keyframes, data.cut, data.intra_share) == (2, 1, True, 1.0)
    accumulator.add_decoded(16, 48, "B", np.zeros(0, np.dtype([("w", "u1")])))  # the frame size changed
    assert accumulator.take().motion.shape == (1, 3)
