"""Host token layouts: a model's visual sequence -> per-frame features for the Pruner, and the kept
per-frame indices -> positions (Qwen-VL: M-RoPE (t, h, w)) in that sequence."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from streamtc.baselines import VidCom2Pruner
from streamtc.config import PrunerConfig
from streamtc.errors import ConfigError, InputError
from streamtc.hosts.llava_onevision import LlavaOnevisionVideoLayout
from streamtc.hosts.qwen_vl import QwenVLLayout
from streamtc.pruner import STCPruner


def video_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The merged video sequence LLaVA-OneVision scatters into its <video> tokens: [F * 16 + 1, D]."""
    with torch.no_grad():
        out = model.model.get_video_features(
            pixel_values_videos=pixels, vision_feature_layer=-1, vision_feature_select_strategy="full"
        )
    return out.pooler_output[0]


def test_llava_onevision_frames_are_what_the_model_gives_each_frame_alone(llava_ov) -> None:
    frames = 4
    pixels = torch.randn(1, frames, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    sequence = video_features(llava_ov, pixels)
    layout = LlavaOnevisionVideoLayout.for_config(llava_ov.config)  # tiny tower: 7x7 grid pooled to 4x4
    assert layout.tokens_per_frame == 16 and sequence.shape[0] == frames * 16 + 1

    features = layout.frame_tokens(sequence)
    assert features.shape == (frames, 16, sequence.shape[-1])
    for f in range(frames):
        alone = video_features(llava_ov, pixels[:, f:f + 1])
        assert torch.allclose(features[f], alone[:16], atol=1e-5)
        assert torch.equal(alone[16], llava_ov.model.image_newline.detach())  # the newline is left out


@pytest.mark.parametrize(("model", "time_interval"), [(Qwen2VLModel, 1.0), (Qwen2_5_VLModel, 25 * 0.5)])
def test_qwen_mrope_positions_match_the_model(model, time_interval: float) -> None:
    grid_thw = (3, 8, 12)  # 3 temporal patches of 8x12 ViT patches -> 4x6 merged tokens each
    start = 7
    full = model.get_vision_position_ids(None, start, torch.tensor(grid_thw), 1, 2, time_interval)
    layout = QwenVLLayout(grid_thw)
    assert layout.tokens_per_frame == 24 and full.shape[1] == 3 * 24
    features = torch.randn(3 * 24, 16)
    kept = STCPruner(PrunerConfig(scoring="dual_anchor", tokens_per_frame=7)).prune(layout.frame_tokens(features))
    positions = layout.kept_positions(kept.indices)
    assert torch.equal(positions, (kept.indices + 24 * torch.arange(3)[:, None]).flatten())
    assert torch.equal(features[positions], kept.tokens.reshape(-1, 16))
    coords = layout.mrope_positions(kept.indices, start_position=start, time_interval=time_interval)
    assert torch.equal(coords, full[:, positions])


def test_qwen_positions_drop_ragged_padding() -> None:
    layout = QwenVLLayout((2, 4, 4))  # 2 temporal patches of 2x2 merged tokens
    kept = VidCom2Pruner(tokens_per_frame=2).prune(torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2)))
    positions = layout.kept_positions(kept.indices, kept.lengths)
    expected = [f * 4 + int(i) for f in range(2) for i in kept.indices[f, : int(kept.lengths[f])]]
    assert positions.tolist() == expected and positions.numel() == kept.num_kept


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("layout", "length"), [
    (LlavaOnevisionVideoLayout(196), 196 * 2),        # newline missing
    (LlavaOnevisionVideoLayout(196), 1),               # no frame
    (QwenVLLayout((2, 4, 4)), 4 * 3),                  # 3 temporal patches, grid says 2
    (QwenVLLayout((2, 4, 4)), 4 * 2 + 1),              # not whole patches
])
def test_sequence_not_matching_the_layout_raises(layout, length: int) -> None:
    with pytest.raises(InputError, match="does not match|temporal patches"):
        layout.frame_tokens(torch.zeros(length, 8))


def test_bad_indices_raise_input_error() -> None:
    with pytest.raises(InputError, match=r"\[0, 4\)"):
        QwenVLLayout((1, 4, 4)).kept_positions(torch.tensor([[0, 4]]))
    with pytest.raises(InputError, match="frames, k"):
        QwenVLLayout((1, 4, 4)).kept_positions(torch.tensor([0, 1]))
    with pytest.raises(InputError, match="temporal patches"):
        QwenVLLayout((2, 4, 4)).kept_positions(torch.tensor([[0, 1]]))
    with pytest.raises(InputError, match="tensor"):
        LlavaOnevisionVideoLayout(4).frame_tokens(torch.zeros(2, 4, 8))


@pytest.mark.parametrize("build", [
    lambda: LlavaOnevisionVideoLayout(0), lambda: QwenVLLayout((1, 5, 4)), lambda: QwenVLLayout((1, 4)),
    lambda: QwenVLLayout((0, 4, 4)),
])
def test_bad_layout_config_raises(build) -> None:
    with pytest.raises(ConfigError):
        build()
