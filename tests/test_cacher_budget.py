"""refresh="budget" (the robust profile), codec hints and the downscaled encode, on tiny towers.

Independent references: the downscaled encode is recomputed here from the tower's own modules
(resize, embeddings, layers, bilinear resize, final norm); the budget is checked against FLOPs
counted here from the layer shapes; the tokens a codec-guided chunk recomputes against the patches
the hints say changed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as TF
from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

from helpers import reference_downscale

from streamtc.baselines.vit import CodecSkipping, UniformDownscaling
from streamtc.cacher import ChunkHints, STCCacher
from streamtc.cacher.budget import BudgetSignals, decide, is_stale
from streamtc.cacher.downscale import Downscale, downscale_grid, embed_downscaled, supports_downscale
from streamtc.cacher.state import CacherState
from streamtc.codec import CodecSideData
from streamtc.config import CacherConfig
from streamtc.errors import ConfigError, InputError

SIDE = 7  # patches per side of the tiny towers (56 px, patch 8)


def tiny_dinov2() -> Dinov2Model:
    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                                    patch_size=8, attn_implementation="eager")).eval()


def tiny_siglip() -> SiglipVisionModel:
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=56, patch_size=8,
                                                attn_implementation="eager")).eval()


def frames(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def hints(change: float | torch.Tensor, cut: bool = False) -> ChunkHints:
    change = torch.full((1, SIDE * SIDE), change) if isinstance(change, float) else change.reshape(1, -1)
    return ChunkHints(change.float(), torch.tensor([cut]))


def layer_macs(tokens: int, width: int = 32, mlp: int = 128) -> int:
    """Multiply-accumulates of one pre-LN layer on `tokens` tokens: q, k, v, o projections, QK^T and AV, MLP."""
    return 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp


# -- the decisions ---------------------------------------------------------------------------------


def signals(stale=False, cut=False, previous_cut=False, age=1, has_reference=True) -> BudgetSignals:
    return BudgetSignals(stale, cut, previous_cut, age, has_reference)


def test_budget_decisions_follow_the_credit():
    assert decide(signals(has_reference=False), -5.0, 0.5).action == "refresh"
    assert decide(signals(), 0.4, 0.5) == ("reuse", 0.0, "")
    assert decide(signals(), 1.1, 0.5).action == "reuse"  # a refresh banked, but not the margin
    assert decide(signals(age=2), 1.3, 0.5).action == "refresh"  # surplus spent on a refresh
    assert decide(signals(age=1), 1.3, 0.5).action == "reuse"  # not on a one-chunk-old reference
    assert decide(signals(stale=True), 1.0, 0.5).action == "refresh"
    assert decide(signals(stale=True, cut=True, previous_cut=True), 1.0, 0.5).action == "downscale"
    # Stale without refresh credit: a downscale at the steady cost, the budget less 0.1, whatever the
    # credit, at a cut or inside a shot, so that every such frame keeps the same grid.
    for stale in (signals(stale=True), signals(stale=True, cut=True)):
        for allowance in (0.0, 0.4, 0.9):
            decision = decide(stale, allowance, 0.5)
            assert decision.action == "downscale" and decision.spend == pytest.approx(0.4)
    # ... borrowing at most a refresh less one chunk's budget: 0.5 - 1 + 0.5 = 0 at -0.5 of credit.
    assert decide(signals(stale=True), -0.45, 0.5).spend == pytest.approx(0.05)
    assert decide(signals(stale=True), -0.6, 0.5).spend == 0.0


def test_stale_needs_the_pixels_to_agree_with_a_codec_change():
    assert is_stale(0.6, None, 0.5, 0.5) and not is_stale(0.4, None, 0.5, 0.5)
    assert is_stale(0.0, 1.0, 0.5, 0.5)  # a cut since the reference
    assert not is_stale(0.2, 0.9, 0.5, 0.5)  # a hand-held camera: every block moved a little
    assert is_stale(0.35, 0.9, 0.5, 0.5) and not is_stale(0.35, 0.4, 0.5, 0.5)
    assert is_stale(0.65, 0.0, 0.5, 0.5)  # a large pixel change on its own


# -- the downscaled encode -------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_dinov2, tiny_siglip])
def test_downscale_at_the_full_grid_is_the_tower(build):
    tower, x = build(), frames(2)
    assert supports_downscale(tower)
    with torch.no_grad():
        embedded = embed_downscaled(tower, x, (SIDE, SIDE), 8)
        assert torch.equal(embedded, tower.embeddings(x))
        prefix = embedded.shape[1] - SIDE * SIDE
        assert torch.equal(Downscale((SIDE, SIDE), (SIDE, SIDE), prefix, embedded).to_full(embedded), embedded)


def test_downscale_grid_stays_within_what_it_may_spend():
    def cost(small: tuple[int, int]) -> float:
        return layer_macs(1 + small[0] * small[1], 384, 1536) / layer_macs(257, 384, 1536)

    for spend in (0.3, 0.5, 0.75, 0.95):
        rows, cols = downscale_grid((16, 16), cost, spend)
        assert rows == cols and layer_macs(1 + rows * cols, 384, 1536) <= spend * layer_macs(257, 384, 1536)
        assert layer_macs(1 + (rows + 1) ** 2, 384, 1536) > spend * layer_macs(257, 384, 1536) or rows == 15
    assert downscale_grid((16, 16), cost, 0.01) == (8, 8)  # never below half the side
    assert downscale_grid((12, 16), cost, 0.01, multiple=2) == (6, 8)  # a Qwen tower's merge blocks
    assert downscale_grid((12, 16), cost, 0.6, multiple=2) == (10, 14)


@pytest.mark.parametrize("build", [tiny_dinov2, tiny_siglip])
def test_a_cut_without_refresh_credit_is_encoded_downscaled(build):
    tower, x = build(), frames(2)
    config = CacherConfig.robust(2, flop_budget=0.45)
    cacher = STCCacher(config).attach(tower)
    with torch.no_grad():
        tower(pixel_values=x[:1])  # the first chunk refreshes (and runs the budget into debt)
        cacher.hint(hints(1.0, cut=True))
        out = tower(pixel_values=x[1:]).last_hidden_state
        assert cacher.stats.downscaled_chunks == 1 and cacher.stats.refresh_chunks == 1
        # Credit after the first refresh: 2 x 0.45 - 1 = -0.1; the steady spend 0.45 - 0.1 is within the
        # allowed borrowing (-0.1 + 1 - 0.45 = 0.45).
        prefix, mlp = out.shape[1] - SIDE * SIDE, getattr(tower.config, "intermediate_size", 128)
        grid = downscale_grid((SIDE, SIDE), lambda small: layer_macs(prefix + small[0] * small[1], 32, mlp)
                              / layer_macs(prefix + SIDE * SIDE, 32, mlp), 0.35)
        assert torch.allclose(out, reference_downscale(tower, x[1:], grid), atol=1e-5)
    cacher.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_tower_is_downscaled_as_in_float32(dtype):
    """The antialiased resize has no half-precision CPU kernel: the frame is resized in float32."""
    outputs = []
    for precision in (torch.float32, dtype):
        tower, x = tiny_dinov2().to(precision), frames(2).to(precision)
        cacher = STCCacher(CacherConfig.robust(2, flop_budget=0.45)).attach(tower)
        with torch.no_grad():
            tower(pixel_values=x[:1])
            cacher.hint(hints(1.0, cut=True))
            outputs.append(tower(pixel_values=x[1:]).last_hidden_state.float())
        assert cacher.stats.downscaled_chunks == 1
        cacher.detach()
    assert torch.nn.functional.cosine_similarity(outputs[0], outputs[1], dim=-1).min() > 0.99


def test_the_budget_holds_on_every_prefix_of_a_stream():
    tower, x = tiny_dinov2(), frames(24, seed=3)
    macs_full = 2 * layer_macs(SIDE * SIDE + 1)
    for budget in (0.35, 0.5, 0.7):
        cacher = STCCacher(CacherConfig.robust(2, flop_budget=budget)).attach(tower)
        with torch.no_grad():
            for i, frame in enumerate(x):
                cacher.hint(hints(0.8, cut=i % 5 == 3) if i % 2 else None)  # with and without hints
                tower(pixel_values=frame[None])
                # The stream never runs ahead of its budget by more than the first refresh.
                assert cacher.stats.flops <= budget * macs_full * (i + 1) + (1 - budget) * macs_full + 1e-6
                assert cacher.stats.full_flops == pytest.approx(macs_full * (i + 1))
        assert cacher.stats.flop_ratio > budget - 0.2  # and spends most of it
        cacher.detach()


def test_a_cut_hint_refreshes_where_the_pixels_say_nothing_moved():
    tower, x = tiny_dinov2(), frames(1)
    for cut, refreshes in ((False, 1), (True, 2)):
        cacher = STCCacher(CacherConfig.robust(2, flop_budget=0.8)).attach(tower)
        with torch.no_grad():
            tower(pixel_values=x)
            tower(pixel_values=x)  # credit for one refresh banked (1.11 chunks), the same picture
            cacher.hint(hints(1.0 if cut else 0.0, cut=cut))
            tower(pixel_values=x)
        assert cacher.stats.refresh_chunks == refreshes, cut
        cacher.detach()


def test_codec_token_signal_recomputes_the_patches_that_changed():
    tower, x = tiny_dinov2(), frames(2)
    changed = torch.tensor([3, 10, 17, 24, 31, 38, 45, 46, 47, 48, 11])  # 11 of 49 patches
    change = torch.zeros(SIDE * SIDE)
    change[changed] = 1.0
    cacher = STCCacher(CacherConfig.robust(2, token_signal="codec", flop_budget=0.4)).attach(tower)
    with torch.no_grad():
        tower(pixel_values=x[:1])
        cacher.hint(hints(change))
        tower(pixel_values=x[:1] + 0.01 * x[1:])  # a small change: reuse, not stale
    recomputed = cacher.last_recomputed()
    assert recomputed is not None and recomputed.shape[-1] == 12  # k = floor(50 * 0.25)
    expected = {0} | {int(i) + 1 for i in changed}  # the class token and the changed patches
    for layer in recomputed:
        assert set(layer[0].tolist()) == expected
    cacher.detach()


def test_hints_leave_every_other_setting_bit_identical():
    tower, x = tiny_dinov2(), frames(5, seed=1)
    outputs = []
    for give_hints in (False, True):
        cacher = STCCacher(CacherConfig(cache_interval=2)).attach(tower)
        with torch.no_grad():
            run = []
            for frame in x:
                if give_hints:
                    cacher.hint(hints(1.0, cut=True))
                run.append(tower(pixel_values=frame[None]).last_hidden_state)
        outputs.append(torch.cat(run))
        cacher.detach()
    assert torch.equal(outputs[0], outputs[1])


def test_budget_state_and_pending_hints_survive_state_dict():
    tower, x = tiny_dinov2(), frames(8, seed=2)
    cacher = STCCacher(CacherConfig.robust(2, flop_budget=0.5)).attach(tower)
    with torch.no_grad():
        for i in range(4):
            cacher.hint(hints(0.3 * (i % 2)))
            tower(pixel_values=x[i:i + 1])
        cacher.hint(hints(0.6, cut=True))
        saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cacher.state.state_dict().items()}
        restored = CacherState()
        restored.load_state_dict(saved)
        assert restored.next_hints is not None and torch.equal(restored.next_hints.change, cacher.state.next_hints.change)
        runs = []
        for state in (cacher.state, restored):
            with cacher.stream(state):
                runs.append(torch.cat([tower(pixel_values=f[None]).last_hidden_state for f in x[4:]]))
    assert torch.equal(runs[0], runs[1])
    cacher.detach()


def test_hints_must_fit_the_chunk():
    tower = tiny_dinov2()
    cacher = STCCacher(CacherConfig.robust(2)).attach(tower)
    with torch.no_grad():
        tower(pixel_values=frames(1))
        cacher.hint(ChunkHints(torch.zeros(2, SIDE * SIDE), torch.zeros(2, dtype=torch.bool)))
        with pytest.raises(InputError, match="do not fit"):
            tower(pixel_values=frames(1))
    with pytest.raises(InputError):
        cacher.hint("cut")
    cacher.detach()


# -- the profile, the hints and the codec-only baseline -----------------------------------------------


def test_robust_profile_is_a_budget_at_the_fixed_schedules_cost_and_says_so():
    robust = CacherConfig.robust()
    assert (robust.refresh, robust.over_budget, robust.cache_interval, robust.flop_budget) == ("budget", "downscale", 2, None)
    assert robust.profile == "robust" and CacherConfig().profile == "paper"
    assert CacherConfig(cache_interval=4).profile == "paper" and CacherConfig(cache_interval=3).profile == "custom"
    assert CacherConfig.robust(4).profile == "robust" and CacherConfig.robust(2, flop_budget=0.3).profile == "custom"
    with pytest.raises(ConfigError, match="flop_budget"):
        CacherConfig(flop_budget=0.5)
    with pytest.raises(ConfigError, match="downscale"):
        CacherConfig(over_budget="downscale")
    with pytest.raises(ConfigError):
        CacherConfig.robust(flop_budget=1.5)


def side_data(travel_px: float, cut: bool = False) -> CodecSideData:
    """A 32 x 64 frame (2 x 4 macroblocks) whose content travelled `travel_px` down everywhere."""
    still = np.zeros((2, 4), np.float32)
    return CodecSideData(still, np.full((2, 4), travel_px, np.float32), still, 0.0, cut, 12, 0, height=32, width=64)


def test_hints_from_side_data_combine_a_units_frames_and_scale_motion_to_a_patch():
    """On a 4 x 8 grid a patch is 8 x 8 pixels: 4 pixels down is half a patch."""
    a, b, still = side_data(4.0), side_data(4.0, cut=True), side_data(0.0)
    built = ChunkHints.from_side_data([[a, b], [still, still]], (4, 8))
    assert built.change.shape == (2, 32) and torch.allclose(built.change[0], torch.tensor(0.75))
    assert torch.equal(built.change[1], torch.zeros(32)) and built.cut.tolist() == [True, False]
    assert torch.allclose(ChunkHints.from_side_data([[side_data(4.0)]], (2, 8)).change, torch.tensor(0.25))
    assert ChunkHints.from_side_data([[a, None]], (4, 8)) is None


def test_uniform_downscaling_is_the_towers_own_forward_on_the_resized_frame_with_tokens_resized_back():
    """Independent reference: the unpatched tower run on the frame resized to a 5 x 5 grid (40 px), its
    last layer's output (before the final norm) resized bilinearly to 7 x 7 patches, then the norm.
    5 x 5 is the largest grid a spend of 0.55 pays for (by the layer cost model)."""
    tower, x = tiny_dinov2(), frames(2, seed=9)
    assert layer_macs(1 + 25) <= 0.55 * layer_macs(1 + 49) < layer_macs(1 + 36)
    with torch.no_grad():
        encoder = UniformDownscaling(0.55)
        got = encoder(tower, x)
        small = TF.interpolate(x, size=(40, 40), mode="bilinear", antialias=True, align_corners=False)
        last = tower(pixel_values=small, output_hidden_states=True).hidden_states[-1]
        patches = last[:, 1:].reshape(2, 5, 5, -1).permute(0, 3, 1, 2)
        resized = TF.interpolate(patches, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        expected = tower.layernorm(torch.cat([last[:, :1], resized.permute(0, 2, 3, 1).reshape(2, SIDE * SIDE, -1)], 1))
    assert got.shape == (2, 1 + SIDE * SIDE, 32) and torch.allclose(got, expected, atol=1e-5)
    assert encoder.grid == (5, 5) and encoder.flop_ratio() == pytest.approx(layer_macs(26) / layer_macs(50))


def test_codec_skipping_keeps_unchanged_patches_and_encodes_cuts_whole():
    tower, x = tiny_dinov2(), frames(3, seed=4)
    skip = CodecSkipping(0.5)
    with torch.no_grad():
        first = skip(tower, x[:1], hints(0.0))
        assert torch.allclose(first, tower(pixel_values=x[:1]).last_hidden_state, atol=1e-6)
        assert torch.equal(skip(tower, x[1:2], hints(0.1)), first)  # nothing changed enough: all kept
        cut = skip(tower, x[2:3], hints(0.0, cut=True))
        assert torch.allclose(cut, tower(pixel_values=x[2:3]).last_hidden_state, atol=1e-6)
        assert skip(tower, x[:1], hints(0.0)) is cut  # still nothing to encode
        change = torch.zeros(SIDE * SIDE)
        change[[4, 9]] = 0.6
        partial = skip(tower, x[:1], hints(change))  # two patches changed: they and the class token re-encoded
        assert torch.equal(partial[:, [i for i in range(50) if i not in (0, 5, 10)]],
                           cut[:, [i for i in range(50) if i not in (0, 5, 10)]])
        assert not torch.equal(partial[:, 5], cut[:, 5])
    assert skip.flop_ratio() == pytest.approx((2 * layer_macs(50) + layer_macs(3)) / (5 * layer_macs(50)))


def test_a_forward_with_gradients_on_runs_and_leaves_the_reference_out_of_the_graph():
    tower, x = tiny_dinov2(), frames(2)
    cacher = STCCacher(CacherConfig(cache_interval=2)).attach(tower)
    out = torch.cat([tower(pixel_values=f[None]).last_hidden_state for f in x])  # a refresh, then a reuse
    out.sum().backward()
    assert tower.embeddings.patch_embeddings.projection.weight.grad is not None
    assert not cacher.state.values.requires_grad and not cacher.state.residual_delta.requires_grad
    cacher.detach()
