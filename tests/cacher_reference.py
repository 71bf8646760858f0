"""An independent implementation of STC-Cacher (docs/algorithms.md, section 2.2), for the tests.

One frame at a time, plain matrix algebra on each layer's weights, an explicit softmax whose
padded keys (a SigLIP2 frame's padding patches) get no weight. It shares no code with streamtc and
does not depend on the tower's attention implementation, so one reference checks the Cacher under
eager and SDPA attention alike. Towers: SigLIP, SigLIP2 (padding), CLIP (its pre-layernorm; its
last_hidden_state has no final norm) and DINOv2 (layer scales).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def layer_parts(layer: torch.nn.Module) -> tuple:
    """(ln1, q, k, v, o, ln2, mlp, s1, s2, heads) of a SigLIP/SigLIP2/CLIP or DINOv2 layer."""
    if hasattr(layer, "self_attn"):
        a = layer.self_attn
        return (layer.layer_norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, layer.layer_norm2, layer.mlp,
                1.0, 1.0, a.num_heads)
    a = layer.attention
    return (layer.norm1, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.norm2, layer.mlp,
            layer.layer_scale1.lambda1, layer.layer_scale2.lambda1, a.num_attention_heads)


def linear(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    return h @ module.weight.T + module.bias


def layer_norm(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    mean = h.mean(dim=-1, keepdim=True)
    variance = (h - mean).pow(2).mean(dim=-1, keepdim=True)
    return (h - mean) / torch.sqrt(variance + module.eps) * module.weight + module.bias


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, keys: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of q [Q, C] over k, v [T, C] per head; keys [T] bool: the keys that may be
    attended to (None: all)."""
    head_dim = q.shape[-1] // heads
    q, k, v = (x.view(x.shape[0], heads, head_dim).transpose(0, 1) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if keys is not None:
        scores = scores.masked_fill(~keys, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(q.shape[1], -1)


def reference_layer(layer: torch.nn.Module, x: torch.Tensor, keys: torch.Tensor | None, ref: dict | None = None,
                    ratio: float | None = None) -> tuple[torch.Tensor, dict | None]:
    """One pre-LN layer on x [T, C]. Without ref: exact, returns (out, the reference K, V, A, M).
    With ref: the non-refresh step (section 2.2), returns (out, None)."""
    ln1, q_proj, k_proj, v_proj, o_proj, ln2, mlp, s1, s2, heads = layer_parts(layer)
    t = x.shape[0]
    h1 = layer_norm(ln1, x)
    K = linear(k_proj, h1)
    if ref is None:
        Q, V = linear(q_proj, h1), linear(v_proj, h1)
        A = s1 * linear(o_proj, attention(Q, K, V, heads, keys))
        x = x + A
        M = s2 * mlp(layer_norm(ln2, x))
        return x + M, {"K": K, "V": V, "A": A, "M": M}
    k = max(1, min(t, math.floor(t * ratio)))
    similarity = (K * ref["K"]).sum(dim=-1) / (K.norm(dim=-1) * ref["K"].norm(dim=-1))  # cosine, token by token
    chosen = torch.argsort(similarity)[:k]
    V_bar = ref["V"].clone()
    V_bar[chosen] = linear(v_proj, h1[chosen])
    A_bar = ref["A"].clone()
    A_bar[chosen] = s1 * linear(o_proj, attention(linear(q_proj, h1[chosen]), K, V_bar, heads, keys))
    x = x + A_bar
    M_bar = ref["M"].clone()
    M_bar[chosen] = s2 * mlp(layer_norm(ln2, x)[chosen])
    return x + M_bar, None


def counted_flop_ratio(layer: torch.nn.Module, tokens: int, ratio: float, interval: int) -> float:
    """A frame's average cost under the fixed schedule relative to a full frame, from the FLOPs
    torch's `FlopCounterMode` counts (matrix products) in `reference_layer` on a random frame of
    `tokens` tokens: one refresh every `interval` frames, non-refresh frames recomputing `ratio`."""
    width = layer_parts(layer)[1].weight.shape[1]
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            _, ref = reference_layer(layer, x, None)
        full = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            reference_layer(layer, x + 0.1, None, ref, ratio)
        reused = counter.get_total_flops()
    return (full + (interval - 1) * reused) / (interval * full)


def tower_stages(tower: torch.nn.Module) -> tuple[Any, list[torch.nn.Module], Any]:
    """(embed: tower inputs -> ([F, T, C], key mask [F, T] or None), layers, final norm) of a tower."""
    def embed(inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "spatial_shapes" in inputs:  # SigLIP2: patches of several sizes, padded
            hidden = tower.embeddings(inputs["pixel_values"], inputs["spatial_shapes"])
            return hidden, inputs["pixel_attention_mask"].bool()
        hidden = tower.embeddings(inputs["pixel_values"])
        return (tower.pre_layrnorm(hidden) if hasattr(tower, "pre_layrnorm") else hidden), None

    encoder = tower.encoder
    layers = list(encoder.layers if hasattr(encoder, "layers") else encoder.layer)
    if hasattr(tower, "pre_layrnorm"):  # CLIP's last_hidden_state is the encoder's output
        final = torch.nn.Identity()
    else:
        final = tower.post_layernorm if hasattr(tower, "post_layernorm") else tower.layernorm
    return embed, layers, final


def reference_stream(tower: torch.nn.Module, chunks: list[dict], interval: int, ratio: float) -> torch.Tensor:
    """The Cacher (section 2.2, fixed schedule) over a stream of chunks (each the tower's keyword
    inputs for its frames): chunk c refreshes when c % interval == 0 and keeps its last frame's
    references. Returns every frame's last_hidden_state [frames, T, C]."""
    embed, layers, final = tower_stages(tower)
    refs: list[dict] | None = None
    outputs = []
    with torch.no_grad():
        for c, inputs in enumerate(chunks):
            hidden, masks = embed(inputs)
            refresh = refs is None or c % interval == 0
            new_refs: list[dict | None] = [None] * len(layers)
            for f in range(hidden.shape[0]):
                x, keys = hidden[f], None if masks is None else masks[f]
                for i, layer in enumerate(layers):
                    if refresh:
                        x, new_refs[i] = reference_layer(layer, x, keys)
                    else:
                        x, _ = reference_layer(layer, x, keys, refs[i], ratio)
                outputs.append(final(x))
            if refresh:
                refs = new_refs
    return torch.stack(outputs)


__all__ = ["attention", "counted_flop_ratio", "layer_norm", "layer_parts", "linear", "reference_layer",
           "reference_stream", "tower_stages"]
