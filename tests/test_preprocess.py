"""Our frame preprocessing equals transformers' resize -> rescale -> normalize on real frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_transforms import normalize, rescale, resize
from transformers.image_utils import ChannelDimension, PILImageResampling

from streamtc import InputError
from streamtc.preprocess import FramePreprocessor
from streamtc.sources import open_source


def test_matches_transformers_primitives_on_real_frames():
    frames = np.stack([f.image for f in open_source("demo", fps=0.5)])
    ours = FramePreprocessor(size=384)(frames)
    expected = []
    for frame in frames:
        x = resize(frame, (384, 384), resample=PILImageResampling.BICUBIC, input_data_format=ChannelDimension.LAST)
        x = rescale(x, 1 / 255, input_data_format=ChannelDimension.LAST)
        x = normalize(x, [0.5] * 3, [0.5] * 3, input_data_format=ChannelDimension.LAST)
        expected.append(torch.from_numpy(np.asarray(x, dtype=np.float32)).permute(2, 0, 1))
    assert ours.shape == (5, 3, 384, 384)
    assert (ours - torch.stack(expected)).abs().max() <= 1e-6


def test_pil_and_array_inputs_agree():
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    pre = FramePreprocessor(size=56)
    assert torch.equal(pre(frames), pre([Image.fromarray(f) for f in frames]))
    assert torch.equal(pre(frames), pre(torch.from_numpy(frames)))


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.float32), [], [1, 2]])
def test_bad_frames_raise(bad):
    with pytest.raises(InputError):
        FramePreprocessor(size=56)(bad)
