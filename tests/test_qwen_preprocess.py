"""Qwen-VL preprocessing on real footage: per frame equal to transformers' torchvision-free
`Qwen2VLImageProcessorPil` (tolerance 0), the temporal patches of a chunk (odd frame count
included) equal to a plain loop re-implementation of the video processor's documented layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from streamtc.errors import ConfigError
from streamtc.hosts.qwen_preprocess import QwenVLPreprocessor, patchify_video, smart_resize
from streamtc.sources import builtin_clip_path, open_source

# (clip, min_pixels, max_pixels): bikes 640x272 kept near its size; carphone 176x144 scaled up to the
# video minimum; bikes scaled down under a small maximum.
CASES = [("bikes", 128 * 28 * 28, 768 * 28 * 28), ("carphone", 128 * 28 * 28, 768 * 28 * 28),
         ("bikes", 56 * 56, 96 * 28 * 28)]


def clip_frames(name: str, count: int) -> np.ndarray:
    frames = [f.image for f in open_source(str(builtin_clip_path(name)), fps=2.0)]
    assert len(frames) >= count
    return np.stack(frames[:count])


def reference_patches(frames: list[np.ndarray], patch: int = 14, temporal: int = 2, merge: int = 2) -> np.ndarray:
    """The video processor's layout written out with loops: temporal patch t, merge block (bi, bj),
    patch (mi, mj) in the block; one row = channels x frames of the patch x patch pixels; an odd
    last frame repeated."""
    channels, height, width = frames[0].shape
    steps = -(-len(frames) // temporal)
    rows = []
    for t in range(steps):
        group = [frames[min(t * temporal + k, len(frames) - 1)] for k in range(temporal)]
        for bi in range(height // patch // merge):
            for bj in range(width // patch // merge):
                for mi in range(merge):
                    for mj in range(merge):
                        i, j = bi * merge + mi, bj * merge + mj
                        cube = np.stack([g[:, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch] for g in group],
                                        axis=1)  # [C, temporal, p, p]
                        rows.append(cube.reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize(("clip", "min_pixels", "max_pixels"), CASES)
def test_each_frame_equals_the_pil_image_processor(clip: str, min_pixels: int, max_pixels: int) -> None:
    frames = clip_frames(clip, 3)
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    ours = QwenVLPreprocessor.from_processor(processor)
    assert (ours.min_pixels, ours.max_pixels) == (min_pixels, max_pixels)
    for frame, pixels in zip(frames, ours(frames)):
        expected = processor.preprocess(frame)
        rows, grid = patchify_video(torch.stack([pixels, pixels]))  # an image is a patch of two equal frames
        assert grid == tuple(expected["image_grid_thw"][0].tolist())
        assert torch.equal(rows, torch.as_tensor(np.asarray(expected["pixel_values"])))


@pytest.mark.parametrize(("clip", "min_pixels", "max_pixels"), CASES)
def test_an_odd_chunk_equals_the_documented_video_layout(clip: str, min_pixels: int, max_pixels: int) -> None:
    frames = clip_frames(clip, 5)
    pre = QwenVLPreprocessor(min_pixels=min_pixels, max_pixels=max_pixels)
    pixels = pre(frames)
    height, width = pre.frame_size(*frames.shape[1:3])
    assert all(p.shape == (3, height, width) for p in pixels)
    rows, grid = pre.patchify(pixels)
    assert grid == (3, height // 14, width // 14)
    assert torch.equal(rows, torch.from_numpy(reference_patches([p.numpy() for p in pixels])))


def test_smart_resize_equals_transformers() -> None:
    for height in range(20, 1500, 37):
        for width in (28, 100, 333, 640, 1280, 1919):
            if max(height, width) / min(height, width) < 200:
                for bounds in ((56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (56 * 56, 384 * 28 * 28)):
                    assert smart_resize(height, width, 28, *bounds) == hf_smart_resize(height, width, 28, *bounds)


def test_settings_are_validated_and_read_from_configs() -> None:
    with pytest.raises(ConfigError, match="min_pixels"):
        QwenVLPreprocessor(min_pixels=1000, max_pixels=10)
    with pytest.raises(ConfigError, match="do_normalize"):
        QwenVLPreprocessor.from_processor({"do_normalize": False})
    pre = QwenVLPreprocessor.from_processor({"size": {"shortest_edge": 3136, "longest_edge": 12845056}})
    assert (pre.min_pixels, pre.max_pixels) == (3136, 12845056)
