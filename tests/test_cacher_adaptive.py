"""STC-Cacher's adaptive refresh (key and pixel signals, the refresh budget) and its over-budget
strided subset (docs/algorithms.md, sections 2.4 and 2.5), against the unpatched tower and plainly written forwards."""

from __future__ import annotations

import math

import pytest
import torch

from streamtc import CacherConfig, ConfigError
from streamtc.cacher import STCCacher
from streamtc.cacher import functional as F

from helpers import encode_chunks, layer_scaled_dinov2, pixel_drift, split_chunks

TOL = 1e-5


def test_adaptive_refresh_triggers_on_a_cut_and_not_on_a_still_scene(siglip):
    still = pixel_drift(1).repeat(4, 1, 1, 1)
    cut = pixel_drift(1, seed=9)
    cacher = STCCacher(CacherConfig(cache_interval=100, refresh="adaptive", refresh_signal="keys", refresh_threshold=0.9)).attach(siglip)
    try:
        out = encode_chunks(siglip, split_chunks(still, 1))
        assert cacher.stats.refresh_chunks == 1 and cacher.stats.adaptive_refreshes == 0
        cut_out = encode_chunks(siglip, [cut])
        assert cacher.stats.refresh_chunks == 2 and cacher.stats.adaptive_refreshes == 1
    finally:
        cacher.detach()
    full = encode_chunks(siglip, [torch.cat([still, cut])])
    assert torch.allclose(out, full[:4], atol=TOL)  # identical frames: reuse is exact
    assert torch.allclose(cut_out, full[4:], atol=TOL)  # the cut was computed exactly

def test_adaptive_cadence_counts_from_the_last_refresh(siglip):
    """After an adaptive refresh the next scheduled one is N chunks later, not at the next c % N."""
    still = pixel_drift(1).repeat(6, 1, 1, 1)
    sequence = torch.cat([still[:2], pixel_drift(1, seed=9).repeat(5, 1, 1, 1)])  # cut at chunk 2
    refreshed = adaptive_refresh_pattern(siglip, CacherConfig(cache_interval=4, refresh="adaptive", refresh_signal="keys"), sequence)
    assert refreshed == [True, False, True, False, False, False, True]


def test_reused_similarity_ignores_the_recomputed_tokens():
    similarity = torch.tensor([[1.0, 1.0, 1.0, -1.0], [0.5, 0.5, 0.5, 0.5]])
    assert torch.allclose(F.reused_similarity(similarity, 1), torch.tensor([1.0, 0.5]))
    assert torch.allclose(F.reused_similarity(similarity, 4), torch.tensor([1.0, 1.0]))


def test_reused_similarity_is_the_median_so_a_tail_of_flipped_keys_does_not_trigger():
    # One recomputed token (k = 1) and four reused: three unchanged, one whose key flipped.
    similarity = torch.tensor([[-1.0, -1.0, 0.95, 0.95, 0.95]])
    assert torch.allclose(F.reused_similarity(similarity, 1), torch.tensor([0.95]))
    # Most reused tokens moved (a cut): the median drops with them.
    assert torch.allclose(F.reused_similarity(torch.tensor([[-1.0, 0.1, 0.2, 0.3, 0.95]]), 1), torch.tensor([0.2]))


def test_reused_similarity_matches_the_median_of_the_top_tokens():
    similarity = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for k in (1, 12, 25, 49):
        expected = similarity.topk(50 - k, dim=-1).values.median(dim=-1).values
        assert torch.equal(F.reused_similarity(similarity, k), expected)


def test_refresh_budget_follows_the_fixed_schedules_count_on_every_prefix():
    # Spending every credit as soon as it exists reproduces the fixed schedule c % N == 0.
    for interval in (1, 2, 3, 5):
        refreshes = 0
        for chunk in range(40):
            if F.within_refresh_budget(chunk, refreshes, interval):
                refreshes += 1
                assert chunk % interval == 0
            assert refreshes == chunk // interval + 1


def adaptive_refresh_pattern(model, config, sequence):
    cacher = STCCacher(config).attach(model)
    refreshed = []
    try:
        for frame in sequence:
            before = cacher.stats.refresh_chunks
            encode_chunks(model, [frame[None]])
            refreshed.append(cacher.stats.refresh_chunks > before)
    finally:
        cacher.detach()
    return refreshed


def test_refresh_budget_caps_a_stream_of_cuts_at_the_fixed_count(siglip):
    cuts = torch.cat([pixel_drift(1, seed=s) for s in range(9)])  # every chunk a new scene
    config = dict(cache_interval=8, refresh="adaptive", refresh_signal="keys", refresh_threshold=0.99)
    assert adaptive_refresh_pattern(siglip, CacherConfig(**config), cuts) == [True] * 9  # uncapped: all refresh
    capped = adaptive_refresh_pattern(siglip, CacherConfig(**config, refresh_budget=2), cuts)
    assert capped == [c % 2 == 0 for c in range(9)]


def test_refresh_budget_banks_credit_on_a_still_scene_for_later_cuts(siglip):
    still = pixel_drift(1).repeat(4, 1, 1, 1)
    cuts = torch.cat([pixel_drift(1, seed=s) for s in range(1, 5)])
    config = CacherConfig(cache_interval=8, refresh="adaptive", refresh_signal="keys", refresh_threshold=0.99, refresh_budget=2)
    refreshed = adaptive_refresh_pattern(siglip, config, torch.cat([still, cuts]))
    # Chunks 1-3 bank one refresh; the cuts at 4, 5, 6 spend it and the new credit; 7 has none left.
    assert refreshed == [True, False, False, False, True, True, True, False]


def test_default_adaptive_threshold_ignores_small_motion_and_catches_a_cut(siglip):
    drift = pixel_drift(4)  # a base scene with small per-frame changes
    sequence = torch.cat([drift, pixel_drift(1, seed=9)])
    refreshed = adaptive_refresh_pattern(siglip, CacherConfig(cache_interval=100, refresh="adaptive", refresh_signal="keys"), sequence)
    assert refreshed == [True, False, False, False, True]


def test_relative_pixel_change_is_scale_free_and_zero_for_the_same_frame():
    reference = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    moved = torch.stack([reference, reference + 0.1, torch.randn(3, 8, 8)])
    change = F.relative_pixel_change(moved, reference)
    assert change[0] == 0 and 0 < change[1] < change[2]
    assert torch.allclose(F.relative_pixel_change(2 * moved, 2 * reference), change)  # any pixel normalisation


def test_pixel_signal_refreshes_on_a_cut_and_not_on_small_motion(siglip):
    sequence = torch.cat([pixel_drift(4), pixel_drift(1, seed=9), pixel_drift(3, seed=9)])  # drift, cut, drift of the new scene
    config = CacherConfig(cache_interval=100, refresh="adaptive")
    assert config.refresh_signal == "pixels" and config.refresh_threshold == 0.35
    assert adaptive_refresh_pattern(siglip, config, sequence) == [True, False, False, False, True, False, False, False]


def test_pixel_signal_respects_the_refresh_budget(siglip):
    cuts = torch.cat([pixel_drift(1, seed=s) for s in range(9)])
    capped = adaptive_refresh_pattern(siglip, CacherConfig(cache_interval=8, refresh="adaptive", refresh_budget=2), cuts)
    assert capped == [c % 2 == 0 for c in range(9)]


def test_pixel_signal_compares_against_the_reference_frame_not_the_previous_one(siglip):
    """Slow drift that never moves far between neighbours still refreshes once it is far from the reference."""
    g = torch.Generator().manual_seed(3)
    base, step = torch.randn(1, 3, 56, 56, generator=g), torch.randn(1, 3, 56, 56, generator=g)
    sequence = torch.cat([base + 0.12 * i * step for i in range(8)])
    refreshed = adaptive_refresh_pattern(siglip, CacherConfig(cache_interval=100, refresh="adaptive"), sequence)
    assert refreshed[0] and 1 <= sum(refreshed[1:]) < 7


def test_pixel_signal_refreshes_when_the_encoder_runs_without_its_tower(siglip):
    """No pixels to compare (the encoder called directly): the chunk counts as moved."""
    cacher = STCCacher(CacherConfig(cache_interval=100, refresh="adaptive")).attach(siglip)
    try:
        with torch.no_grad():
            for _ in range(2):
                siglip.encoder(siglip.embeddings(pixel_drift(1)))
        assert cacher.stats.refresh_chunks == 2
    finally:
        cacher.detach()


@pytest.mark.parametrize("kwargs,message", [
    (dict(refresh_signal="pixels", refresh_threshold=-0.1), "relative pixel change"),
    (dict(refresh_signal="keys", refresh_threshold=1.5), "cosine similarity"),
    (dict(refresh_signal="frames"), "refresh_signal"),
])
def test_refresh_threshold_is_checked_for_its_signal(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CacherConfig(refresh="adaptive", **kwargs)

# ---------------------------------------------------------------------------------------------
# over_budget="subsample": a cut the refresh budget cannot pay for is encoded exactly on a token subset.


def over_budget_config(**kwargs):
    return CacherConfig(cache_interval=8, refresh="adaptive", refresh_budget=4, over_budget="subsample", **kwargs)


def plain_subsampled_frame(tower, frame, ratio):
    """The tower's layers on an evenly strided subset of the patch grid, dropped tokens filled by the nearest kept one."""
    with torch.no_grad():
        x = tower.embeddings(frame[None])
        registers = getattr(tower.embeddings, "register_tokens", None)
        prefix = int(getattr(tower.embeddings, "cls_token", None) is not None) + (0 if registers is None else registers.shape[1])
        side = int(round((x.shape[1] - prefix) ** 0.5))
        keep_side = max(1, min(side, round(side * math.sqrt(ratio))))
        kept_1d = [round(i * (side - 1) / max(1, keep_side - 1)) for i in range(keep_side)] if keep_side > 1 else [0]
        kept = [r * side + c for r in kept_1d for c in kept_1d]
        rows = list(range(prefix)) + [k + prefix for k in kept]
        h = x[:, rows]
        for layer in (tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer):
            h = type(layer).forward(layer, h, None)
        fill = []
        for cell in range(side * side):
            r, c = divmod(cell, side)
            distances = [((r - k // side) ** 2 + (c - k % side) ** 2, j) for j, k in enumerate(kept)]
            fill.append(prefix + min(distances)[1])
        out = torch.cat([h[:, :prefix], h[:, fill]], dim=1)
        final = tower.post_layernorm if hasattr(tower, "post_layernorm") else tower.layernorm
        return final(out)[0]


@pytest.mark.parametrize("registers", [0, 4])
def test_over_budget_cut_is_the_plain_subsampled_forward_and_leaves_the_reference(registers):
    model = layer_scaled_dinov2(registers)
    cuts = torch.cat([pixel_drift(1, seed=s) for s in range(3)])  # every chunk a cut; budget 4 pays for chunk 0 only
    cacher = STCCacher(over_budget_config()).attach(model)
    got = encode_chunks(model, [cuts[0:1]])
    reference = cacher.state.values.clone(), cacher.state.residual_delta.clone()
    got = torch.cat([got, encode_chunks(model, [cuts[1:2]]), encode_chunks(model, [cuts[2:3]])])
    cacher.detach()
    assert cacher.stats.refresh_chunks == 1 and cacher.stats.subsampled_chunks == 2
    assert torch.equal(cacher.state.values, reference[0]) and torch.equal(cacher.state.residual_delta, reference[1])
    for i in (1, 2):
        assert (got[i] - plain_subsampled_frame(model, cuts[i], 0.32)).abs().max() <= TOL


def test_over_budget_subsample_of_the_whole_grid_is_the_unpatched_tower():
    model = layer_scaled_dinov2(4)
    cuts = torch.cat([pixel_drift(1, seed=s) for s in range(3)])
    expected = encode_chunks(model, [cuts])
    cacher = STCCacher(over_budget_config(subsample_ratio=1.0)).attach(model)
    got = encode_chunks(model, split_chunks(cuts, 1))
    cacher.detach()
    assert cacher.stats.subsampled_chunks == 2
    assert (got - expected).abs().max() <= TOL


def test_over_budget_subsample_counts_its_flops_and_only_fires_past_the_budget(siglip):
    still, cut = pixel_drift(3), pixel_drift(1, seed=9)
    cacher = STCCacher(over_budget_config()).attach(siglip)
    encode_chunks(siglip, split_chunks(torch.cat([still, cut, pixel_drift(1, seed=10)]), 1))
    cacher.detach()
    # chunk 0 refreshes; 1-2 reuse; the cut at 3 finds no credit (budget 4: one refresh by chunk 3) and is
    # subsampled; the cut at 4 has earned one and refreshes.
    assert cacher.stats.refresh_chunks == 2 and cacher.stats.subsampled_chunks == 1
    assert 0.3 < cacher.stats.flop_ratio < 0.7


def test_over_budget_subsample_needs_the_pixel_signal():
    with pytest.raises(ConfigError, match="over_budget"):
        CacherConfig(refresh="adaptive", refresh_signal="keys", over_budget="subsample")
    with pytest.raises(ConfigError, match="subsample_ratio"):
        CacherConfig(subsample_ratio=0.0)


def test_over_budget_motion_below_the_cut_threshold_is_reused_not_subsampled(siglip):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 3, 56, 56, generator=g)
    moving = torch.cat([base] + [base + 0.42 * torch.randn(1, 3, 56, 56, generator=g) for _ in range(3)])
    change = F.relative_pixel_change(moving[1:], moving[0])
    assert ((change > 0.35) & (change < 0.5)).all()  # moved past the refresh threshold, not a cut
    cacher = STCCacher(over_budget_config()).attach(siglip)
    encode_chunks(siglip, split_chunks(moving, 1))
    cacher.detach()
    assert cacher.stats.refresh_chunks == 1 and cacher.stats.subsampled_chunks == 0
