"""Token layouts: kept per-frame indices -> positions in a model's visual sequence, and back."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from streamtc.baselines import VidCom2Pruner
from streamtc.config import PrunerConfig
from streamtc.errors import ConfigError, InputError
from streamtc.pruner import FlatLayout, LlavaOnevisionVideoLayout, LlavaVideoLayout, QwenVLLayout, STCPruner


def video_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The merged video sequence LLaVA-OneVision scatters into its <video> tokens: [F * 16 + 1, D]."""
    with torch.no_grad():
        out = model.model.get_video_features(
            pixel_values_videos=pixels, vision_feature_layer=-1, vision_feature_select_strategy="full"
        )
    return out.pooler_output[0]


def test_llava_onevision_round_trip_on_the_tiny_model(llava_ov) -> None:
    frames = 4
    pixels = torch.randn(1, frames, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    sequence = video_features(llava_ov, pixels)
    layout = LlavaOnevisionVideoLayout(tokens_per_frame=16)  # tiny tower: 7x7 grid pooled to 4x4
    assert sequence.shape[0] == frames * 16 + 1

    features = layout.frame_tokens(sequence)
    # The layout's frame f is what the model produces for video frame f on its own.
    for f in range(frames):
        alone = video_features(llava_ov, pixels[:, f:f + 1])
        assert torch.allclose(features[f], alone[:16], atol=1e-5)
        assert torch.equal(alone[16], llava_ov.model.image_newline.detach())

    kept = STCPruner(PrunerConfig(scoring="dual_anchor", tokens_per_frame=5)).prune(features)
    positions = layout.kept_positions(kept.indices)
    assert torch.all(positions[1:] > positions[:-1])
    expected = torch.cat([kept.tokens.reshape(-1, sequence.shape[-1]), sequence[-1:]])
    assert torch.equal(sequence[positions], expected)
    assert torch.equal(sequence[positions[-1]], llava_ov.model.image_newline.detach())


def test_llava_onevision_round_trip_with_ragged_budgets(llava_ov) -> None:
    pixels = torch.randn(1, 3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    sequence = video_features(llava_ov, pixels)
    layout = LlavaOnevisionVideoLayout(tokens_per_frame=16)
    kept = VidCom2Pruner(tokens_per_frame=6).prune(layout.frame_tokens(sequence))
    assert kept.lengths.unique().numel() > 1  # the frames really got different budgets
    positions = layout.kept_positions(kept.indices, kept.lengths)
    assert positions.numel() == kept.num_kept + 1 == 3 * 6 + 1
    assert torch.equal(sequence[positions], torch.cat([kept.flat_tokens(), sequence[-1:]]))


def llava_video_sequence(frames: int, height: int, width: int) -> torch.Tensor:
    """Synthetic LLaVA-Video sequence: grid token (f, r, c) = [f, r, c, 1]; newline of row r = [f, r, -1, -1]."""
    rows = []
    for f in range(frames):
        for r in range(height):
            rows += [[f, r, c, 1] for c in range(width)] + [[f, r, -1, -1]]
    return torch.tensor(rows, dtype=torch.float32)


def test_llava_video_round_trip_keeps_every_row_newline() -> None:
    layout = LlavaVideoLayout(13, 13)
    sequence = llava_video_sequence(2, 13, 13)
    assert sequence.shape[0] == 2 * 13 * 14
    features = layout.frame_tokens(sequence)
    assert features.shape == (2, 169, 4)
    assert features[1, 5 * 13 + 7].tolist() == [1, 5, 7, 1]  # row-major grid numbering

    noisy = features + 0.1 * torch.randn(2, 169, 4, generator=torch.Generator().manual_seed(0))
    kept = STCPruner(PrunerConfig(scoring="gaussian", tokens_per_frame=40)).prune(noisy)
    positions = layout.kept_positions(kept.indices)
    assert torch.all(positions[1:] > positions[:-1])
    selected = sequence[positions]
    is_newline = selected[:, 3] == -1
    assert int(is_newline.sum()) == 2 * 13
    grid_tokens = selected[~is_newline]
    expected = torch.stack([features[f, kept.indices[f]] for f in range(2)]).reshape(-1, 4)
    assert torch.equal(grid_tokens, expected)
    # Each newline closes its row: it comes after that row's kept tokens and before the next row's.
    f_r = selected[:, 0] * 100 + selected[:, 1]
    assert torch.all(f_r[1:] >= f_r[:-1])
    newline_after = torch.nonzero(is_newline).flatten()
    assert all(selected[i + 1, 1] != selected[i, 1] for i in newline_after[:-1].tolist())


def test_llava_video_positions_match_the_released_mapping() -> None:
    # Released (STC / VidCom2) mapping: grid token at (i // 13) * 14 + i % 13 of its frame, plus
    # the 13 newline markers r * 14 + 13 of every frame, concatenated unsorted.
    indices = torch.tensor([[0, 12, 13, 100, 168], [1, 2, 50, 60, 167]])
    released = []
    for f, local in enumerate(indices):
        released.append(f * 182 + (local // 13) * 14 + local % 13)
        released.append(f * 182 + torch.arange(13) * 14 + 13)
    assert torch.equal(LlavaVideoLayout().kept_positions(indices), torch.cat(released).sort().values)


def test_flat_layout_offsets_frames() -> None:
    layout = FlatLayout(tokens_per_frame=10)
    indices = torch.tensor([[0, 9], [3, 4]])
    assert layout.kept_positions(indices).tolist() == [0, 9, 13, 14]
    sequence = torch.arange(30.0).unsqueeze(-1)
    assert layout.frame_tokens(sequence)[2, 4].item() == 24.0


def test_flat_layout_drops_ragged_padding() -> None:
    indices = torch.tensor([[1, 2, 10], [0, 10, 10]])  # padding index P = 10
    positions = FlatLayout(10).kept_positions(indices, lengths=torch.tensor([2, 1]))
    assert positions.tolist() == [1, 2, 10]


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
    assert torch.equal(features[positions], kept.tokens.reshape(-1, 16))
    coords = layout.mrope_positions(kept.indices, start_position=start, time_interval=time_interval)
    assert torch.equal(coords, full[:, positions])


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("layout", "length"), [
    (FlatLayout(196), 196 * 2 + 1),
    (LlavaOnevisionVideoLayout(196), 196 * 2),        # newline missing
    (LlavaOnevisionVideoLayout(196), 1),               # no frame
    (LlavaVideoLayout(13, 13), 169 * 2),               # newlines missing
    (QwenVLLayout((2, 4, 4)), 4 * 3),                  # 3 temporal patches, grid says 2
])
def test_sequence_not_matching_the_layout_raises(layout, length: int) -> None:
    with pytest.raises(InputError, match="does not match|temporal patches"):
        layout.frame_tokens(torch.zeros(length, 8))


def test_bad_indices_raise_input_error() -> None:
    with pytest.raises(InputError, match=r"\[0, 16\)"):
        LlavaOnevisionVideoLayout(16).kept_positions(torch.tensor([[0, 16]]))
    with pytest.raises(InputError, match="frames, k"):
        FlatLayout(16).kept_positions(torch.tensor([0, 1]))
    with pytest.raises(InputError, match="temporal patches"):
        QwenVLLayout((2, 4, 4)).kept_positions(torch.tensor([[0, 1]]))
    with pytest.raises(InputError, match="rank|tensor"):
        FlatLayout(4).frame_tokens(torch.zeros(2, 4, 8))


@pytest.mark.parametrize("build", [
    lambda: FlatLayout(0), lambda: LlavaVideoLayout(0, 13), lambda: QwenVLLayout((1, 5, 4)),
    lambda: QwenVLLayout((1, 4)),
])
def test_bad_layout_config_raises(build) -> None:
    with pytest.raises(ConfigError):
        build()
