"""STC-Cacher inside the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers (tiny random towers, CPU).

The plain implementation below is written from the semantics (docs/design.md, "Qwen-VL towers")
with no code shared with streamtc: each block in plain tensor algebra from the block's weights, the
block inputs (embedded tokens, RoPE rows, attention segments) read from an unpatched forward.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as TF
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLVisionConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLVisionConfig,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig, Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLForConditionalGeneration, Qwen3VLVisionModel

from streamtc.cacher import STCCacher
from streamtc.config import CacherConfig
from streamtc.errors import InputError, UnsupportedModelError

PATCH = 4
TOWERS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def vision_config(kind: str, attn: str = "sdpa"):
    if kind == "qwen2-vl":
        config = Qwen2VLVisionConfig(depth=3, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=48, patch_size=PATCH)
    elif kind == "qwen2.5-vl":
        # window 16 px = 4x4 patches = 2x2 merge blocks; block 1 attends over the whole temporal patch
        config = Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, intermediate_size=40, num_heads=4, out_hidden_size=48,
                                        patch_size=PATCH, window_size=16, fullatt_block_indexes=[1])
    else:
        config = Qwen3VLVisionConfig(depth=4, hidden_size=32, intermediate_size=40, num_heads=4, out_hidden_size=48,
                                     patch_size=PATCH, num_position_embeddings=16, deepstack_visual_indexes=[0, 2])
    config._attn_implementation = attn
    return config


TOWER_CLASSES = {
    "qwen2-vl": Qwen2VisionTransformerPretrainedModel,
    "qwen2.5-vl": Qwen2_5_VisionTransformerPretrainedModel,
    "qwen3-vl": Qwen3VLVisionModel,
}


def build_tower(kind: str, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    return TOWER_CLASSES[kind](vision_config(kind, attn)).eval()


def patch_stream(count: int, grid: tuple[int, int] = (12, 10), seed: int = 0, motion: float = 0.3) -> list[torch.Tensor]:
    """`count` temporal patches as flattened pixel patches [h * w, 3 * 2 * p * p]: a still scene
    where a moving quarter of the patches changes from one to the next."""
    g = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1]
    base = torch.randn(tokens, 3 * 2 * PATCH * PATCH, generator=g)
    out = []
    for i in range(count):
        x = base + 0.05 * torch.randn(base.shape, generator=g)
        moving = torch.randperm(tokens, generator=g)[: tokens // 4]
        x[moving] += motion * (i + 1) * torch.randn(len(moving), base.shape[1], generator=g)
        out.append(x)
    return out


def grid_thw(units: int, grid: tuple[int, int] = (12, 10)) -> torch.Tensor:
    return torch.tensor([[units, *grid]])


def encode(tower, chunks: list[torch.Tensor], grid=(12, 10)):
    """One tower forward per chunk (a chunk = one or more temporal patches)."""
    outputs = []
    with torch.no_grad():
        for chunk in chunks:
            units = chunk.shape[0] // (grid[0] * grid[1])
            outputs.append(tower(chunk, grid_thw=grid_thw(units, grid)))
    return outputs


def hidden(outputs) -> torch.Tensor:
    return torch.cat([o.last_hidden_state for o in outputs])


def deepstack(outputs) -> list[torch.Tensor]:
    return [torch.cat(f) for f in zip(*(o.deepstack_features for o in outputs))] if hasattr(outputs[0], "deepstack_features") else []


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    assert (got - want).abs().max() <= rel * want.abs().max(), float((got - want).abs().max() / want.abs().max())


# -- the plain implementation -------------------------------------------------------------------


def block_inputs(tower, pixels: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """From an unpatched forward: the first block's input [S, C], RoPE cos/sin [S, D], every block's cu_seqlens."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True) for b in tower.blocks]
    try:
        with torch.no_grad():
            tower(pixels, grid_thw=grid)
    finally:
        for h in hooks:
            h.remove()
    (x,), kwargs = seen[0]
    cos, sin = kwargs["position_embeddings"]
    return x, cos, sin, [k["cu_seqlens"] for _, k in seen]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; rotate-half RoPE with per-token cos/sin [N, D]."""
    d = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., d:], x[..., :d]], -1) * sin[:, None]


def softmax_attention(q, k, v, scale):
    """q [Q, H, D], k/v [N, H, D] -> [Q, H * D]."""
    weights = torch.softmax(torch.einsum("qhd,nhd->hqn", q, k) * scale, dim=-1)
    return torch.einsum("hqn,nhd->qhd", weights, v).reshape(q.shape[0], -1)


def plain_block(block, x, cos, sin, cu_seqlens, tokens, ref, refresh, ratio, group=1, record=None):
    """One block over U temporal patches [U * T, C]; returns the output and the (new) reference.

    group: select whole runs of `group` consecutive tokens (merge blocks) by mean key cosine, k // group
    of them (at least one). record: a list that gets each temporal patch's recomputed token set."""
    attn = block.attn
    heads, width = attn.num_heads, x.shape[-1]
    head_dim = width // heads
    w, b = attn.qkv.weight, attn.qkv.bias
    segment = torch.zeros(x.shape[0], dtype=torch.long)
    for start in cu_seqlens[1:-1].tolist():
        segment[start:] += 1
    h1 = block.norm1(x)
    q_all, k_all, v_all = (h1 @ w[i * width:(i + 1) * width].T + b[i * width:(i + 1) * width] for i in range(3))
    qr, kr = (rope(t.view(-1, heads, head_dim), cos, sin) for t in (q_all, k_all))
    out = torch.empty_like(x)
    units = x.shape[0] // tokens
    if refresh:
        attn_out = torch.empty_like(x)
        for s in segment.unique():
            rows = segment == s
            attn_out[rows] = attn.proj(softmax_attention(qr[rows], kr[rows], v_all[rows].view(-1, heads, head_dim),
                                                         attn.scaling))
        mid = x + attn_out
        mlp_out = block.mlp(block.norm2(mid))
        last = slice(x.shape[0] - tokens, x.shape[0])
        return mid + mlp_out, (k_all[last], v_all[last], attn_out[last] + mlp_out[last])
    k_ref, v_ref, delta_ref = ref
    k = max(1, min(tokens, int(tokens * ratio)))
    for u in range(units):
        rows = slice(u * tokens, (u + 1) * tokens)
        similarity = TF.cosine_similarity(k_all[rows], k_ref, dim=-1)
        if group == 1:
            chosen = torch.argsort(similarity)[:k]
        else:
            blocks = torch.argsort(similarity.view(-1, group).mean(1))[: max(1, k // group)]
            chosen = (blocks[:, None] * group + torch.arange(group)).flatten()
            k = len(chosen)
        if record is not None:
            record.append(set(chosen.tolist()))
        v_mixed = v_ref.clone()
        v_mixed[chosen] = v_all[rows][chosen]
        seg = segment[rows]
        a = torch.empty(k, width)
        for j, i in enumerate(chosen.tolist()):
            window = seg == seg[i]
            a[j] = softmax_attention(qr[rows][i:i + 1], kr[rows][window], v_mixed[window].view(-1, heads, head_dim),
                                     attn.scaling)[0]
        xi = x[rows][chosen] + attn.proj(a)
        xi = xi + block.mlp(block.norm2(xi))
        y = x[rows] + delta_ref
        y[chosen] = xi
        out[rows] = y
    return out, ref


def plain_stream(tower, chunks, interval: int, ratio: float, grid=(12, 10), group: int = 1, record=None):
    """Last hidden states and DeepStack features of the stream under the semantics, chunk by chunk.

    record: a dict that gets, per chunk index, per block, each temporal patch's recomputed token set."""
    tokens = grid[0] * grid[1]
    refs = [None] * len(tower.blocks)
    taps = getattr(tower, "deepstack_visual_indexes", [])
    hiddens, features = [], [[] for _ in taps]
    with torch.no_grad():
        for c, pixels in enumerate(chunks):
            x, cos, sin, cu = block_inputs(tower, pixels, grid_thw(pixels.shape[0] // tokens, grid))
            refresh = c % interval == 0
            for i, block in enumerate(tower.blocks):
                chosen = None if record is None or refresh else record.setdefault(c, {}).setdefault(i, [])
                x, refs[i] = plain_block(block, x, cos, sin, cu[i], tokens, refs[i], refresh, ratio, group, chosen)
                if i in taps:
                    features[taps.index(i)].append(tower.deepstack_merger_list[taps.index(i)](x))
            hiddens.append(x)
    return torch.cat(hiddens), [torch.cat(f) for f in features]


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
