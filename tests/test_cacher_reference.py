"""STC-Cacher against the independent reference of tests/cacher_reference.py on SigLIP, CLIP, DINOv2
and SigLIP2 with padding, under eager and SDPA attention: the reference first reproduces each
unpatched tower (so it is a faithful reading of the tower), then the Cacher's non-refresh chunks
equal the reference's, padded SigLIP2 frames included, compared on their real tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, Siglip2VisionConfig, Siglip2VisionModel

from streamtc import CacherConfig
from streamtc.cacher import STCCacher
from streamtc.presets import build_model

from cacher_reference import reference_stream

TOL = 1e-5
ATTENTION = ["eager", "sdpa"]


def drifting(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, size, size]: a random image plus small accumulating per-frame changes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, size, size, generator=g) + 0.15 * torch.randn(count, 3, size, size, generator=g).cumsum(0)


def tiny_dinov2(attn: str) -> torch.nn.Module:
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=8,
                          attn_implementation=attn)
    torch.manual_seed(0)
    model = Dinov2Model(config)
    for layer in model.encoder.layer:  # non-trivial layer scales, and attention far from uniform
        layer.layer_scale1.lambda1.data.uniform_(0.2, 1.5)
        layer.layer_scale2.lambda1.data.uniform_(0.2, 1.5)
        layer.attention.q_proj.weight.data.normal_(0.0, 0.3)
        layer.attention.k_proj.weight.data.normal_(0.0, 0.3)
    return model.eval()


def tower_and_chunks(kind: str, attn: str, chunk: int) -> tuple[torch.nn.Module, list[dict]]:
    """A tiny tower and 9 frames of a drifting scene in chunks of `chunk` frames (its keyword inputs)."""
    tower = tiny_dinov2(attn) if kind == "dinov2" else build_model(f"tiny-{kind}", attn_implementation=attn)
    pixels = drifting(9, tower.config.image_size, seed=1)
    return tower, [{"pixel_values": c} for c in pixels.split(chunk)]


def tiny_siglip2(attn: str) -> torch.nn.Module:
    config = Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 patch_size=8, num_patches=16, vision_use_head=False)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return Siglip2VisionModel(config).eval()


def padded_chunks(count: int = 7) -> tuple[list[dict], torch.Tensor]:
    """One-frame SigLIP2 chunks of 16 patch slots, 12 real (a 3 x 4 grid) and 4 padding, drifting;
    and the real-token mask [count, 16]."""
    g = torch.Generator().manual_seed(2)
    drift = 0.1 * torch.randn(count, 16, 3 * 8 * 8, generator=g).cumsum(0)
    patches = torch.randn(1, 16, 3 * 8 * 8, generator=g) + drift
    mask = torch.ones(count, 16, dtype=torch.long)
    mask[:, 12:] = 0
    chunks = [{"pixel_values": patches[i : i + 1], "pixel_attention_mask": mask[i : i + 1],
               "spatial_shapes": torch.tensor([[3, 4]])} for i in range(count)]
    return chunks, mask.bool()


def run_tower(tower: torch.nn.Module, chunks: list[dict], config: CacherConfig | None = None) -> torch.Tensor:
    """The tower's last_hidden_state of every frame, chunk by chunk (with a Cacher attached when configured)."""
    cacher = None if config is None else STCCacher(config).attach(tower)
    try:
        with torch.no_grad():
            return torch.cat([tower(**inputs).last_hidden_state for inputs in chunks])
    finally:
        if cacher is not None:
            cacher.detach()


@pytest.mark.parametrize("kind", ["siglip", "clip", "dinov2"])
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("chunk", [1, 3])
def test_the_cacher_equals_the_reference(kind: str, attn: str, chunk: int) -> None:
    tower, chunks = tower_and_chunks(kind, attn, chunk)
    assert tower.config._attn_implementation == attn
    unpatched = run_tower(tower, chunks)
    # the reference reads the tower right: every chunk refreshing, it is the unpatched tower
    assert (reference_stream(tower, chunks, 1, 0.25) - unpatched).abs().max() <= TOL
    expected = reference_stream(tower, chunks, 2, 0.25)
    got = run_tower(tower, chunks, CacherConfig(cache_interval=2, update_ratio=0.25))
    assert (got - expected).abs().max() <= TOL
    assert (got - unpatched).abs().max() > 100 * TOL  # non-refresh chunks reused something


@pytest.mark.parametrize("attn", ATTENTION)
def test_siglip2_real_tokens_with_padding_equal_the_reference(attn: str) -> None:
    """Padding patches are keys no query may attend to, in the refresh and in the recomputed rows:
    the Cacher's real-token outputs equal the reference's, which masks them, and a reference that
    let the recomputed rows see the padding would differ by far more than the tolerance."""
    tower = tiny_siglip2(attn)
    chunks, real = padded_chunks()
    unpatched = run_tower(tower, chunks)
    assert (reference_stream(tower, chunks, 1, 0.5)[real] - unpatched[real]).abs().max() <= TOL
    expected = reference_stream(tower, chunks, 3, 0.5)
    got = run_tower(tower, chunks, CacherConfig(cache_interval=3, update_ratio=0.5))
    assert (got[real] - expected[real]).abs().max() <= TOL
    assert (got[real] - unpatched[real]).abs().max() > 100 * TOL
    unmasked = [{**c, "pixel_attention_mask": torch.ones_like(c["pixel_attention_mask"])} for c in chunks]
    assert (reference_stream(tower, unmasked, 3, 0.5)[real] - expected[real]).abs().max() > 100 * TOL
