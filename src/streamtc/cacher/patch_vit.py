"""How STC-Cacher runs a pre-LN ViT layer with separate q/k/v projections.

Covers transformers 5.x `SiglipEncoderLayer`, `Siglip2EncoderLayer`, `CLIPEncoderLayer` and
`Idefics3EncoderLayer` (`self_attn.{q,k,v,out}_proj`, `layer_norm1`, `layer_norm2`, `mlp`) and
`Dinov2Layer` / `Dinov2WithRegistersLayer` (`attention.{q,k,v,o}_proj`, `norm1`, `norm2`, `mlp`, and
a learned per-channel layer scale on both branch outputs). All compute `X + s1 * A(LN1 X)` then
`X + s2 * MLP(LN2 X)` (s = 1 without layer scale); `layer_parts` names the pieces once per family.
Two paths, named after Eventful Transformers' first and incremental forwards:

- `refresh_forward`: the layer computed exactly, which also writes this layer's reference
  (unit-norm K, V, and attention plus MLP output of the chunk's last frame) into the stream's buffers.
- `selective_forward`: the non-refresh layer of docs/algorithms.md, section 2.2; recomputes the k tokens whose keys moved
  most, takes the reference's attention and MLP outputs for the rest; with a reuse check, its probe
  tokens attend beside the selected ones, and the layer reports how far their attention drifted.

Modifications relative to `SiglipEncoderLayer.forward` / `SiglipAttention.forward` (transformers 5.x):
- the attention block is inlined so K and V can be stored (refresh) or K computed alone (selective);
- attention still runs through `ALL_ATTENTION_FUNCTIONS` with the layer's configured backend, the
  selected queries against all current keys (query length k, key length T);
- the layer still takes `(hidden_states, attention_mask, **kwargs)` and returns a tensor, so hidden
  state capture (`output_hidden_states=True`) and gradient checkpointing see the cacher's outputs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer

from ..tokens import flat_token_index, gather_rows
from . import functional as F
from .kernels import feed_forward, linear
from .state import LayerReference


LAYER_SCALE_LAYERS = (Dinov2Layer, Dinov2WithRegistersLayer)


class LayerParts(NamedTuple):
    """The pieces of one pre-LN layer under family-neutral names.

    scale1 / scale2: the layer scale vectors [C] multiplying the attention and MLP outputs, or
    None where the family has none (SigLIP, CLIP).
    """

    norm1: nn.Module
    attention: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    out_proj: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    scale1: torch.Tensor | None
    scale2: torch.Tensor | None
    scaling: float
    dropout: float


def layer_parts(layer: nn.Module) -> LayerParts:
    """`layer`'s norms, projections, MLP and layer scales (see the module docstring for the families)."""
    if isinstance(layer, LAYER_SCALE_LAYERS):
        attn = layer.attention
        return LayerParts(
            layer.norm1, attn, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.norm2, layer.mlp,
            layer.layer_scale1.lambda1, layer.layer_scale2.lambda1, attn.scaling, attn.attention_dropout,
        )
    attn = layer.self_attn
    return LayerParts(
        layer.layer_norm1, attn, attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, layer.layer_norm2, layer.mlp,
        None, None, attn.scale, attn.dropout,
    )


def _scaled(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x if scale is None else x * scale


def _residual(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x + scale * branch (x + branch without a layer scale), in one op."""
    return x + branch if scale is None else torch.addcmul(x, branch, scale)


# The refresh and selective forwards hold no host syncs or data-dependent branches: one full graph.
COMPILABLE = True


def layer_inputs(attention_mask: torch.Tensor | None = None, **kwargs) -> tuple:
    """The layer's inputs after the hidden states, as the forwards below take them."""
    return (attention_mask,)


def layer_keys(layer: nn.Module, hidden_states: torch.Tensor, onednn: bool = False) -> torch.Tensor:
    """The layer's keys [F, T, C] for hidden states [F, T, C] (what the chunk planner compares)."""
    parts = layer_parts(layer)
    return linear(parts.k_proj, parts.norm1(hidden_states), onednn)


def eager_attention_for(layer: nn.Module) -> Callable:
    """The `eager_attention_forward` of the module that defines the layer's attention class."""
    module = sys.modules[type(layer_parts(layer).attention).__module__]
    return module.eager_attention_forward


def _attention(
    parts: LayerParts,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    eager_fallback: Callable,
) -> torch.Tensor:
    """Multi-head attention of queries [F, Q, C] over keys/values [F, T, C] -> [F, Q, C], before out_proj."""
    attn = parts.attention
    frames, num_queries, _ = queries.shape
    head_dim = attn.head_dim

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(frames, x.shape[1], -1, head_dim).transpose(1, 2)

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_fallback)
    output, _ = interface(
        attn,
        heads(queries),
        heads(keys),
        heads(values),
        attention_mask,
        scaling=parts.scaling,
        dropout=0.0 if not attn.training else parts.dropout,
    )
    return output.reshape(frames, num_queries, -1)


def _mask_rows(attention_mask: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """Keep the query rows `index` [F, k] of a [F, 1, T, T] mask (broadcast masks pass through)."""
    if attention_mask is None or attention_mask.shape[-2] == 1:
        return attention_mask
    rows = index[:, None, :, None].expand(-1, attention_mask.shape[1], -1, attention_mask.shape[-1])
    return torch.gather(attention_mask, 2, rows)


def refresh_forward(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    reference: LayerReference | None,
    eager_fallback: Callable,
    keys: torch.Tensor | None = None,
    onednn: bool = False,
) -> torch.Tensor:
    """The exact layer on [F, T, C]; writes the last frame's K, V and A + M into `reference` in place
    (reference None: the exact layer alone, as a downscaled encode runs it).

    keys: this layer's keys if the caller already computed them (the adaptive planner does for the
        first layer before deciding to refresh), else computed here.
    onednn: matrix products through oneDNN on CPU where that applies (see `kernels`).
    """
    parts = layer_parts(layer)
    normed = parts.norm1(hidden_states)
    if keys is None:
        keys = linear(parts.k_proj, normed, onednn)
    queries, values = linear(parts.q_proj, normed, onednn), linear(parts.v_proj, normed, onednn)
    context = _attention(parts, queries, keys, values, attention_mask, eager_fallback)
    attn_out = _scaled(linear(parts.out_proj, context, onednn), parts.scale1)
    hidden_states = hidden_states + attn_out

    mlp_out = _scaled(feed_forward(parts.mlp, parts.norm2(hidden_states), onednn), parts.scale2)
    hidden_states = hidden_states + mlp_out

    if reference is None:
        return hidden_states
    # The reference is stream state, not part of any graph: written from detached rows, so a forward
    # with gradients on (fine-tuning through the tower) works and never backpropagates into it.
    reference.unit_keys.copy_(F.unit_rows(keys[-1].detach()))
    reference.values.copy_(values[-1].detach())
    torch.add(attn_out[-1].detach(), mlp_out[-1].detach(), out=reference.residual_delta)
    if reference.probe_index is not None:  # the reuse check's probe (see LayerReference)
        torch.index_select(queries[-1].detach(), 0, reference.probe_index, out=reference.probe_queries)
        torch.index_select(attn_out[-1].detach(), 0, reference.probe_index, out=reference.probe_attention)
    return hidden_states


def selective_forward(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    reference: LayerReference,
    num_recomputed: int,
    eager_fallback: Callable,
    index: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    onednn: bool = False,
    group: int = 1,
    drift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-refresh layer (docs/algorithms.md, section 2.2) on [F, T, C].

    index: [F, k] tokens to recompute; when None, chosen here from this layer's key cosine.
    keys: this layer's keys if the caller already computed them (the shared/adaptive planner does
        for the first layer), else computed here.
    onednn: matrix products through oneDNN on CPU where that applies (see `kernels`).
    group: when choosing here, select whole groups of `group` consecutive tokens (1 for these towers).
    drift: [F], written with the layer's attention drift under its reused probe tokens
        (`functional.attention_drift`) when given and the reference has a probe (the reuse check).
    Returns the layer's output [F, T, C] and the recomputed tokens `index` [F, k] (the caller records them).
    """
    parts = layer_parts(layer)
    frames, num_tokens = hidden_states.shape[:2]
    normed = parts.norm1(hidden_states)  # [F, T, C]
    if keys is None:
        keys = linear(parts.k_proj, normed, onednn)  # all tokens: every selected query attends to every key
    if index is None:
        index = F.select_dynamic_tokens(F.key_similarity(keys, reference.unit_keys), num_recomputed, group)
    rows = flat_token_index(index, num_tokens)  # [F * k] rows of the frames flattened to [F * T, C]

    normed_selected = gather_rows(normed, rows)  # [F, k, C]
    queries = linear(parts.q_proj, normed_selected, onednn)
    selected_values = linear(parts.v_proj, normed_selected, onednn)
    query_rows = index
    probe = reference.probe_index if drift is not None else None
    if probe is not None:  # the reuse check's probe attends beside the selected tokens, with the reference's queries
        queries = torch.cat([queries, reference.probe_queries.expand(frames, -1, -1)], dim=1)
        query_rows = torch.cat([index, probe.expand(frames, -1)], dim=1)
    mask = _mask_rows(attention_mask, query_rows)
    replaced = None
    if frames == 1 and not torch.is_grad_enabled():
        # One frame: V̄ is V_ref with V_I swapped in, in place, and swapped back after attending
        # (bit-exact; saves a [T, C] copy per layer; with gradients on, autograd needs V̄ kept as it
        # was, so the copy below). A layer that raises in between leaves the stream without a
        # reference: STCCacher._layer_forward marks it for a refresh.
        replaced = F.swap_rows(reference.values, rows, selected_values[0])
        values = reference.values.unsqueeze(0)
    else:
        values = F.mix_with_reference(reference.values, index, selected_values)  # V̄ [F, T, C]
    attended = linear(parts.out_proj, _attention(parts, queries, keys, values, mask, eager_fallback), onednn)
    if replaced is not None:
        reference.values.index_copy_(0, rows, replaced)
    if probe is not None:
        attended, probe_attention = attended.split([index.shape[1], len(probe)], dim=1)
        probe_attention = _scaled(probe_attention, parts.scale1)
        drift.copy_(F.attention_drift(probe_attention, reference.probe_attention, hidden_states.index_select(1, probe),
                                      index, probe))

    # Both residual steps for the selected rows; LayerNorm is per token, so LN2 of the selected
    # rows equals LN2 of all rows, then selecting.
    selected = gather_rows(hidden_states, rows)  # X[I]
    selected = _residual(selected, attended, parts.scale1)  # + A_I
    selected = _residual(selected, feed_forward(parts.mlp, parts.norm2(selected), onednn), parts.scale2)  # + M_I
    return F.add_reference_delta(hidden_states, reference.residual_delta, index, selected), index


__all__ = [
    "COMPILABLE",
    "LayerParts",
    "layer_parts",
    "layer_inputs",
    "layer_keys",
    "eager_attention_for",
    "refresh_forward",
    "selective_forward",
]
