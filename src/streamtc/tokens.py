"""Row gathers and scatters of per-frame tokens, shared by the Cacher, the Pruner and the baselines;
the token cosine that the benchmarks measure fidelity with.

Tokens are addressed as [F, k] per-frame indices into [F, T, C] tensors. Both operations work on
whole rows of the frames flattened to [F * T, C] (index_select / index_copy_): on CPU several times
faster than torch.gather / scatter_ with an index expanded over channels, which index every element.
"""

from __future__ import annotations

import torch


def flat_token_index(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-frame token indices [F, k] -> row indices [F * k] into the frames flattened to [F * T, C].

    One frame's rows are its token indices (a view where the index allows): no offset arithmetic on
    the streaming path, where a chunk is one frame."""
    if index.shape[0] == 1:
        return index.reshape(-1)
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * num_tokens
    return (index + offsets).flatten()


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [F, T, C], rows [F * k] from `flat_token_index` -> the selected rows [F, k, C] (a new tensor).
    For callers that gather several tensors at one index: the rows are computed once."""
    frames, num_tokens, width = x.shape
    return x.reshape(frames * num_tokens, width).index_select(0, rows).view(frames, -1, width)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [F, T, C], index [F, k] -> the selected rows [F, k, C] (a new tensor)."""
    return gather_rows(x, flat_token_index(index, x.shape[1]))


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write rows [F, k, C] into the contiguous base [F, T, C] at index [F, k], in place; returns base."""
    frames, num_tokens, width = base.shape
    flat = base.view(frames * num_tokens, width)
    flat.index_copy_(0, flat_token_index(index, num_tokens), rows.reshape(-1, width))
    return base


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the cosine between matching tokens: a, b [..., T, C] -> [...]
    ([F, T, C] -> [F] per frame; [T, C] -> a scalar)."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean(dim=-1)


__all__ = ["flat_token_index", "gather_rows", "gather_tokens", "scatter_tokens", "token_cosine"]
