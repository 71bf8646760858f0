"""Comparison baselines: known answers on hand-built tensors, budgets and runs on the tiny presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from streamtc.baselines import (
    RandomPruner,
    ToMe,
    UniformPruner,
    VidCom2Pruner,
    VisionZipPruner,
    attention_received,
    pool_scores,
    tome_schedule,
)
from streamtc.baselines.tome import bipartite_merge, merge_weighted
from streamtc.baselines.vidcom2 import frame_budgets
from streamtc.config import PrunerConfig
from streamtc.errors import ConfigError, InputError, StreamStateError, UnsupportedModelError
from streamtc.presets import build_model
from streamtc.pruner import STCPruner, TokenSelector

E = torch.eye(8)


@pytest.fixture(scope="module")
def video(llava_ov_model):
    """Pooled video features [F, 16, D] of the tiny LLaVA-OV and the attention each token receives [F, 16]."""
    pixels = torch.randn(1, 4, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = llava_ov_model.model.get_video_features(
            pixel_values_videos=pixels, vision_feature_layer=-1, vision_feature_select_strategy="full",
            output_attentions=True,
        )
    features = out.pooler_output[0, :-1].view(4, 16, -1)
    attention = pool_scores(attention_received(out.attentions[-2]), 4)  # VisionZip reads the penultimate layer
    return features, attention


# --- uniform and random -------------------------------------------------------------------------

def test_uniform_picks_evenly_spaced_positions() -> None:
    features = torch.randn(3, 10, 4)
    kept = UniformPruner(tokens_per_frame=4).prune(features)
    assert kept.indices.tolist() == [[1, 3, 6, 8]] * 3  # floor((i + 0.5) * 10 / 4)
    assert torch.equal(kept.tokens, features[:, [1, 3, 6, 8]])
    assert UniformPruner(tokens_per_frame=10).prune(features).indices[0].tolist() == list(range(10))
    assert UniformPruner(keep_ratio=0.3).prune(torch.randn(1, 196, 4)).indices.unique().numel() == 59


def test_random_is_distinct_sorted_and_reproducible_after_reset() -> None:
    features = torch.randn(5, 196, 4)
    pruner = RandomPruner(keep_ratio=0.3, seed=7)
    first = pruner.prune(features).indices
    assert first.shape == (5, 59)
    assert torch.all(first[:, 1:] > first[:, :-1])
    assert not torch.equal(first[0], first[1])  # fresh draws per frame
    assert not torch.equal(pruner.prune(features).indices, first)  # and per call
    pruner.reset()
    assert torch.equal(pruner.prune(features).indices, first)
    assert not torch.equal(RandomPruner(keep_ratio=0.3, seed=8).prune(features).indices, first)


# --- VisionZip ----------------------------------------------------------------------------------

def test_visionzip_keeps_top_attention_tokens_and_merges_the_rest_into_targets() -> None:
    features = torch.stack([
        E[0], E[4], E[0] + 0.1 * E[2], E[1], E[5], E[1] + 0.1 * E[2], E[6], E[1],
    ]).unsqueeze(0)
    attention = torch.tensor([[0.0, 0.9, 0.1, 0.0, 0.8, 0.1, 0.7, 0.0]])
    kept = VisionZipPruner(tokens_per_frame=5, contextual_share=0.4).prune(features, attention)
    # Dominant: 1, 4, 6. Remaining 0, 2, 3, 5, 7; targets every 2nd of them: 0 and 3.
    # Token 2 joins target 0; tokens 5 and 7 join target 3.
    assert kept.indices.tolist() == [[0, 1, 3, 4, 6]]
    tokens = kept.tokens[0]
    assert torch.allclose(tokens[0], (E[0] + E[0] + 0.1 * E[2]) / 2)
    assert torch.allclose(tokens[2], (E[1] + E[1] + 0.1 * E[2] + E[1]) / 3)
    for slot, position in ((1, 1), (3, 4), (4, 6)):
        assert torch.equal(tokens[slot], features[0, position])


def test_visionzip_needs_matching_attention() -> None:
    pruner = VisionZipPruner(tokens_per_frame=4)
    with pytest.raises(InputError, match="attention"):
        pruner.prune(torch.randn(2, 16, 8))
    with pytest.raises(InputError, match=r"\(2, 16\)"):
        pruner.prune(torch.randn(2, 16, 8), torch.rand(2, 49))
    with pytest.raises(ConfigError):
        VisionZipPruner(contextual_share=1.0)


def test_attention_received_and_pooling(llava_ov) -> None:
    weights = torch.softmax(torch.randn(2, 4, 49, 49), dim=-1)
    received = attention_received(weights)
    assert torch.allclose(received.sum(-1), torch.ones(2))  # mean of softmax rows sums to one
    clip_like = attention_received(weights, class_token=True)
    assert torch.equal(clip_like, weights[:, :, 0, 1:].mean(1))
    # Scores pool exactly as LLaVA-OneVision pools its tokens.
    pooled = pool_scores(received, 4)
    assert torch.allclose(pooled, llava_ov.model.apply_pooling(received.unsqueeze(-1)).squeeze(-1))
    with pytest.raises(InputError, match="square"):
        pool_scores(torch.rand(2, 50), 4)


# --- VidCom2 ------------------------------------------------------------------------------------

def test_frame_budgets_favour_unique_frames_and_sum_exactly() -> None:
    # softmax(u / 0.01) ~ [0, 0, 1]: scales base * (1 + p - 1/3) = base * (2/3, 2/3, 5/3).
    assert frame_budgets(torch.tensor([0.0, 0.0, 1.0]), k=6, num_tokens=16) == [4, 4, 10]
    # Capped at P: the unique frame keeps all 16, the excess goes back to the others.
    assert frame_budgets(torch.tensor([0.0, 0.0, 1.0]), k=12, num_tokens=16) == [10, 10, 16]
    # Every frame keeps at least one token.
    counts = frame_budgets(torch.tensor([0.0, 0.0, 0.0, 5.0]), k=1, num_tokens=16)
    assert counts == [1, 1, 1, 1]


def test_vidcom2_keeps_outlier_tokens() -> None:
    # Channels 0-3: all tokens e0 but token 9 (e3). Channels 4-7: loud noise, the high-variance
    # half that scoring ignores.
    g = torch.Generator().manual_seed(0)
    features = E[0].repeat(1, 12, 1)
    features[0, 9] = E[3]
    features[0, :, 4:] = 10 * torch.randn(12, 4, generator=g)
    kept = VidCom2Pruner(tokens_per_frame=1).prune(features)
    assert kept.indices.tolist() == [[9]] and kept.lengths.tolist() == [1]


def test_vidcom2_gives_unique_frames_more_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    features = E[0] + 0.05 * torch.randn(4, 16, 8, generator=g)
    features[2] = E[5] + 0.05 * torch.randn(16, 8, generator=g)  # a cut: frame 2 differs
    kept = VidCom2Pruner(tokens_per_frame=4).prune(features)
    assert kept.num_kept == 16
    assert int(kept.lengths.argmax()) == 2 and int(kept.lengths[2]) > 4
    mask = kept.mask()
    assert torch.all(kept.indices[~mask] == 16) and torch.all(kept.tokens[~mask] == 0)
    for f in range(4):
        real = kept.indices[f, mask[f]]
        assert torch.all(real[1:] > real[:-1])
        assert torch.equal(kept.tokens[f, mask[f]], features[f, real])


# --- every selector, same interface, on the tiny preset -----------------------------------------

SELECTORS = {
    "stc-gaussian": lambda k: STCPruner(PrunerConfig(scoring="gaussian", tokens_per_frame=k)),
    "stc-dual_anchor": lambda k: STCPruner(PrunerConfig(scoring="dual_anchor", tokens_per_frame=k)),
    "uniform": lambda k: UniformPruner(tokens_per_frame=k),
    "random": lambda k: RandomPruner(tokens_per_frame=k),
    "visionzip": lambda k: VisionZipPruner(tokens_per_frame=k),
    "vidcom2": lambda k: VidCom2Pruner(tokens_per_frame=k),
}


@pytest.mark.parametrize("name", SELECTORS)
def test_every_selector_returns_the_budget_on_the_tiny_preset(name: str, video) -> None:
    features, attention = video
    selector = SELECTORS[name](5)
    assert isinstance(selector, TokenSelector)
    extra = {"attention": attention} if isinstance(selector, VisionZipPruner) else {}
    kept = selector.prune(features, **extra)
    assert kept.num_kept == 4 * 5
    assert kept.tokens.shape[0] == 4 and kept.tokens.shape[-1] == features.shape[-1]
    selector.reset()
    with pytest.raises(InputError, match="NaN"):
        selector.prune(torch.full((1, 16, 8), float("nan")), **({"attention": torch.rand(1, 16)} if extra else {}))


# --- ToMe ---------------------------------------------------------------------------------------

def test_tome_schedule_hits_the_target_exactly() -> None:
    assert tome_schedule(49, 2, 16) == [17, 16]
    # 49 -> 13 needs r = 23 first: with less, layer 1's cap (half of what is left) is too small.
    assert tome_schedule(49, 2, 13) == [23, 13]
    assert tome_schedule(50, 2, 17, class_token=True) == [17, 16]
    assert tome_schedule(729, 26, 182) == [22] * 24 + [19, 0]
    with pytest.raises(ConfigError, match="cannot merge"):
        tome_schedule(49, 2, 5)
    with pytest.raises(ConfigError):
        tome_schedule(49, 2, 0)


def test_bipartite_merge_merges_the_closest_pairs_by_size() -> None:
    # Tokens alternate A, B. A0 = B0 exactly, A1 is far from everything; merging r = 1 must fold
    # A0 into B0, keep A1 and both B tokens, in that order.
    metric = torch.stack([E[0], E[0], E[1], E[2]]).unsqueeze(0)
    x = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
    size = torch.tensor([[[1.0], [2.0], [1.0], [1.0]]])
    merged, new_size = merge_weighted(bipartite_merge(metric, 1, class_token=False), x, size)
    assert merged.flatten().tolist() == pytest.approx([5.0, (1.0 * 1 + 3.0 * 2) / 3, 7.0])
    assert new_size.flatten().tolist() == [1.0, 3.0, 1.0]
    # The class token (position 0) is never merged, even when it is the best match.
    merged, _ = merge_weighted(bipartite_merge(metric, 1, class_token=True), x, size)
    assert merged[0, 0].item() == 1.0 and merged.shape[1] == 3


@pytest.mark.parametrize(("preset", "keep"), [("tiny-siglip", 16), ("tiny-clip", 17)])
def test_tome_returns_the_budget_and_removes_cleanly(preset: str, keep: int) -> None:
    model = build_model(preset)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(pixel_values=pixels).last_hidden_state
        tome = ToMe(keep_tokens=keep).apply(model)
        out = model(pixel_values=pixels, output_hidden_states=True)
        assert out.last_hidden_state.shape == (2, keep, 64)
        assert [h.shape[1] for h in out.hidden_states] == [reference.shape[1], 32 + (keep == 17), keep]
        assert torch.all(tome.sizes.sum(dim=1) == reference.shape[1])  # every input token is accounted for
        if preset == "tiny-clip":
            assert torch.all(tome.sizes[:, 0] == 1)  # the class token was never merged
        tome.remove()
        assert torch.equal(model(pixel_values=pixels).last_hidden_state, reference)
    assert all("forward" not in vars(layer) for layer in model.encoder.layers)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tome_with_nothing_to_merge_is_the_original_forward(attn: str) -> None:
    model = build_model("tiny-siglip", attn_implementation=attn)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(pixel_values=pixels).last_hidden_state
        ToMe(r=0).apply(model)
        assert torch.equal(model(pixel_values=pixels).last_hidden_state, reference)


def test_proportional_attention_makes_a_merged_duplicate_count_twice() -> None:
    # Tokens 0/1 and 2/3 are exact duplicates. After layer 0 merges them (size 2 each), layer 1's
    # proportional attention must give the same outputs as the unmerged tower at those tokens.
    model = build_model("tiny-siglip")
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(1, 6, 64, generator=g)
    x = torch.cat([distinct[:, :1], distinct[:, :1], distinct[:, 1:2], distinct[:, 1:2], distinct[:, 2:]], dim=1)
    with torch.no_grad():
        reference = model.encoder(inputs_embeds=x).last_hidden_state  # [1, 8, 64]
        tome = ToMe(r=[2, 0]).apply(model)
        merged = model.encoder(inputs_embeds=x).last_hidden_state  # [1, 6, 64]
        # Output order: unmerged A tokens (4, 6), then B tokens (1, 3, 5, 7).
        assert tome.sizes.flatten().tolist() == [1, 1, 2, 2, 1, 1]
        assert torch.allclose(merged, reference[:, [4, 6, 1, 3, 5, 7]], atol=1e-5)
        tome.remove()


def test_tome_finds_the_vision_layers_only_and_rejects_misuse(llava_ov) -> None:
    tome = ToMe(r=2).apply(llava_ov)
    assert len(tome.schedule) == 2  # the two SigLIP layers; the Qwen2 text layers are untouched
    with pytest.raises(StreamStateError, match="already"):
        ToMe(r=1).apply(llava_ov)
    with pytest.raises(StreamStateError, match="already applied"):
        tome.apply(llava_ov)
    tome.remove()
    with pytest.raises(UnsupportedModelError, match="SiglipEncoderLayer"):
        ToMe(r=1).apply(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="2 layers"):
        ToMe(r=[1, 2, 3]).apply(llava_ov)
    with pytest.raises(ConfigError):
        ToMe(r=1, keep_tokens=10)
    with pytest.raises(ConfigError):
        ToMe(r=-1)
