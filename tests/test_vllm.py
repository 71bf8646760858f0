"""streamtc.vllm on CPU, with the shapes vLLM passes: the mask keeps exactly the count that sized
the placeholders, for every grid and rate; the kept set is STCPruner's on the same frames; calls are
stateless per request; kept tokens' M-RoPE ids are vLLM's; install/uninstall on stand-in modules
laid out as vLLM's (vLLM itself is not installable here)."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from streamtc import PrunerConfig, STCPruner
from streamtc.errors import ConfigError, InputError
from streamtc.vllm import STCVideoPruning, install, kept_mrope_positions, register, uninstall
from streamtc.vllm import compute_retained_tokens_count as default_count
from streamtc.vllm import compute_retention_mask as default_mask

RATES = (0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 0.99)
SCORINGS = ("gaussian", "dual_anchor")


def video(t: int, h: int, w: int, width: int = 24, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """vLLM's per-video embeddings [T * h * w, D] (rows: temporal patch, then row-major), drifting
    between patches as real frames do."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(h * w, width, generator=generator)
    return torch.cat([base + 0.3 * k * torch.randn(h * w, width, generator=generator) for k in range(t)]).to(dtype)


@pytest.mark.parametrize("scoring", SCORINGS)
def test_mask_keeps_exactly_the_placeholder_count_for_every_shape_and_rate(scoring: str) -> None:
    pruning = STCVideoPruning(scoring=scoring)
    for t in (1, 2, 3, 5):
        for h, w in ((1, 1), (1, 3), (2, 2), (3, 5), (4, 4)):
            embeds = video(t, h, w, seed=t * 31 + h * 7 + w)
            for merge in (1, 2):
                grid = (t, h * merge, w * merge)
                if merge == 2:
                    grid = torch.tensor(grid)  # vLLM passes a LongTensor row or a list
                for q in RATES:
                    count = pruning.compute_retained_tokens_count(h * w, t, q)
                    mask = pruning.compute_retention_mask(embeds, grid, merge, q)
                    assert mask.dtype == torch.bool and mask.shape == (t * h * w,)
                    assert int(mask.sum()) == count
                    per_patch = mask.view(t, -1).sum(dim=1)
                    assert bool((per_patch == per_patch[0]).all()) and per_patch[0] >= 1
                    assert count >= h * w  # at least one patch's worth, as vLLM's Qwen3-VL placeholders need


def test_counts() -> None:
    assert default_count(196, 16, 0.75) == 16 * 49  # the paper's 25%: 49 of 196 per frame
    assert default_count(196, 16, 0.7) == 16 * 59
    assert default_count(12, 2, 0.0) == 24
    assert default_count(12, 2, 0.9) == 12  # one patch's worth at least: 6 per patch, not 1
    assert default_count(12, 5, 0.9) == 15  # ceil(12 / 5) = 3 per patch
    assert default_count(12, 1, 0.5) == 12  # a single temporal patch is kept whole, as EVS keeps it
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        default_count(12, 2, 1.0)
    with pytest.raises(InputError, match="num_frames"):
        default_count(12, 0, 0.5)


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_set_is_stc_pruners_on_the_same_frames(scoring: str, dtype: torch.dtype) -> None:
    t, h, w, q = 6, 3, 4, 0.7
    embeds = video(t, h, w, dtype=dtype)
    mask = STCVideoPruning(scoring=scoring).compute_retention_mask(embeds, (t, 2 * h, 2 * w), 2, q)
    k = STCVideoPruning.tokens_per_patch(h * w, t, q)
    assert k == round(0.3 * h * w)  # the share (4 of 12) when it exceeds one patch's worth over T
    kept = STCPruner(PrunerConfig(scoring=scoring, tokens_per_frame=k)).prune(embeds.view(t, h * w, -1))
    expected = torch.zeros(t, h * w, dtype=torch.bool).scatter_(1, kept.indices, True)
    assert torch.equal(mask.view(t, -1), expected)
    assert torch.equal(embeds[mask].view(t, -1, embeds.shape[-1]), kept.tokens)  # vLLM's emb[mask]


def test_stateless_per_request() -> None:
    pruning = STCVideoPruning(scoring="dual_anchor")
    first, second = video(4, 3, 3, seed=1), video(4, 3, 3, seed=2)
    alone = pruning.compute_retention_mask(second, (4, 6, 6), 2, 0.5)
    pruning.compute_retention_mask(first, (4, 6, 6), 2, 0.5)
    assert torch.equal(pruning.compute_retention_mask(second, (4, 6, 6), 2, 0.5), alone)
    # the temporal anchor comes from the request's own earlier patches: patch 2 scored after 0, 1
    k = STCVideoPruning.tokens_per_patch(9, 4, 0.5)
    stream = STCPruner(PrunerConfig(scoring="dual_anchor", tokens_per_frame=k))
    later = [stream.prune(frame[None]).indices[0] for frame in second.view(4, 9, -1)]
    assert torch.equal(alone.view(4, 9).nonzero()[:, 1].view(4, -1), torch.stack(later))


def test_score_channels_scores_the_main_output_and_drops_rows_of_every_level() -> None:
    t, h, w, width = 4, 2, 3, 16
    main = video(t, h, w, width)
    deepstack = torch.randn(t * h * w, 3 * width) * 5  # three DeepStack levels as extra channels
    pruning = STCVideoPruning(score_channels=width)
    mask = pruning.compute_retention_mask(torch.cat([main, deepstack], dim=1), (t, 2 * h, 2 * w), 2, 0.5)
    assert torch.equal(mask, STCVideoPruning().compute_retention_mask(main, (t, 2 * h, 2 * w), 2, 0.5))
    with pytest.raises(InputError, match="score_channels"):
        STCVideoPruning(score_channels=999).compute_retention_mask(main, (t, 2 * h, 2 * w), 2, 0.5)


def test_bad_shapes_raise() -> None:
    with pytest.raises(InputError, match="temporal patches"):
        default_mask(video(2, 2, 2), (3, 4, 4), 2, 0.5)
    with pytest.raises(InputError, match=r"\[T \* H \* W"):
        default_mask(torch.zeros(2, 4, 8), (2, 4, 4), 2, 0.5)
    with pytest.raises(ConfigError, match="divisible"):
        default_mask(video(2, 2, 2), (2, 5, 4), 2, 0.5)


def vllm_compute_mrope_for_media(grid: tuple[int, int, int], merge: int, tokens_per_second: float,
                                 second_per_grid: float) -> torch.Tensor:
    """vLLM's `compute_mrope_for_media` (vllm/multimodal/evs.py) written out: [T * h * w, 4] rows of
    (floor(t * tokens_per_second * second_per_grid), row, column, grid width)."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    rows = [(int(k * tokens_per_second * second_per_grid), i, j, w)
            for k in range(t) for i in range(h) for j in range(w)]
    return torch.tensor(rows)


def test_kept_tokens_carry_vllms_mrope_ids() -> None:
    t, h, w, q = 5, 3, 4, 0.6
    grid = (t, 2 * h, 2 * w)
    mask = default_mask(video(t, h, w), grid, 2, q)
    carried = vllm_compute_mrope_for_media(grid, 2, 2.0, 1.0)[mask][:, :3].T  # Qwen2.5-VL at 2 fps
    interval = torch.tensor(2.0 * 1.0, dtype=torch.float32)
    assert torch.equal(kept_mrope_positions(mask, grid, 2, interval), carried)


# -- installing into (stand-in) vLLM modules -----------------------------------------------------


@pytest.fixture()
def fake_vllm(monkeypatch):
    """vLLM's layout in miniature: the EVS module and a model module that bound its functions with
    `from vllm.multimodal.evs import ...` (one under another name)."""
    def evs_count(tokens_per_frame, num_frames, q):
        return max(tokens_per_frame, int(tokens_per_frame * num_frames * (1 - q)))

    def evs_mask(video_embeds, video_size_thw, spatial_merge_size, q):
        return torch.ones(video_embeds.shape[0], dtype=torch.bool)

    modules = {name: types.ModuleType(name) for name in (
        "vllm", "vllm.multimodal", "vllm.multimodal.evs", "vllm.model_executor", "vllm.model_executor.models",
        "vllm.model_executor.models.qwen3_vl")}
    evs = modules["vllm.multimodal.evs"]
    evs.compute_retained_tokens_count, evs.compute_retention_mask = evs_count, evs_mask
    model = modules["vllm.model_executor.models.qwen3_vl"]
    model.compute_retained_tokens_count, model.evs_mask = evs_count, evs_mask
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield evs, model, (evs_count, evs_mask)
    uninstall()


def test_install_replaces_every_binding_and_uninstall_restores(fake_vllm, tmp_path, monkeypatch) -> None:
    evs, model, (evs_count, evs_mask) = fake_vllm
    replaced = install(STCVideoPruning(scoring="dual_anchor"))
    assert sorted(replaced) == sorted([
        "vllm.multimodal.evs.compute_retained_tokens_count", "vllm.multimodal.evs.compute_retention_mask",
        "vllm.model_executor.models.qwen3_vl.compute_retained_tokens_count",
        "vllm.model_executor.models.qwen3_vl.evs_mask"])
    # what the processor sizes and what the model keeps now agree with STC
    embeds = video(4, 2, 3)
    count = model.compute_retained_tokens_count(6, 4, 0.5)
    assert count == 12 and int(model.evs_mask(embeds, [4, 4, 6], 2, 0.5).sum()) == count
    # a module importing the functions after install binds STC's
    (tmp_path / "vllm_later_importer.py").write_text("from vllm.multimodal.evs import compute_retention_mask\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    later = importlib.import_module("vllm_later_importer")
    del sys.modules["vllm_later_importer"]
    assert later.compute_retention_mask(embeds, [4, 4, 6], spatial_merge_size=2, q=0.5).sum() == 12
    uninstall()
    assert (evs.compute_retained_tokens_count, evs.compute_retention_mask) == (evs_count, evs_mask)
    assert (model.compute_retained_tokens_count, model.evs_mask) == (evs_count, evs_mask)


def test_plugin_reads_the_environment(fake_vllm, monkeypatch) -> None:
    evs, _, (evs_count, _) = fake_vllm
    monkeypatch.delenv("STREAMTC_VLLM_PRUNER", raising=False)
    register()
    assert evs.compute_retained_tokens_count is evs_count  # unset: vLLM untouched
    monkeypatch.setenv("STREAMTC_VLLM_PRUNER", "gaussian")
    monkeypatch.setenv("STREAMTC_VLLM_SCORE_CHANNELS", "16")
    register()
    assert evs.compute_retention_mask.__self__ == STCVideoPruning(scoring="gaussian", score_channels=16)
    with pytest.raises(ConfigError, match="vidcom2"):
        install(method="vidcom2")  # no such module in the stand-in
    with pytest.raises(ConfigError, match="method must be"):
        install(method="magic")
