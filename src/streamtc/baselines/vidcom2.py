"""VidCom2-style selection: per-frame budgets from frame uniqueness, then outlier tokens per frame.

Follows the released VidCom2 (Liu et al., EMNLP 2025, `llava/model/vidcom2.py`): score tokens on
the lowest-variance half of the channels with the same multi-scale Gaussian kernel as STC's
released scoring, against the video anchor (mean normalised token of the call) and the frame
anchor. A frame far from the video anchor is unique and gets a larger share:
scale_f = base * (1 + p_f - mean(p)), p = softmax(-mean video similarity / 0.01), capped at 1.
Each frame keeps its k_f tokens least similar to both anchors.

Differences: budgets are whole numbers summing exactly to F * k (largest remainders, each between
1 and P) where the released code rounds each frame separately, so the total can drift. Like the
released code it is per call: the video anchor is the mean of the frames given together, and a
call of one frame gets exactly k.

Because k_f varies, the result is ragged: `KeptTokens.lengths` gives each frame's count and rows
are padded after it (zero tokens, index P).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..pruner import Budget, KeptTokens
from ..pruner.functional import check_features, gaussian_kernel, low_variance_channels, squared_distances
from ..tokens import gather_tokens

DEFAULT_TEMPERATURE = 0.01  # released softmax temperature over frame uniqueness


def frame_budgets(uniqueness: Tensor, k: int, num_tokens: int, temperature: float = DEFAULT_TEMPERATURE) -> list[int]:
    """Per-frame kept counts [F] that sum to F * k, each in [1, P], larger for more unique frames.

    Ideal shares follow the released formula; whole counts are taken by largest remainder, moving
    one token at a time from or to the frames whose ideal is furthest from their count.
    """
    probs = torch.softmax((uniqueness - uniqueness.max()) / temperature, dim=0)
    ideal = ((k / num_tokens) * (1 + probs - probs.mean())).clamp(max=1.0) * num_tokens
    ideal_list = ideal.tolist()
    counts = [min(num_tokens, max(1, int(x))) for x in ideal_list]
    total = k * len(counts)
    while sum(counts) != total:
        if sum(counts) < total:
            f = max((i for i, c in enumerate(counts) if c < num_tokens), key=lambda i: ideal_list[i] - counts[i])
            counts[f] += 1
        else:
            f = min((i for i, c in enumerate(counts) if c > 1), key=lambda i: ideal_list[i] - counts[i])
            counts[f] -= 1
    return counts


def vidcom2_scores(features: Tensor) -> tuple[Tensor, Tensor]:
    """(token scores [F, P], frame uniqueness [F]); keep the lowest scores, favour the most unique frames."""
    num_frames, num_tokens, dim = features.shape
    channels = low_variance_channels(features.reshape(-1, dim))
    x = F.normalize(features[..., channels], dim=-1)
    video_anchor = x.mean(dim=(0, 1)).expand(num_frames, -1)
    anchors = torch.stack([video_anchor, x.mean(dim=1)], dim=1)  # [F, 2, C]
    similarity = gaussian_kernel(squared_distances(x, anchors))  # [F, P, 2]: to video, to frame
    return similarity.sum(dim=-1), -similarity[..., 0].mean(dim=-1)


class VidCom2Pruner:
    """VidCom2-style baseline (see module docstring); `prune(features) -> KeptTokens` with lengths."""

    def __init__(
        self,
        tokens_per_frame: int | None = None,
        keep_ratio: float | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature!r}")
        self.budget = Budget(tokens_per_frame, keep_ratio)
        self.temperature = float(temperature)

    def prune(self, features: Tensor) -> KeptTokens:
        check_features(features)
        num_frames, num_tokens, _ = features.shape
        k = self.budget.resolve(num_tokens)
        scores, uniqueness = vidcom2_scores(features.float())
        counts = frame_budgets(uniqueness, k, num_tokens, self.temperature)
        k_max = max(counts)
        # Lowest scores first; positions past a frame's count become padding (index P, sorted last).
        order = scores.argsort(dim=-1)[:, :k_max]
        lengths = torch.tensor(counts, device=features.device)
        pad = torch.arange(k_max, device=features.device)[None, :] >= lengths[:, None]
        indices = order.masked_fill(pad, num_tokens).sort(dim=-1).values
        tokens = gather_tokens(features, indices.clamp(max=num_tokens - 1)).masked_fill(pad.unsqueeze(-1), 0)
        return KeptTokens(tokens, indices, lengths)

    def reset(self) -> None:
        """Stateless (per call, as released): nothing to forget."""


__all__ = ["DEFAULT_TEMPERATURE", "frame_budgets", "vidcom2_scores", "VidCom2Pruner"]
