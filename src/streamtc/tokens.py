"""Row gathers and scatters of per-frame tokens, shared by the Cacher, the Pruner and the baselines;
the token cosine that the benchmarks measure fidelity with.

Tokens are addressed as [F, k] per-frame indices into [F, T, C] tensors. Both operations work on
whole rows of the frames flattened to [F * T, C] (index_select / index_copy_): on CPU several times
faster than torch.gather / scatter_ with an index expanded over channels, which index every element.
"""

from __future__ import annotations

import torch


def flat_token_index(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-frame token indices [F, k] -> row indices [F * k] into the frames flattened to [F * T, C]."""
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * num_tokens
    return (index + offsets).flatten()


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [F, T, C], index [F, k] -> the selected rows [F, k, C] (a new tensor)."""
    frames, num_tokens, width = x.shape
    rows = x.reshape(frames * num_tokens, width).index_select(0, flat_token_index(index, num_tokens))
    return rows.view(frames, index.shape[1], width)


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


__all__ = ["flat_token_index", "gather_tokens", "scatter_tokens", "token_cosine"]
