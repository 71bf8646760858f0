"""STC-Cacher inside the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers (tiny random towers, CPU).

The plain implementation below is written from the semantics (docs/design.md, "Qwen-VL towers")
with no code shared with streamtc: each block in plain tensor algebra from the block's weights, the
block inputs (embedded tokens, RoPE rows, attention segments) read from an unpatched forward.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as TF
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLForConditionalGeneration

from streamtc.cacher import STCCacher
from streamtc.config import CacherConfig
from streamtc.errors import InputError, UnsupportedModelError
from helpers import (
    TOWERS, assert_close_rel, block_inputs, build_tower, encode, grid_thw, hidden, patch_stream, plain_stream, rope,
    vision_config,
)

def deepstack(outputs) -> list[torch.Tensor]:
    return [torch.cat(f) for f in zip(*(o.deepstack_features for o in outputs))] if hasattr(outputs[0], "deepstack_features") else []


# -- the plain implementation -------------------------------------------------------------------


# -- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("config", [CacherConfig(cache_interval=1), CacherConfig(cache_interval=2, update_ratio=1.0)])
def test_full_refresh_or_full_ratio_reproduces_the_unpatched_tower(kind, attn, config):
    tower = build_tower(kind, attn)
    chunks = patch_stream(3)
    chunks.append(torch.cat(patch_stream(2, seed=1)))  # a chunk of two temporal patches
    want = encode(tower, chunks)
    cacher = STCCacher(config).attach(tower)
    got = encode(tower, chunks)
    cacher.detach()
    assert_close_rel(hidden(got), hidden(want))
    assert_close_rel(torch.cat([o.pooler_output for o in got]), torch.cat([o.pooler_output for o in want]))
    for g, w in zip(deepstack(got), deepstack(want)):
        assert_close_rel(g, w)
    assert cacher.stats.frames == 10 and cacher.stats.chunks == 4


@pytest.mark.parametrize("kind", TOWERS)
def test_detach_restores_the_original_forward_bit_identically(kind):
    tower = build_tower(kind)
    chunks = patch_stream(3)
    want = encode(tower, chunks)
    cacher = STCCacher(CacherConfig(cache_interval=2)).attach(tower)
    cached = encode(tower, chunks)
    cacher.detach()
    assert not torch.equal(hidden(cached), hidden(want))  # the cacher did reuse something
    assert torch.equal(hidden(encode(tower, chunks)), hidden(want))
    assert all("forward" not in block.__dict__ for block in tower.blocks)


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cpu_kernels", ["onednn", "torch"])
def test_matches_the_plain_implementation_over_refresh_and_non_refresh_patches(kind, attn, cpu_kernels):
    tower = build_tower(kind, attn)
    chunks = patch_stream(4)
    chunks.insert(3, torch.cat(patch_stream(2, seed=2)))  # a non-refresh chunk of two temporal patches
    want_hidden, want_taps = plain_stream(tower, chunks, interval=3, ratio=0.25)
    cacher = STCCacher(CacherConfig(cache_interval=3, update_ratio=0.25, cpu_kernels=cpu_kernels)).attach(tower)
    got = encode(tower, chunks)
    assert cacher.stats.refresh_chunks == 2
    cacher.detach()
    assert_close_rel(hidden(got), want_hidden, 1e-5)
    assert len(deepstack(got)) == len(want_taps) == (2 if kind == "qwen3-vl" else 0)
    for g, w in zip(deepstack(got), want_taps):  # the taps see recomputed rows exactly, reused rows reused
        assert_close_rel(g, w, 1e-5)
    full = hidden(encode(tower, chunks))
    assert not torch.allclose(want_hidden, full, atol=1e-3)  # the semantics do differ from a full forward


def test_qwen2_5_plain_implementation_covers_window_and_full_attention_blocks():
    tower = build_tower("qwen2.5-vl")
    _, _, _, cu = block_inputs(tower, patch_stream(1)[0], grid_thw(1))
    segments = [len(c) - 1 for c in cu]
    assert segments[1] == 1 and segments[0] == segments[2] > 1  # block 1 full, blocks 0 and 2 windowed
    sizes = (cu[0][1:] - cu[0][:-1]).unique().tolist()
    assert len(sizes) > 1  # a 12x10 grid leaves partial windows at the edge


def test_key_similarity_is_the_same_before_and_after_rope():
    torch.manual_seed(0)
    tower = build_tower("qwen2-vl")
    x, cos, sin, _ = block_inputs(tower, patch_stream(1)[0], grid_thw(1))
    k1, k2 = torch.randn(2, x.shape[0], 4, 8)
    before = TF.cosine_similarity(k1.flatten(1), k2.flatten(1), dim=-1)
    after = TF.cosine_similarity(rope(k1, cos, sin).flatten(1), rope(k2, cos, sin).flatten(1), dim=-1)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=0)


# -- streams, grids, hosts -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", TOWERS)
def test_interleaved_streams_equal_the_same_streams_alone(kind):
    tower = build_tower(kind)
    a, b = patch_stream(5, seed=3), patch_stream(5, seed=4)
    config = CacherConfig(cache_interval=2)
    alone = []
    for stream in (a, b):
        cacher = STCCacher(config).attach(tower)
        alone.append(hidden(encode(tower, stream)))
        cacher.detach()
    cacher = STCCacher(config).attach(tower)
    states = [cacher.new_state(), cacher.new_state()]
    got = [[], []]
    for i in range(5):
        for s, stream in enumerate((a, b)):
            with cacher.stream(states[s]):
                got[s].extend(encode(tower, [stream[i]]))
    cacher.detach()
    for g, want in zip(got, alone):
        assert torch.equal(hidden(g), want)


@pytest.mark.parametrize("kind", TOWERS)
def test_a_new_grid_refreshes_even_with_the_same_token_count(kind):
    tower = build_tower(kind)
    cacher = STCCacher(CacherConfig(cache_interval=4)).attach(tower)
    encode(tower, patch_stream(2, grid=(12, 10)), grid=(12, 10))
    assert cacher.stats.refresh_chunks == 1
    encode(tower, patch_stream(1, grid=(10, 12)), grid=(10, 12))  # 120 tokens again, transposed
    assert cacher.stats.refresh_chunks == 2
    encode(tower, patch_stream(1, grid=(10, 12), seed=5), grid=(10, 12))
    assert cacher.stats.refresh_chunks == 2
    cacher.detach()


def test_a_chunk_mixing_grids_is_a_clear_error():
    tower = build_tower("qwen2-vl")
    cacher = STCCacher().attach(tower)
    pixels = torch.cat([patch_stream(1)[0], patch_stream(1, grid=(8, 8))[0]])
    with pytest.raises(InputError, match="one size"):
        tower(pixels, grid_thw=torch.tensor([[1, 12, 10], [1, 8, 8]]))
    cacher.detach()


def test_flash_attention_and_compile_are_refused_with_the_fix():
    tower = build_tower("qwen2.5-vl")
    with pytest.raises(UnsupportedModelError, match="compile_mode"):
        STCCacher(CacherConfig(compile_mode="default")).attach(tower)
    tower.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        STCCacher().attach(tower)


@pytest.mark.parametrize("kind", TOWERS)
def test_adaptive_and_shared_planning_read_the_first_blocks_keys(kind):
    tower = build_tower(kind)
    still = patch_stream(4, motion=0.0)
    cut = patch_stream(1, seed=9)[0]
    config = CacherConfig(cache_interval=8, refresh="adaptive", refresh_threshold=0.9, selection="shared")
    cacher = STCCacher(config).attach(tower)
    encode(tower, still + [cut])
    cacher.detach()
    assert cacher.stats.refresh_chunks == 2 and cacher.stats.adaptive_refreshes == 1


def whole_model(kind: str):
    torch.manual_seed(0)
    text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=151_936,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 1e4})
    vision = vision_config(kind).to_dict()
    if kind == "qwen2-vl":
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision)).eval()
    if kind == "qwen2.5-vl":
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config={**text, "head_dim": 12},
                                                         vision_config=vision)).eval()


@pytest.mark.parametrize("kind", TOWERS)
def test_the_whole_model_video_feature_path_goes_through_the_cacher(kind):
    model = whole_model(kind)
    chunks = patch_stream(4)
    config = CacherConfig(cache_interval=2)

    def video_features():
        with torch.no_grad():
            outs = [model.model.get_video_features(c, grid_thw(1)) for c in chunks]
        return torch.cat([torch.cat(o.pooler_output) for o in outs])

    full = video_features()
    cacher = STCCacher(config).attach(model)
    through_model = video_features()
    assert cacher.stats.chunks == 4 and cacher.stats.refresh_chunks == 2
    cacher.detach()
    tower = model.model.visual
    cacher = STCCacher(config).attach(tower)
    with torch.no_grad():
        direct = torch.cat([tower(c, grid_thw=grid_thw(1)).pooler_output for c in chunks])
    cacher.detach()
    assert torch.equal(through_model, direct)
    assert not torch.allclose(through_model, full, atol=1e-4)
    assert torch.equal(video_features(), full)
