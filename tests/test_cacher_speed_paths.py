"""The Cacher's fast non-refresh layer against a plainly written one, and the CPU kernels it runs on.

`selective_forward` gathers rows through flat indices, swaps V̄ in place, folds layer scales into
the residual adds, runs GELU inside oneDNN's fc1 kernel and keeps oneDNN-packed weights; the
reference below is docs/algorithms.md, section 2.2 for one layer, written with plain matrix
algebra on the layer's weights and an explicit softmax. It shares no code with streamtc.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel
from transformers.activations import ACT2FN

from streamtc.cacher import kernels, patch_vit
from streamtc.cacher.state import LayerReference

TOL = 2e-5


def dinov2_layer() -> nn.Module:
    config = Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=56, patch_size=8)
    torch.manual_seed(0)
    layer = Dinov2Model(config).encoder.layer[0].eval()
    layer.layer_scale1.lambda1.data.uniform_(0.2, 1.5)
    layer.layer_scale2.lambda1.data.uniform_(0.2, 1.5)
    return layer


def siglip_layer() -> nn.Module:
    config = SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                image_size=56, patch_size=8)
    torch.manual_seed(0)
    return SiglipVisionModel(config).encoder.layers[0].eval()


def plain_pieces(layer):
    if hasattr(layer, "self_attn"):
        a = layer.self_attn
        return (layer.layer_norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, layer.layer_norm2, layer.mlp,
                torch.ones(1), torch.ones(1), a.num_heads, a.scale)
    a = layer.attention
    return (layer.norm1, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.norm2, layer.mlp,
            layer.layer_scale1.lambda1, layer.layer_scale2.lambda1, a.num_attention_heads, a.scaling)


def affine(x, lin):
    return x @ lin.weight.T + lin.bias


def plain_mlp(x, mlp):
    return affine(mlp.activation_fn(affine(x, mlp.fc1)), mlp.fc2)


def plain_attention(q, k, v, heads, scale):
    """Multi-head attention of q [Q, C] over k, v [T, C], explicit softmax."""
    split = lambda x: x.view(x.shape[0], heads, -1).transpose(0, 1)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(1, 2) * scale, dim=-1)
    return (weights @ split(v)).transpose(0, 1).reshape(q.shape[0], -1)


def plain_refresh(layer, x):
    """One frame x [T, C] through the exact layer; its output and (unit K, V, A + M) reference."""
    ln1, q, k, v, o, ln2, mlp, s1, s2, heads, scale = plain_pieces(layer)
    h = ln1(x)
    keys, values = affine(h, k), affine(h, v)
    attn = s1 * affine(plain_attention(affine(h, q), keys, values, heads, scale), o)
    mid = x + attn
    m = s2 * plain_mlp(ln2(mid), mlp)
    return mid + m, (keys / keys.norm(dim=-1, keepdim=True), values, attn + m)


def plain_selective(layer, x, reference, count):
    """The non-refresh layer for one frame x [T, C]: recompute the `count` tokens whose key cosine
    to the reference is lowest, reuse the reference's attention and MLP outputs for the rest."""
    ln1, q, k, v, o, ln2, mlp, s1, s2, heads, scale = plain_pieces(layer)
    unit_keys, ref_values, delta = reference
    h = ln1(x)
    keys = affine(h, k)
    cosine = (keys / keys.norm(dim=-1, keepdim=True) * unit_keys).sum(-1)
    chosen = cosine.argsort()[:count]
    values = ref_values.clone()
    values[chosen] = affine(h[chosen], v)
    rows = x[chosen] + s1 * affine(plain_attention(affine(h[chosen], q), keys, values, heads, scale), o)
    rows = rows + s2 * plain_mlp(ln2(rows), mlp)
    out = x + delta
    out[chosen] = rows
    return out, chosen


def stream_inputs(layer, frames=3, tokens=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, 64, generator=g)
    return [base + 0.4 * torch.randn(tokens, 64, generator=g) for _ in range(frames)]


@pytest.mark.parametrize("make_layer", [dinov2_layer, siglip_layer])
@pytest.mark.parametrize("onednn", [True, False])
def test_selective_layer_matches_a_plain_implementation(make_layer, onednn):
    layer = make_layer()
    x0, x1, x2 = stream_inputs(layer)
    count = 12
    with torch.no_grad():
        _, plain_reference = plain_refresh(layer, x0)
        reference = LayerReference(*(torch.empty_like(x0) for _ in range(3)))
        patch_vit.refresh_forward(layer, x0[None], None, reference, patch_vit.eager_attention_for(layer), onednn=onednn)
        for got, want in zip(reference, plain_reference):
            assert (got - want).abs().max() <= TOL
        stored_values = reference.values.clone()
        for x in (x1, x2):  # one frame per chunk: V̄ swapped into the reference and back
            expected, chosen = plain_selective(layer, x, plain_reference, count)
            out, index = patch_vit.selective_forward(layer, x[None], None, reference, count,
                                                     patch_vit.eager_attention_for(layer), onednn=onednn)
            assert set(index[0].tolist()) == set(chosen.tolist())
            assert (out[0] - expected).abs().max() <= TOL
            assert torch.equal(reference.values, stored_values)  # restored bit for bit
        # two frames in one chunk: per-frame rows of the flattened frames
        out, index = patch_vit.selective_forward(layer, torch.stack([x1, x2]), None, reference, count,
                                                 patch_vit.eager_attention_for(layer), onednn=onednn)
        for frame, x in enumerate((x1, x2)):
            expected, chosen = plain_selective(layer, x, plain_reference, count)
            assert set(index[frame].tolist()) == set(chosen.tolist())
            assert (out[frame] - expected).abs().max() <= TOL


def _ops_run(fn) -> list[str]:
    with torch.profiler.profile() as prof:
        fn()
    return [event.name for event in prof.events()]


def test_one_frame_selective_layer_runs_fused_kernels_and_no_index_arithmetic():
    layer = dinov2_layer()
    x0, x1, _ = stream_inputs(layer)
    reference = LayerReference(*(torch.empty_like(x0) for _ in range(3)))
    fallback = patch_vit.eager_attention_for(layer)
    with torch.no_grad():
        patch_vit.refresh_forward(layer, x0[None], None, reference, fallback, onednn=True)
        ops = _ops_run(lambda: patch_vit.selective_forward(layer, x1[None], None, reference, 12, fallback, onednn=True))
    assert "aten::gelu" not in ops  # inside oneDNN's fc1 kernel
    assert ops.count("aten::addcmul") == 2  # layer scales inside the residual adds
    assert "aten::arange" not in ops  # one frame's rows are its token indices
    assert ops.count("aten::index_select") == 3 and ops.count("aten::index_copy_") == 3


@pytest.mark.parametrize("name", ["gelu", "gelu_pytorch_tanh", "quick_gelu", "gelu_new"])
def test_feed_forward_fuses_exactly_pytorchs_gelu_and_keeps_other_activations(name):
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, hidden_act=name, num_hidden_layers=1,
                                num_attention_heads=2)
    mlp = SiglipVisionModel(config).encoder.layers[0].mlp
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        expected = mlp(x)
        got = kernels.feed_forward(mlp, x, onednn=True)
        ops = _ops_run(lambda: kernels.feed_forward(mlp, x, onednn=True))
    assert (got - expected).abs().max() <= TOL
    fused = name in ("gelu", "gelu_pytorch_tanh")
    assert (kernels.gelu_algorithm(ACT2FN[name]) is not None) == fused
    assert ("aten::gelu" in ops or "aten::tanh" in ops or "aten::sigmoid" in ops) != fused


def test_packed_weight_is_kept_and_follows_weight_changes():
    layer = nn.Linear(16, 24)
    x = torch.randn(5, 16)
    with torch.no_grad():
        first = kernels.packed_weight(layer.weight)
        assert kernels.packed_weight(layer.weight) is first  # packed once
        layer.weight.mul_(2.0)  # in place: the version counter moves
        assert (kernels.linear(layer, x, onednn=True) - layer(x)).abs().max() <= TOL
        layer.weight.data = torch.randn(24, 16)  # new storage behind the same parameter
        assert (kernels.linear(layer, x, onednn=True) - layer(x)).abs().max() <= TOL
        layer.weight = nn.Parameter(torch.randn(24, 16))  # a new parameter
        assert (kernels.linear(layer, x, onednn=True) - layer(x)).abs().max() <= TOL
    key = id(layer.weight)
    assert key in kernels._PACKED
    del layer
    gc.collect()
    assert key not in kernels._PACKED  # freed with the weight
