"""The downscaled encode on the Qwen-VL towers (tiny random towers, CPU): the token orders against the
processors' layout and the tower's own window index, the resized patch rows against resized frames,
and a stale chunk without refresh credit against the unpatched tower run on the resized frames."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as TF
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

from streamtc.bench import qwen_towers as Q
from streamtc.cacher import ChunkHints, STCCacher
from streamtc.cacher.downscale import downscale_grid, resize_patch_rows, sequence_cells
from streamtc.config import CacherConfig
from helpers import PATCH, TOWERS, assert_close_rel, build_tower, vision_config

GRID = (12, 10)  # patches: 6 x 5 merge blocks, Qwen2.5-VL's 2 x 2-block windows cut at the right edge


def video(count: int, grid: tuple[int, int] = GRID, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, grid[0] * PATCH, grid[1] * PATCH, generator=torch.Generator().manual_seed(seed))


def cell_image(grid: tuple[int, int]) -> torch.Tensor:
    """Two frames whose every patch holds its own cell index r * w + c."""
    cells = torch.arange(grid[0] * grid[1], dtype=torch.float32).view(1, 1, *grid)
    return cells.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3).expand(2, 3, -1, -1)


@pytest.mark.parametrize("grid", [GRID, (8, 8), (6, 14)])
def test_sequence_cells_follow_the_processors_layout_and_the_towers_windows(grid):
    config = vision_config("qwen2.5-vl")
    (rows,), _ = Q.temporal_patches(cell_image(grid), config)
    assert torch.equal(sequence_cells(grid, 2), rows[:, 0].long())  # what the processors lay out
    window_index, _ = get_vision_window_index(torch.tensor([[1, *grid]]), 2, config.window_size, PATCH)
    in_windows = rows[:, 0].long().view(-1, 4)[window_index].reshape(-1)  # how the tower reorders the blocks
    assert torch.equal(sequence_cells(grid, 2, window=config.window_size // PATCH // 2), in_windows)


def test_resized_patch_rows_are_the_resized_frames_cut_into_patch_rows():
    config, frames = vision_config("qwen2-vl"), video(4)
    rows, _ = Q.temporal_patches(frames, config)
    small = TF.interpolate(frames, size=(8 * PATCH, 6 * PATCH), mode="bilinear", antialias=True, align_corners=False)
    want, _ = Q.temporal_patches(small, config)
    got = resize_patch_rows(torch.cat(rows), GRID, (8, 6), 2, PATCH)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)


def reference_downscale(tower, frames: torch.Tensor, grid: tuple[int, int], window: int | None) -> torch.Tensor:
    """The downscaled encode written out: the unpatched tower on the resized frames, its blocks' output
    put in the frame, resized back (bilinear) and laid out in the tower's order of the full grid."""
    size = (grid[0] * PATCH, grid[1] * PATCH)
    small = TF.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    (rows,), _ = Q.temporal_patches(small, tower.config)
    with torch.no_grad():
        out = tower(rows, grid_thw=torch.tensor([[1, *grid]])).last_hidden_state
    frame = torch.empty_like(out)
    frame[sequence_cells(grid, 2, window)] = out
    frame = frame.view(1, *grid, -1).permute(0, 3, 1, 2)
    full = TF.interpolate(frame, size=GRID, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return full.reshape(-1, out.shape[-1])[sequence_cells(GRID, 2, window)]


@pytest.mark.parametrize("kind", TOWERS)
def test_a_cut_without_refresh_credit_is_encoded_downscaled(kind):
    """The second chunk holds two temporal patches: each is downscaled on its own."""
    tower, frames = build_tower(kind, "eager"), video(6)
    chunks, _ = Q.temporal_patches(frames, tower.config)
    cacher = STCCacher(CacherConfig.robust(2, flop_budget=0.6)).attach(tower)
    with torch.no_grad():
        tower(chunks[0], grid_thw=torch.tensor([[1, *GRID]]))  # the first chunk refreshes, runs into debt
        cacher.hint(ChunkHints(torch.ones(2, GRID[0] * GRID[1]), torch.tensor([True, False])))
        out = tower(torch.cat(chunks[1:]), grid_thw=torch.tensor([[2, *GRID]])).last_hidden_state
    cacher.detach()
    assert cacher.stats.downscaled_chunks == 1 and cacher.stats.refresh_chunks == 1
    # Credit (0.6 x 3 - 1) / 2 = 0.4 of the two-patch chunk's full cost: no refresh; the steady spend is
    # 0.6 - 0.1 of it, on the largest grid of merge blocks it pays for.
    config = tower.config
    grid = downscale_grid(GRID, lambda small: Q.block_flops(config, small) / Q.block_flops(config, GRID), 0.5, 2)
    assert grid[0] < GRID[0] and Q.block_flops(config, grid) <= 0.5 * Q.block_flops(config, GRID)
    assert cacher.stats.flops == pytest.approx(Q.block_flops(config, GRID) + 2 * Q.block_flops(config, grid), rel=1e-9)
    window = config.window_size // PATCH // 2 if kind == "qwen2.5-vl" else None
    want = torch.cat([reference_downscale(tower, frames[i:i + 2], grid, window) for i in (2, 4)])
    assert_close_rel(out, want)


def test_a_bfloat16_tower_is_downscaled_as_in_float32():
    """The antialiased resize has no half-precision CPU kernel: the patch rows are resized in float32."""
    frames, outputs = video(4), []
    for dtype in (torch.float32, torch.bfloat16):
        tower = build_tower("qwen2.5-vl").to(dtype)
        chunks, grid_thw = Q.temporal_patches(frames.to(dtype), tower.config)
        cacher = STCCacher(CacherConfig.robust(2, flop_budget=0.45)).attach(tower)
        with torch.no_grad():
            tower(chunks[0], grid_thw=grid_thw)
            cacher.hint(ChunkHints(torch.ones(1, GRID[0] * GRID[1]), torch.tensor([True])))
            outputs.append(tower(chunks[1], grid_thw=grid_thw).last_hidden_state.float())
        assert cacher.stats.downscaled_chunks == 1
        cacher.detach()
    assert torch.nn.functional.cosine_similarity(outputs[0], outputs[1], dim=-1).min() > 0.98
