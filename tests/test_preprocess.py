"""FramePreprocessor equals transformers' torchvision-free LLaVA-OneVision image processor,
bit for bit (tolerance 0), on real frames; it reads its settings from processors and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from streamtc.errors import ConfigError, InputError
from streamtc.preprocess import LLAVA_OV_MEAN, LLAVA_OV_STD, FramePreprocessor
from streamtc.sources import open_source


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """Five real 640x272 frames of the bikes clip (0.5 fps): a door, traffic, cars, a railing, a passer-by."""
    return np.stack([f.image for f in open_source("demo", fps=0.5)])


def transformers_video_path(processor: LlavaOnevisionImageProcessorPil, frames: np.ndarray) -> torch.Tensor:
    """The video processor's steps (resize to size -> rescale -> normalize) with the PIL processor's
    own primitives, frame by frame, on channels-first arrays as its backend uses them."""
    size = SizeDict(**processor.size) if isinstance(processor.size, dict) else processor.size
    out = []
    for frame in frames:
        x = processor.resize(np.moveaxis(frame, -1, 0), size=size, resample=processor.resample)
        x = processor.rescale(x, processor.rescale_factor)
        x = processor.normalize(x, processor.image_mean, processor.image_std)
        out.append(torch.from_numpy(x))
    return torch.stack(out)


@pytest.mark.parametrize("normalisation", ["llava-ov (0.5)", "clip"])
def test_bit_identical_to_the_pil_image_processor_on_real_frames(frames: np.ndarray, normalisation: str) -> None:
    kwargs = {"image_mean": list(LLAVA_OV_MEAN), "image_std": list(LLAVA_OV_STD)} if "0.5" in normalisation else {}
    processor = LlavaOnevisionImageProcessorPil(**kwargs)
    ours = FramePreprocessor.from_processor(processor)(frames)
    assert ours.shape == (5, 3, 384, 384) and ours.dtype == torch.float32
    assert torch.equal(ours, transformers_video_path(processor, frames))
    # the processor's public preprocess(): the first (base) view of its any-res output is the same image
    base_views = torch.stack([torch.from_numpy(processor.preprocess(f)["pixel_values"][0][0]) for f in frames[:2]])
    assert torch.equal(ours[:2], base_views)


def test_defaults_are_the_llava_onevision_checkpoint_settings() -> None:
    pre = FramePreprocessor()
    assert pre.size == (384, 384) and pre.image_mean == pre.image_std == (0.5, 0.5, 0.5)
    assert pre.resample == Image.Resampling.BICUBIC and pre.rescale_factor == 1 / 255
    assert FramePreprocessor.from_processor({}) == pre
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=56))
    assert FramePreprocessor.from_model_config(config) == FramePreprocessor(size=56)


def test_from_pretrained_reads_preprocessor_config(tmp_path: Path, frames: np.ndarray) -> None:
    processor = LlavaOnevisionImageProcessorPil(
        size={"height": 224, "width": 224}, resample=PILImageResampling.BILINEAR
    )
    processor.save_pretrained(tmp_path)
    pre = FramePreprocessor.from_pretrained(tmp_path)
    assert pre == FramePreprocessor.from_processor(json.loads((tmp_path / "preprocessor_config.json").read_text()))
    assert pre.size == (224, 224) and pre.resample == Image.Resampling.BILINEAR
    ours = pre(frames[:2])
    assert torch.equal(ours, transformers_video_path(processor, frames[:2]))
    bicubic = FramePreprocessor(size=224, image_mean=pre.image_mean, image_std=pre.image_std)(frames[:2])
    assert not torch.equal(ours, bicubic)  # the resample setting is honoured, not assumed
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ConfigError, match="preprocessor_config.json"):
            FramePreprocessor.from_pretrained(where)


def test_input_forms_agree(frames: np.ndarray) -> None:
    pre = FramePreprocessor(size=56)
    small = frames[:3]
    expected = pre(small)
    assert torch.equal(pre(torch.from_numpy(small)), expected)
    assert torch.equal(pre([Image.fromarray(f) for f in small]), expected)
    assert torch.equal(pre([Image.fromarray(f).convert("RGBA") for f in small]), expected)
    mixed = [small[0], small[1, :100, :200]]  # frames of different sizes
    assert torch.equal(pre(mixed)[1], pre(small[1:2, :100, :200])[0])


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4, 3), np.uint8), "frame axis"),
        (np.zeros((1, 4, 4, 3), np.float32), "uint8"),
        (np.zeros((1, 4, 4), np.uint8), "shape"),
        (np.zeros((1, 4, 4, 4), np.uint8), "RGB"),
        ([], "no frames"),
        ([1, 2], "PIL image"),
    ],
)
def test_bad_frames_raise_input_error(bad: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        FramePreprocessor(size=56)(bad)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"do_center_crop": True}, "do_center_crop"),
        ({"do_normalize": False}, "do_normalize"),
        ({"size": {"shortest_edge": 384}}, "height and width"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.5, 0.0, 0.5]}, "non-zero"),
        ({"resample": 9}, "resample"),
    ],
)
def test_unsupported_processor_settings_raise_config_error(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FramePreprocessor.from_processor(settings)
