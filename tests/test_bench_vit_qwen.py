"""`streamtc bench vit --tower`: Qwen-VL towers at checkpoint widths, temporal patches as the
processors lay them out, the block FLOP model (against what torch counts in the towers), and a
short paired run on real footage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from streamtc.bench import qwen_towers as Q
from streamtc.bench.vit import Variant, load_qwen_frames, run_vit_benchmark
from streamtc.cacher import STCCacher
from streamtc.cacher import functional as F
from streamtc.cacher.towers import window_span
from streamtc.config import CacherConfig
from streamtc.errors import ConfigError, InputError


def test_temporal_patches_match_the_qwen_processors_layout():
    config = Q.qwen_vision_config("qwen2-vl", depth=1)
    frame = np.random.default_rng(0).random((3, 56, 84), dtype=np.float32)
    want, grid_h, grid_w = Qwen2VLImageProcessorPil().patchify(frame, 14, 2, 2)  # an image: its frame twice
    patches, grid = Q.temporal_patches(torch.from_numpy(np.stack([frame, frame])), config)
    assert grid.tolist() == [[1, grid_h, grid_w]] and len(patches) == 1
    np.testing.assert_array_equal(patches[0].numpy(), want)


def test_temporal_patches_put_the_two_frames_in_the_temporal_axis():
    config = Q.qwen_vision_config("qwen3-vl", depth=1)
    frames = torch.stack([torch.zeros(3, 64, 64), torch.ones(3, 64, 64)])
    (patch,), _ = Q.temporal_patches(frames, config)
    rows = patch.view(-1, 3, 2, 16 * 16)
    assert torch.all(rows[:, :, 0] == 0) and torch.all(rows[:, :, 1] == 1)
    with pytest.raises(InputError, match="even frame count"):
        Q.temporal_patches(frames[:1], config)


def test_configs_mirror_the_checkpoints_and_cut_depth_keeps_the_pattern():
    assert Q.qwen_vision_config("qwen2-vl").embed_dim == 1280
    full = Q.qwen_vision_config("qwen2.5-vl")
    assert (full.depth, full.fullatt_block_indexes, full.window_size) == (32, [7, 15, 23, 31], 112)
    assert Q.qwen_vision_config("qwen2.5-vl", depth=8).fullatt_block_indexes == [7]
    assert Q.qwen_vision_config("qwen2.5-vl", depth=4).fullatt_block_indexes == [3]
    assert Q.qwen_vision_config("qwen3-vl").deepstack_visual_indexes == [8, 16, 24]
    assert Q.qwen_vision_config("qwen3-vl", depth=17).deepstack_visual_indexes == [8, 16]
    with pytest.raises(ConfigError, match="qwen2-vl"):
        Q.qwen_vision_config("qwen4-vl")


def counted_tower_flops(name: str, depth: int, side: int, ratio: float = 0.25
                        ) -> tuple[float, float, tuple[int, int], STCCacher]:
    """(full, non-refresh, patch grid, the cacher): multiply-accumulates torch's FlopCounterMode counts in
    the tower's forward on one temporal patch of side x side merged tokens, unpatched and then under a
    Cacher (N = 2, r = ratio) on the next patch; eager attention and torch kernels, whose products it sees."""
    tower = Q.build_qwen_tower(name, depth)
    tower.config._attn_implementation = "eager"
    size = tower.config.patch_size * tower.config.spatial_merge_size * side
    patches, grid = Q.temporal_patches(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)),
                                       tower.config)
    cacher = STCCacher(CacherConfig(cache_interval=2, update_ratio=ratio, cpu_kernels="torch")).attach(tower)
    counts = []
    try:
        for rows in patches:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                tower(rows, grid_thw=grid)
            counts.append(counter.get_total_flops() / 2)
    finally:
        cacher.detach()
    assert cacher.stats.refresh_chunks == 1
    return counts[0], counts[1], (int(grid[0, 1]), int(grid[0, 2])), cacher


@pytest.mark.parametrize("name,depth", [("qwen2-vl", 2), ("qwen2.5-vl", 2), ("qwen3-vl", 9)])
def test_the_flop_model_is_what_torch_counts_in_the_tower(name, depth):
    """Full and non-refresh forwards at checkpoint widths (Qwen2.5-VL: a windowed and a full-attention
    block; Qwen3-VL: a DeepStack tap) against the FLOP model, on a grid of whole Qwen2.5-VL windows; the
    Cacher's own count of the blocks (its stats) is the same model."""
    full, reused, grid, cacher = counted_tower_flops(name, depth, side=8)
    config = Q.qwen_vision_config(name, depth)
    k = F.num_recomputed_tokens(grid[0] * grid[1], 0.25)
    assert full == Q.tower_flops(config, grid)
    assert reused == Q.tower_flops(config, grid, k)
    fixed = Q.fixed_flops(config, grid[0] * grid[1])
    assert cacher.stats.full_flops == pytest.approx(2 * (full - fixed), rel=1e-12)
    assert cacher.stats.flops == pytest.approx(full + reused - 2 * fixed, rel=1e-12)


def test_windows_cut_at_the_grid_edges_are_counted_as_cut():
    """A 12 x 12 patch grid holds one whole Qwen2.5-VL window (64 tokens) and three cut ones (32, 32,
    16): a windowed query attends to (64² + 2·32² + 16²) / 144 keys on average, not 64. The full forward
    is what torch counts; the non-refresh one depends on which windows the recomputed tokens fall in,
    so the model (every window in proportion) is checked within 2%."""
    assert window_span((12, 12), 4, 2) == pytest.approx((64**2 + 2 * 32**2 + 16**2) / 144)
    assert window_span((16, 8), 4, 2) == 64 and window_span((4, 4), 4, 2) == 16
    full, reused, grid, cacher = counted_tower_flops("qwen2.5-vl", 2, side=6)
    config = Q.qwen_vision_config("qwen2.5-vl", 2)
    assert grid == (12, 12) and full == Q.tower_flops(config, grid)
    assert reused == pytest.approx(Q.tower_flops(config, grid, F.num_recomputed_tokens(144, 0.25)), rel=0.02)
    assert cacher.stats.full_flops == pytest.approx(2 * (full - Q.fixed_flops(config, 144)), rel=1e-12)


@pytest.mark.parametrize("name", Q.QWEN_TOWERS)
def test_the_flop_model_of_recomputing_every_token_is_the_full_block(name):
    config = Q.qwen_vision_config(name, depth=8)
    assert Q.block_flops(config, (32, 32), 1024) == pytest.approx(Q.block_flops(config, (32, 32)))
    assert 0.29 < Q.block_flops(config, (32, 32), 256) / Q.block_flops(config, (32, 32)) < 0.32
    assert Q.tower_flops(config, (32, 32)) > Q.block_flops(config, (32, 32))


def test_a_short_paired_run_on_the_street_clip():
    frames = load_qwen_frames("demo", "qwen2.5-vl", 4, image_size=56)
    assert frames.shape == (4, 3, 56, 56)
    variants = (Variant("full", None), Variant("stc N=2", CacherConfig(cache_interval=2)))
    report = run_vit_benchmark(frames, num_layers=1, variants=variants, repeats=1, warmup=0, tower="qwen2.5-vl")
    assert report["preset"] == "qwen2.5-vl" and report["frames"] == 2 and report["tokens_per_frame"] == 16
    full, stc = report["variants"]
    assert full["time_ratio"] == 1.0 and stc["refresh_frames"] == 1
    assert stc["per_frame_token_cosine"][0] == pytest.approx(1.0, abs=1e-5)
    full, reused, grid, _ = counted_tower_flops("qwen2.5-vl", 1, side=2)  # what torch counts in this tower
    assert grid == (4, 4) and stc["flop_ratio"] == pytest.approx((full + reused) / (2 * full), rel=1e-9)


def test_a_downscaled_temporal_patch_is_timed_and_counted_with_the_towers_fixed_costs():
    """Every chunk stale (threshold 0) and no refresh credit after the first: the second temporal patch
    is downscaled to 2 x 2 patches. Its FLOPs: the small grid's blocks, as torch counts them, plus the
    patch embedding and merger of the full grid, which run in full."""
    frames = load_qwen_frames("demo", "qwen2.5-vl", 4, image_size=56)
    variants = (Variant("full", None), Variant("robust", CacherConfig.robust(2, flop_budget=0.4, stale_threshold=0.0)))
    report = run_vit_benchmark(frames, num_layers=1, variants=variants, repeats=1, warmup=0, tower="qwen2.5-vl")
    robust = report["variants"][1]
    assert robust["refresh_pattern"] == "RD" and robust["downscale_frame_ratio"] > 0 and robust["refresh_frames"] == 1
    config = Q.qwen_vision_config("qwen2.5-vl", 1)
    full, _, _, _ = counted_tower_flops("qwen2.5-vl", 1, side=2)
    small_blocks = counted_tower_flops("qwen2.5-vl", 1, side=1)[0] - Q.fixed_flops(config, 4)
    fixed = Q.fixed_flops(config, 16)
    assert robust["flop_ratio"] == pytest.approx((full + small_blocks + fixed) / (2 * full), rel=1e-9)
