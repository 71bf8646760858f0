"""How STC-Cacher runs a Qwen2-VL, Qwen2.5-VL or Qwen3-VL vision block.

Covers transformers 5.x `Qwen2VLVisionBlock`, `Qwen2_5_VLVisionBlock` and `Qwen3VLVisionBlock`: all
compute `h + attn.proj(Attn(norm1 h))` then `h + mlp(norm2 h)` over the flat token sequence of a
tower forward, [S, C] with S = units x tokens, where a unit is one temporal patch (two frames fused
by the Conv3d patch embedding). The attention's q, k and v come from one fused `attn.qkv` Linear
(output rows [Wq; Wk; Wv]), get 2-D rotary embeddings (`position_embeddings = (cos, sin)`, one row
per token) on q and k, and attend within the segments of `cu_seqlens`: one per temporal patch, or
Qwen2.5-VL's windows (8x8 patches, tokens already in window order) in its windowed blocks. The
norms (LayerNorm or RMSNorm) and MLPs (plain or gated) are per token.

- `refresh_forward`: the block computed exactly, which also writes the block's reference (unit-norm
  pre-RoPE K, V, and attention plus MLP output of the chunk's last temporal patch).
- `selective_forward`: the non-refresh layer; per temporal patch, K for all tokens from the K row
  block of `qkv`, the k tokens whose keys moved most get Q and V from the Q and V row blocks, their
  own RoPE rows, attention over all current keys of their segment (the whole temporal patch, or their
  window) with the reference's values mixed with theirs, out-projection and MLP; every other token
  takes the reference's attention and MLP outputs.

Key similarity is taken before RoPE: a token keeps its position between the reference and the
current temporal patch (same grid, else the chunk refreshes), RoPE rotates every head's pair of
channels by the same angles for both, and a rotation keeps dot products and norms, so the cosine is
the same either way; pre-RoPE keys are what the projection gives, with nothing to undo or redo.

Modifications relative to `Qwen2VLVisionBlock.forward` / `VisionAttention.forward` (transformers 5.x):
- the attention block is inlined so K and V can be stored (refresh) or K computed alone (selective);
- attention still runs through `ALL_ATTENTION_FUNCTIONS` with the block's configured backend (eager
  or sdpa), per `cu_seqlens` segment as transformers does; in windowed blocks the selected queries
  are grouped by window, each group attending over its window's keys;
- the block still takes `(hidden_states, cu_seqlens, position_embeddings, **kwargs)` and returns a
  tensor, so hidden-state capture, DeepStack taps and the patch merger read the cacher's outputs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP
from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionMlp
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionMLP

from ..errors import UnsupportedModelError
from ..tokens import flat_token_index
from . import functional as F
from .kernels import linear, linear_rows
from .state import LayerReference

# Windowed blocks split attention by cu_seqlens on the host (as transformers does): not one graph.
COMPILABLE = False

ATTENTION_BACKENDS = ("eager", "sdpa")


def eager_attention_for(layer: nn.Module) -> Callable:
    """The `eager_attention_forward` of the block's modeling module; checks the attention backend.

    The selective pass's queries and keys have different lengths per segment, which the patch
    does not pass to the varlen flash kernels.
    """
    implementation = layer.attn.config._attn_implementation
    if implementation not in ATTENTION_BACKENDS:
        raise UnsupportedModelError(
            f"STC-Cacher runs Qwen vision blocks with eager or sdpa attention, not {implementation!r}; "
            "load the model with attn_implementation='sdpa'"
        )
    return sys.modules[type(layer.attn).__module__].eager_attention_forward


def layer_inputs(
    cu_seqlens: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs
) -> tuple:
    """The block's inputs after the hidden states, as the forwards below take them."""
    if position_embeddings is None:
        raise UnsupportedModelError("the Qwen vision block was called without position_embeddings (cos, sin)")
    return cu_seqlens, position_embeddings


def _qkv_rows(qkv: nn.Linear, x: torch.Tensor, part: int, onednn: bool) -> torch.Tensor:
    """One of q (0), k (1), v (2) from the fused projection, computing only its row block of the weight."""
    width = qkv.out_features // 3
    return linear_rows(qkv, x, slice(part * width, (part + 1) * width), onednn)


def layer_keys(layer: nn.Module, hidden_states: torch.Tensor, onednn: bool = False) -> torch.Tensor:
    """The block's pre-RoPE keys for hidden states [..., C] (what the chunk planner compares)."""
    return _qkv_rows(layer.attn.qkv, layer.norm1(hidden_states), 1, onednn)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """2-D vision RoPE on x [..., N, H, D] with cos/sin [..., N, D], in float32 as transformers does.

    x * cos + rotate_half(x) * sin, with rotate_half's halves added in place (no concatenated copy).
    """
    dtype = x.dtype
    x, cos, sin = x.float(), cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out.to(dtype)


def _feed_forward(mlp: nn.Module, x: torch.Tensor, onednn: bool) -> torch.Tensor:
    """mlp(x) for the three Qwen vision MLPs, matrix products through `linear` (oneDNN where it applies)."""
    if not onednn or mlp._forward_hooks or mlp._forward_pre_hooks:
        return mlp(x)
    if isinstance(mlp, Qwen2_5_VLMLP):  # gated SiLU
        return linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, x, onednn)) * linear(mlp.up_proj, x, onednn), onednn)
    if isinstance(mlp, Qwen3VLVisionMLP):
        return linear(mlp.linear_fc2, mlp.act_fn(linear(mlp.linear_fc1, x, onednn)), onednn)
    if isinstance(mlp, VisionMlp):
        return linear(mlp.fc2, mlp.act(linear(mlp.fc1, x, onednn)), onednn)
    return mlp(x)


def _attend(
    attn: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    eager_fallback: Callable,
) -> torch.Tensor:
    """Attention of queries [B, Q, H, D] over keys/values [B, N, H, D] -> [B, Q, H * D], before proj."""
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_fallback)
    output, _ = interface(
        attn,
        queries.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        None,
        scaling=attn.scaling,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        is_causal=False,
    )
    return output.reshape(queries.shape[0], queries.shape[1], -1)


def _segment_attention(
    attn: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    eager_fallback: Callable,
) -> torch.Tensor:
    """Full attention within each cu_seqlens segment of [S, H, D] sequences -> [S, H * D] (transformers' split)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outputs = [
        _attend(attn, q[None], k[None], v[None], eager_fallback)[0]
        for q, k, v in zip(*(x.split(lengths) for x in (queries, keys, values)))
    ]
    return torch.cat(outputs)


def _selected_attention(
    attn: nn.Module,
    queries: torch.Tensor,
    rows: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    eager_fallback: Callable,
) -> torch.Tensor:
    """Selected queries [U, k, H, D] (rows `rows` [U * k] of the flat sequence) over keys/values
    [U, T, H, D] -> [U, k, H * D].

    Each query attends over its own cu_seqlens segment. With as many segments as temporal patches
    each segment is a whole temporal patch (segments never straddle two): one batched attention.
    Otherwise (Qwen2.5-VL windows) the queries are grouped by window and each group attends over its
    window's keys, as the unpatched block attends per window.
    """
    units = keys.shape[0]
    if cu_seqlens.numel() - 1 == units:
        return _attend(attn, queries, keys, values, eager_fallback)
    selected = queries.shape[1]
    segment = torch.searchsorted(cu_seqlens[1:], rows.to(cu_seqlens.dtype), right=True)
    order = torch.argsort(segment)
    counts = torch.bincount(segment, minlength=cu_seqlens.numel() - 1).tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    grouped = queries.reshape(units * selected, *queries.shape[2:])[order]
    outputs = [
        _attend(attn, q[None], k[None], v[None], eager_fallback)[0]
        for q, k, v in zip(grouped.split(counts), keys.flatten(0, 1).split(lengths), values.flatten(0, 1).split(lengths))
        if q.shape[0]
    ]
    context = torch.empty(units * selected, queries.shape[2] * queries.shape[3], dtype=queries.dtype, device=queries.device)
    context[order] = torch.cat(outputs)
    return context.view(units, selected, -1)


def refresh_forward(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    reference: LayerReference | None,
    eager_fallback: Callable,
    keys: torch.Tensor | None = None,
    onednn: bool = False,
) -> torch.Tensor:
    """The exact block on [S, C]; writes the last temporal patch's K, V and A + M into `reference` in place
    (reference None: the exact block alone, as a downscaled encode runs it).

    keys: this block's pre-RoPE keys if the caller already computed them ([U, T, C]), else computed here.
    onednn: matrix products through oneDNN on CPU where that applies (see `kernels`).
    """
    attn = layer.attn
    seq_len, width = hidden_states.shape
    heads = attn.num_heads
    normed = layer.norm1(hidden_states)
    if keys is None:
        qkv = linear(attn.qkv, normed, onednn)  # [S, 3C]
        queries, keys, values = qkv.view(seq_len, 3, width).unbind(1)
    else:
        keys = keys.reshape(seq_len, width)
        queries, values = _qkv_rows(attn.qkv, normed, 0, onednn), _qkv_rows(attn.qkv, normed, 2, onednn)
    cos, sin = position_embeddings
    context = _segment_attention(
        attn,
        rotate(queries.view(seq_len, heads, -1), cos, sin),
        rotate(keys.view(seq_len, heads, -1), cos, sin),
        values.view(seq_len, heads, -1),
        cu_seqlens,
        eager_fallback,
    )
    attn_out = linear(attn.proj, context, onednn)
    hidden_states = hidden_states + attn_out

    mlp_out = _feed_forward(layer.mlp, layer.norm2(hidden_states), onednn)
    hidden_states = hidden_states + mlp_out

    if reference is None:
        return hidden_states
    last = slice(seq_len - reference.values.shape[0], seq_len)  # the chunk's last temporal patch
    # The reference is stream state, not part of any graph: written from detached rows, so a forward
    # with gradients on (fine-tuning through the tower) works and never backpropagates into it.
    reference.unit_keys.copy_(F.unit_rows(keys[last].detach()))
    reference.values.copy_(values[last].detach())
    torch.add(attn_out[last].detach(), mlp_out[last].detach(), out=reference.residual_delta)
    return hidden_states


def selective_forward(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    reference: LayerReference,
    num_recomputed: int,
    eager_fallback: Callable,
    index: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    onednn: bool = False,
    group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-refresh block on [S, C] = U temporal patches of T tokens.

    index: [U, k] tokens to recompute; when None, chosen here from this block's key cosine.
    keys: this block's pre-RoPE keys if the caller already computed them ([U, T, C]), else computed here.
    onednn: matrix products through oneDNN on CPU where that applies (see `kernels`).
    group: when choosing here, select whole groups of `group` consecutive tokens (4: a 2x2 merge block).
    Returns the block's output [S, C] and the recomputed tokens `index` [U, k] (the caller records them).
    """
    attn = layer.attn
    seq_len, width = hidden_states.shape
    num_tokens = reference.values.shape[0]
    units, heads = seq_len // num_tokens, attn.num_heads
    hidden_states = hidden_states.view(units, num_tokens, width)
    normed = layer.norm1(hidden_states)  # [U, T, C]
    if keys is None:
        keys = _qkv_rows(attn.qkv, normed, 1, onednn)  # all tokens: every selected query attends to every key
    keys = keys.reshape(units, num_tokens, width)
    if index is None:
        index = F.select_dynamic_tokens(F.key_similarity(keys, reference.unit_keys), num_recomputed, group)

    rows = flat_token_index(index, num_tokens)  # [U * k] rows of the flat sequence, shared by every gather

    def gather(x: torch.Tensor) -> torch.Tensor:  # [S, ...] or [U, T, ...] -> [U, k, ...]
        return x.reshape(seq_len, -1).index_select(0, rows).view(units, -1, x.shape[-1])

    normed_selected = gather(normed)  # [U, k, C]
    queries = _qkv_rows(attn.qkv, normed_selected, 0, onednn)
    selected_values = _qkv_rows(attn.qkv, normed_selected, 2, onednn)
    cos, sin = position_embeddings  # [S, D]
    queries = rotate(queries.view(units, -1, heads, width // heads), gather(cos), gather(sin))  # their own RoPE rows
    rotated_keys = rotate(keys.view(units, num_tokens, heads, -1), cos.view(units, num_tokens, -1),
                           sin.view(units, num_tokens, -1))
    if units == 1 and not torch.is_grad_enabled():
        # One temporal patch: V̄ is V_ref with V_I swapped in, in place, and swapped back after
        # attending (bit-exact; with gradients on, the copy below). A block that raises in between
        # leaves the stream without a reference: STCCacher._layer_forward marks it for a refresh.
        replaced = F.swap_rows(reference.values, rows, selected_values[0])
        values = reference.values.view(1, num_tokens, heads, -1)
        context = _selected_attention(attn, queries, rows, rotated_keys, values, cu_seqlens, eager_fallback)
        F.swap_rows(reference.values, rows, replaced)
    else:
        values = F.mix_with_reference(reference.values, index, selected_values).view(units, num_tokens, heads, -1)  # V̄
        context = _selected_attention(attn, queries, rows, rotated_keys, values, cu_seqlens, eager_fallback)

    selected = gather(hidden_states) + linear(attn.proj, context, onednn)  # X[I] + A_I
    selected = selected + _feed_forward(layer.mlp, layer.norm2(selected), onednn)  # + M_I
    return F.add_reference_delta(hidden_states, reference.residual_delta, index, selected).view(seq_len, width), index

__all__ = [
    "COMPILABLE",
    "ATTENTION_BACKENDS",
    "eager_attention_for",
    "layer_inputs",
    "layer_keys",
    "rotate",
    "refresh_forward",
    "selective_forward",
]
