"""The reuse check (CacherConfig.reuse_check): a reused chunk's attention drift, measured on a probe of
every 4th token, and the chunk encoded again when it fails.

Independent references: the drift is recomputed here by hand from the layer's own modules (its q/k/v/o
projections, norms and layer scale, multi-head attention written out), the re-encoded chunk against
the downscaled encode written out (tests/helpers.py), and the FLOPs against counts made
here from the layer shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import reference_downscale
from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

from streamtc.cacher import STCCacher, patch_vit
from streamtc.cacher.downscale import downscale_grid
from streamtc.cacher.state import CacherState, LayerReference
from streamtc.config import CacherConfig
from streamtc.errors import ConfigError

SIDE = 7  # patches per side (56 px, patch 8)
TOKENS = SIDE * SIDE + 1
WIDTH, HEADS = 32, 4


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "dinov2":
        config = Dinov2Config(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, image_size=56,
                              patch_size=8, attn_implementation="eager", layerscale_value=0.5)
        return Dinov2Model(config).eval()
    config = SiglipVisionConfig(hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=HEADS, image_size=56, patch_size=8, attn_implementation="eager")
    return SiglipVisionModel(config).eval()


def parts(layer, kind: str):
    """(norm1, q, k, v, o, scale1) of a tiny layer, read from the transformers module by hand."""
    if kind == "dinov2":
        a = layer.attention
        return layer.norm1, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.layer_scale1.lambda1
    a = layer.self_attn
    return layer.layer_norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, torch.ones(WIDTH)


def attend(q, k, v):
    """Multi-head softmax attention written out: q [P, C], k and v [T, C] -> [P, C]."""
    def heads(x):
        return x.view(x.shape[0], HEADS, -1).transpose(0, 1)
    weights = torch.softmax(heads(q) @ heads(k).transpose(1, 2) / math.sqrt(WIDTH // HEADS), dim=-1)
    return (weights @ heads(v)).transpose(0, 1).reshape(q.shape[0], -1)


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_the_drift_is_the_reused_probe_tokens_attention_change(kind):
    tower = tiny(kind)
    layer = (tower.encoder.layer if kind == "dinov2" else tower.encoder.layers)[0]
    eager = patch_vit.eager_attention_for(layer)
    generator = torch.Generator().manual_seed(1)
    x_ref = torch.randn(1, TOKENS, WIDTH, generator=generator)
    x = x_ref.clone()
    x[0, 5:14] += 2.0 * torch.randn(9, WIDTH, generator=generator)  # a few tokens change a lot
    x += 0.01 * torch.randn(x.shape, generator=generator)  # the rest barely
    probe = torch.arange(0, TOKENS, 4)
    reference = LayerReference(*(torch.empty(TOKENS, WIDTH) for _ in range(3)), probe,
                               torch.empty(len(probe), WIDTH), torch.empty(len(probe), WIDTH))
    drift = torch.zeros(1)
    with torch.no_grad():
        patch_vit.refresh_forward(layer, x_ref, None, reference=reference, eager_fallback=eager)
        _, index = patch_vit.selective_forward(layer, x, None, reference=reference, num_recomputed=12,
                                               eager_fallback=eager, drift=drift)
        norm1, q, k, v, o, scale = parts(layer, kind)
        n_ref, n = norm1(x_ref[0]), norm1(x[0])
        values = v(n_ref)
        values[index[0]] = v(n)[index[0]]  # V̄: the recomputed tokens' values, the reference's elsewhere
        now = o(attend(q(n_ref)[probe], k(n), values)) * scale
        before = o(attend(q(n_ref)[probe], k(n_ref), v(n_ref))) * scale
        assert torch.allclose(reference.probe_attention, before, atol=1e-5)
        reused = torch.tensor([int(p) not in set(index[0].tolist()) for p in probe])
        assert 0 < int(reused.sum()) < len(probe)  # some probe tokens were recomputed: they are left out
        change = (now - before).norm(dim=-1) / x[0, probe].norm(dim=-1)
        assert drift.item() == pytest.approx(float(change[reused].mean()), rel=1e-4)


def macs(tokens: int, recomputed: int | None = None, probe: int = 0) -> int:
    """Two layers of the tiny tower: full, or non-refresh with `recomputed` tokens and a probe."""
    if recomputed is None:
        return 2 * (4 * tokens * WIDTH**2 + 2 * tokens**2 * WIDTH + 2 * tokens * WIDTH * 4 * WIDTH)
    k = recomputed
    layer = tokens * WIDTH**2 + 3 * k * WIDTH**2 + 2 * k * tokens * WIDTH + 2 * k * WIDTH * 4 * WIDTH
    return 2 * (layer + 2 * probe * tokens * WIDTH + probe * WIDTH**2)


def still_frames(count: int) -> torch.Tensor:
    """A frame and slightly moved copies of it: reused, never stale by their pixels."""
    base = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    return torch.cat([base + 0.02 * i * torch.roll(base, 1, dims=-1) for i in range(count)])


def test_a_reuse_that_fails_its_check_is_downscaled_and_both_passes_are_paid():
    tower, x = tiny("dinov2"), still_frames(2)
    cacher = STCCacher(CacherConfig.robust(2, reuse_check=1e-9)).attach(tower)
    with torch.no_grad():
        tower(pixel_values=x[:1])
        out = tower(pixel_values=x[1:]).last_hidden_state
    stats = cacher.stats
    assert (stats.failed_reuses, stats.downscaled_chunks, stats.refresh_chunks) == (1, 1, 1)
    assert (stats.chunks, stats.frames, cacher.state.chunk_index) == (2, 2, 2)
    reused = macs(TOKENS, math.floor(TOKENS * 0.25), probe=len(range(0, TOKENS, 4)))
    budget = (macs(TOKENS) + macs(TOKENS, math.floor(TOKENS * 0.25))) / (2 * macs(TOKENS))  # N=2's cost
    allowance = (budget * 2 * macs(TOKENS) - macs(TOKENS) - reused) / macs(TOKENS)
    spend = max(min(budget - 0.1, allowance + 1 - budget), 0.0)
    grid = downscale_grid((SIDE, SIDE), lambda small: macs(1 + small[0] * small[1]) / macs(TOKENS), spend)
    assert torch.allclose(out, reference_downscale(tower, x[1:], grid), atol=1e-5)
    assert stats.flops == pytest.approx(macs(TOKENS) + reused + macs(1 + grid[0] * grid[1]))
    assert stats.full_flops == pytest.approx(2 * macs(TOKENS))
    cacher.detach()


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_a_reuse_that_passes_its_check_is_the_unchecked_reuse(kind):
    tower, x = tiny(kind), still_frames(4)
    outputs, stats = [], []
    for check in (None, 1e9):
        cacher = STCCacher(CacherConfig.robust(2, reuse_check=check)).attach(tower)
        with torch.no_grad():
            outputs.append(torch.cat([tower(pixel_values=f[None]).last_hidden_state for f in x]))
        stats.append(cacher.stats)
        cacher.detach()
    assert torch.equal(outputs[0], outputs[1])
    assert stats[1].failed_reuses == 0 and stats[1].refresh_chunks < 4  # frames were reused, and checked
    tokens = outputs[0].shape[1]  # SigLIP has no class token
    probe = len(range(0, tokens, 4))
    probe_cost = 2 * (2 * probe * tokens * WIDTH + probe * WIDTH**2)
    reused_chunks = 4 - stats[1].refresh_chunks - stats[1].downscaled_chunks
    assert stats[1].flops - stats[0].flops == pytest.approx(reused_chunks * probe_cost)


def test_the_probe_survives_state_dict():
    tower, x = tiny("dinov2"), still_frames(3)
    cacher = STCCacher(CacherConfig.robust(2, reuse_check=1e-9)).attach(tower)
    with torch.no_grad():
        tower(pixel_values=x[:1])
        saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cacher.state.state_dict().items()}
        restored = CacherState()
        restored.load_state_dict(saved)
        runs = []
        for state in (cacher.state, restored):
            with cacher.stream(state):
                runs.append(tower(pixel_values=x[1:2]).last_hidden_state)
                assert state.stats.failed_reuses == 1  # the restored reference still has its probe
    assert torch.equal(runs[0], runs[1])
    cacher.detach()


def test_reuse_check_settings():
    assert CacherConfig.robust().reuse_check == 0.16 and CacherConfig.robust().profile == "robust"
    assert CacherConfig.robust(reuse_check=None).profile == "custom"
    for bad in (0, -0.1, True, "0.2"):
        with pytest.raises(ConfigError, match="reuse_check"):
            CacherConfig.robust(reuse_check=bad)
    with pytest.raises(ConfigError, match="needs refresh='budget'"):
        CacherConfig(reuse_check=0.2)


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_a_rejected_reuse_returns_every_output_of_the_encode_that_replaced_it(kind):
    """The tower runs again as a whole: its hidden states, captured by transformers per layer call,
    are those of the downscaled encode alone (one per layer and the embedding), not the rejected
    pass's followed by the new one's."""
    tower, x = tiny(kind), still_frames(2)
    cacher = STCCacher(CacherConfig.robust(2, reuse_check=1e-9)).attach(tower)
    with torch.no_grad():
        tower(pixel_values=x[:1])
        out = tower(pixel_values=x[1:], output_hidden_states=True)
    assert cacher.stats.failed_reuses == 1 and cacher.stats.downscaled_chunks == 1
    assert len(out.hidden_states) == 3 and all(h.shape == out.last_hidden_state.shape for h in out.hidden_states)
    final_norm = tower.layernorm if kind == "dinov2" else tower.post_layernorm
    assert torch.allclose(final_norm(out.hidden_states[-1]), out.last_hidden_state, atol=1e-6)
    grids = range(math.ceil(SIDE / 2), SIDE + 1)  # the chosen grid is checked in the test above; any of them here
    assert any(torch.allclose(out.last_hidden_state, reference_downscale(tower, x[1:], (g, g)), atol=1e-5) for g in grids)
    cacher.detach()
