"""Content-blind baselines: uniform spatial subsampling and random selection.

Both keep the same per-frame budget as STC-Pruner and expose its interface
(`prune(features [F, P, D]) -> KeptTokens`, `reset()`), so benchmark rows differ only in the
choice of tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..pruner import Budget, KeptTokens
from ..pruner.functional import check_features
from ..tokens import gather_tokens


def uniform_indices(num_tokens: int, k: int, device: torch.device | str | None = None) -> Tensor:
    """k evenly spaced positions in [0, num_tokens): floor((i + 0.5) * P / k), ascending, distinct for k <= P."""
    return torch.div((2 * torch.arange(k, device=device) + 1) * num_tokens, 2 * k, rounding_mode="floor")


class UniformPruner:
    """Keep k tokens evenly spaced in raster order, the same positions in every frame.

    Follows the "uniform" row of token-pruning papers. Simplification: spacing is over the
    flattened frame, so on a grid it samples every (P / k)-th token rather than a 2-D sub-grid
    (identical when P / k divides the row length).
    """

    def __init__(self, tokens_per_frame: int | None = None, keep_ratio: float | None = None) -> None:
        self.budget = Budget(tokens_per_frame, keep_ratio)

    def prune(self, features: Tensor) -> KeptTokens:
        check_features(features)
        num_frames, num_tokens, _ = features.shape
        k = self.budget.resolve(num_tokens)
        indices = uniform_indices(num_tokens, k, features.device).expand(num_frames, k)
        return KeptTokens(gather_tokens(features, indices), indices)

    def reset(self) -> None:
        """Stateless: nothing to forget."""


class RandomPruner:
    """Keep k tokens per frame drawn uniformly without replacement, in original order.

    The generator is seeded per stream: reset() restarts the same draw sequence, so runs are
    reproducible and two streams given the same seed draw the same positions.
    """

    def __init__(self, tokens_per_frame: int | None = None, keep_ratio: float | None = None, seed: int = 0) -> None:
        self.budget = Budget(tokens_per_frame, keep_ratio)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def prune(self, features: Tensor) -> KeptTokens:
        check_features(features)
        num_frames, num_tokens, _ = features.shape
        k = self.budget.resolve(num_tokens)
        draws = torch.rand(num_frames, num_tokens, generator=self._generator)
        indices = draws.topk(k, dim=-1).indices.sort(dim=-1).values.to(features.device)
        return KeptTokens(gather_tokens(features, indices), indices)

    def reset(self) -> None:
        """Restart the draw sequence from the seed."""
        self._generator.manual_seed(self.seed)


__all__ = ["uniform_indices", "UniformPruner", "RandomPruner"]
