"""How STC-Cacher chooses and recomputes tokens: pure tensor functions, no model, no state.

A non-refresh layer (docs/algorithms.md, section 2.2) compares every token's key with the same position's key in the
reference frame, recomputes the k least similar tokens, and takes the reference's attention and
MLP outputs for the rest. The functions below are those steps on plain tensors, shared by the
module-based layer patch and the static (compilable) path, and unit-tested on their own.

Shapes: F frames of a chunk, T tokens per frame, C channels, k recomputed tokens per frame.
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import InputError
from ..tokens import scatter_tokens


def num_recomputed_tokens(num_tokens: int, update_ratio: float) -> int:
    """k = max(1, min(T, floor(T * r))): how many tokens a non-refresh layer recomputes."""
    if num_tokens < 1:
        raise InputError(f"a frame must have at least one token, got {num_tokens}")
    return max(1, min(num_tokens, math.floor(num_tokens * update_ratio)))


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of x scaled to unit L2 norm (zero rows stay zero)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def key_similarity(keys: torch.Tensor, reference_unit_keys: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of each token's key to the reference key at the same position.

    keys [F, T, C], reference_unit_keys [T, C] (already unit-norm, computed once per refresh)
    -> [F, T]. Avoids materialising normalised [F, T, C] keys.
    """
    dots = torch.linalg.vecdot(keys, reference_unit_keys)
    return dots / torch.linalg.vector_norm(keys, dim=-1).clamp_min(eps)


def grouped_count(k: int, group: int) -> int:
    """Tokens recomputed when whole groups of `group` consecutive tokens are selected: k // group
    groups, at least one."""
    return max(1, k // group) * group


def select_dynamic_tokens(similarity: torch.Tensor, k: int, group: int = 1) -> torch.Tensor:
    """Indices [F, k] of the k least similar tokens of each frame (unordered).

    group > 1: select whole groups of `group` consecutive tokens (T a multiple of group) by their
    mean similarity, k // group groups (at least one): indices [F, grouped_count(k, group)].
    """
    if group == 1:
        return torch.topk(similarity, k, dim=-1, largest=False, sorted=False).indices
    frames, num_tokens = similarity.shape
    scores = similarity.view(frames, num_tokens // group, group).mean(dim=-1)
    chosen = torch.topk(scores, grouped_count(k, group) // group, dim=-1, largest=False, sorted=False).indices
    offsets = torch.arange(group, device=similarity.device)
    return (chosen[..., None] * group + offsets).flatten(1)


def reused_similarity(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """Median similarity of the tokens a selective pass would reuse (all but the k least similar).

    similarity [F, T] -> [F] (the lower median for an even count). The adaptive refresh trigger:
    it ignores the k recomputed tokens, whose change costs nothing, and, being a median, also a
    tail of reused tokens with a very low key cosine even where reuse works well (on the street
    clip the 5% quantile is near -0.9 for frame pairs reused at 0.97 fidelity), which makes a mean
    rank frame pairs less reliably. A cut or fast camera motion moves most tokens, so the median.
    With k = T nothing is reused: 1.
    """
    num_reused = similarity.shape[-1] - k
    if num_reused == 0:
        return similarity.new_ones(similarity.shape[0])
    # The reused tokens are the top num_reused; their lower median is the overall
    # (k + ceil(num_reused / 2))-th smallest value.
    return torch.kthvalue(similarity, k + (num_reused + 1) // 2, dim=-1).values


def relative_pixel_change(pixels: torch.Tensor, reference: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """How far each frame moved from the reference frame, relative to the reference's own contrast.

    pixels [F, ...] (a chunk of the tower's input), reference [...] (one frame) -> [F]:
    mean |x - x_ref| / mean |x_ref - mean(x_ref)|. The adaptive "pixels" refresh signal: free to
    compute, independent of the model's pixel normalisation, and on real DINOv2 weights the best
    predictor of a reused frame's output error we measured (docs/benchmarks.md).
    """
    change = (pixels - reference).abs().flatten(1).mean(dim=1)
    return change / (reference - reference.mean()).abs().mean().clamp_min(eps)


def largest_pixel_change(pixels: torch.Tensor | None, reference: torch.Tensor | None) -> float:
    """The "pixels" signal: the largest relative pixel change of a chunk's frames [U, ...] to `reference`
    (the reference frame's tower input, or for the budget's cut signal the previous frame's).

    Pixels that cannot be compared (the encoder called without its tower, a new frame size) count as
    infinitely moved. One host sync per chunk, outside the layers.
    """
    if pixels is None or reference is None or pixels.shape[1:] != reference.shape:
        return math.inf
    return float(relative_pixel_change(pixels, reference).max())


def within_refresh_budget(chunk_index: int, refreshes: int, budget_interval: int) -> bool:
    """Whether chunk `chunk_index` may refresh after `refreshes` refreshes on earlier chunks.

    The fixed schedule with N = budget_interval has refreshed chunk_index // N + 1 chunks by
    chunk_index (itself included), so another refresh is allowed while `refreshes` is below that:
    a credit of 1/N per chunk, unused credit carried over. On every prefix of a stream, refreshes
    then never exceed the fixed schedule's count.
    """
    return refreshes < chunk_index // budget_interval + 1


def mix_with_reference(reference: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The reference [T, C] repeated for each frame, with rows [F, k, C] replacing positions index.

    This is the V̄ (values) construction of docs/algorithms.md, section 2.2; a new tensor, the reference is not modified.
    """
    return scatter_tokens(reference.repeat(index.shape[0], 1, 1), index, rows)


def swap_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write rows [k, C] into x [T, C] at index [k], in place; returns the rows they replaced.

    Swapping the returned rows back restores x bit-exactly: one frame's V̄ is built in the
    reference's own V buffer for the attention and undone after it, instead of copying [T, C].
    """
    replaced = x.index_select(0, index)
    x.index_copy_(0, index, rows)
    return replaced


def add_reference_delta(
    x: torch.Tensor, reference_delta: torch.Tensor, index: torch.Tensor, recomputed_rows: torch.Tensor
) -> torch.Tensor:
    """A non-refresh layer's output: x + reference_delta [T, C] for reused tokens, recomputed_rows at index.

    x [F, T, C] is the layer input; recomputed_rows [F, k, C] are the selected tokens' exact outputs.
    A reused token takes the reference's output in both residual branches (docs/algorithms.md, section 2.2, steps 5 and 6),
    so its two residual adds collapse into one add of A_ref + M_ref, stored at refresh: one pass
    over [F, T, C] per layer instead of two, and no Ā or M̄ materialised.
    """
    return scatter_tokens((x + reference_delta).contiguous(), index, recomputed_rows)  # autograd can follow it


# Every PROBE_STRIDE-th token position is a probe of the reuse check (CacherConfig.reuse_check).
PROBE_STRIDE = 4


def probe_positions(num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The reuse check's probe: every PROBE_STRIDE-th token position, [ceil(T / PROBE_STRIDE)]."""
    return torch.arange(0, num_tokens, PROBE_STRIDE, device=device)


def attention_drift(
    probe_attention: torch.Tensor, reference_attention: torch.Tensor, probe_inputs: torch.Tensor,
    recomputed: torch.Tensor, probe: torch.Tensor, eps: float = 1e-12,
) -> torch.Tensor:
    """How far a reused layer's attention moved under the reused probe tokens, per frame [F].

    probe_attention [F, P, C]: the probe tokens' attention output (after out_proj and layer scale) with
    the reference's queries over this chunk's keys and values; reference_attention [P, C]: the same in
    the reference; probe_inputs [F, P, C]: the probe tokens' layer inputs; recomputed [F, k]: the
    tokens the layer recomputed (their probes are left out: nothing of theirs is reused); probe [P].
    The mean over the reused probe tokens of |A - A_ref| / |x|: reused tokens keep the reference's
    attention output, so where the tokens they attend to changed, their reuse is stale even though
    their own keys did not move (0 when every probe token was recomputed).
    """
    reused = (recomputed[:, :, None] != probe[None, None, :]).all(dim=1)  # [F, P]
    drift = torch.linalg.vector_norm(probe_attention - reference_attention, dim=-1)
    drift = drift / torch.linalg.vector_norm(probe_inputs, dim=-1).clamp_min(eps)
    return (drift * reused).sum(dim=1) / reused.sum(dim=1).clamp_min(1)


def probe_flops(num_probe: int, width: int, span: float) -> float:
    """Multiply-accumulates of the reuse check in one layer: the probe's attention rows over `span`
    keys and its out_proj (its queries are the reference's)."""
    return 2 * num_probe * span * width + num_probe * width * width


def strided_grid_index(side: int, keep_ratio: float) -> torch.Tensor:
    """Indices of an evenly strided subset of a side x side grid holding about keep_ratio of its cells."""
    keep_side = max(1, min(side, round(side * math.sqrt(keep_ratio))))
    rows = torch.linspace(0, side - 1, keep_side).round().long()
    return (rows[:, None] * side + rows[None, :]).flatten()


def nearest_kept(side: int, kept: torch.Tensor) -> torch.Tensor:
    """For every grid cell, the position (in `kept`) of the nearest kept cell."""
    cells = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).view(-1, 2).float()
    kept_cells = cells[kept]
    return torch.cdist(cells, kept_cells).argmin(dim=1)


def layer_flops(
    num_tokens: int, width: int, mlp_width: float, recomputed: int | None = None, span: float | None = None
) -> float:
    """Multiply-accumulate count of one pre-LN ViT layer on one frame (matmuls only).

    recomputed=None is the full layer; otherwise the non-refresh layer of docs/algorithms.md, section 2.2: K projection on
    all T tokens; Q, V, out_proj, attention rows and MLP on `recomputed` tokens. span: the keys a query
    attends to, on average (None: all T; less in windowed attention, see `towers.attention_spans`);
    mlp_width: the MLP's products per token over 2 x width (`towers.mlp_width`).
    """
    t, c = num_tokens, width
    keys = t if span is None else span
    if recomputed is None:
        return 4 * t * c * c + 2 * t * keys * c + 2 * t * c * mlp_width
    k = recomputed
    return t * c * c + 3 * k * c * c + 2 * k * keys * c + 2 * k * c * mlp_width


@functools.lru_cache(maxsize=256)
def stack_flops(num_tokens: int, width: int, mlp_width: float, spans: tuple[float | None, ...],
                recomputed: int | None = None) -> float:
    """`layer_flops` summed over a stack of layers, one attention span each (a chunk's geometry
    repeats, so the sum is kept)."""
    return sum(layer_flops(num_tokens, width, mlp_width, recomputed, span) for span in spans)


def schedule_ratio(full: float, selective: float, cache_interval: int | float) -> float:
    """Average cost of a frame relative to a full one when one chunk in `cache_interval` refreshes
    (cost `full`) and the rest are non-refresh (`selective`); math.inf: never again after the first."""
    if math.isinf(cache_interval):
        return selective / full
    return (full + (cache_interval - 1) * selective) / (cache_interval * full)


def flop_ratio(
    num_tokens: int, width: int, mlp_width: float, update_ratio: float, cache_interval: int | float
) -> float:
    """Average cost of a frame under the cacher relative to a full frame, by the FLOP model (every
    layer attending over all tokens; see `schedule_ratio`)."""
    full = layer_flops(num_tokens, width, mlp_width)
    selective = layer_flops(num_tokens, width, mlp_width, num_recomputed_tokens(num_tokens, update_ratio))
    return schedule_ratio(full, selective, cache_interval)


__all__ = [
    "num_recomputed_tokens",
    "unit_rows",
    "key_similarity",
    "grouped_count",
    "select_dynamic_tokens",
    "reused_similarity",
    "relative_pixel_change",
    "largest_pixel_change",
    "within_refresh_budget",
    "mix_with_reference",
    "swap_rows",
    "add_reference_delta",
    "PROBE_STRIDE",
    "probe_positions",
    "attention_drift",
    "probe_flops",
    "strided_grid_index",
    "nearest_kept",
    "layer_flops",
    "stack_flops",
    "schedule_ratio",
    "flop_ratio",
]
