"""STC-Pruner scoring as pure tensor functions (SPEC §3): tensors in, scores or kept tokens out.

Nothing here holds state; the per-stream memory lives in `pruner.PrunerState` and is passed in
explicitly, so every function can be tested on hand-built tensors without a model. Shapes:
F frames, P tokens per frame, D channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

# Released code: Gaussian kernel bandwidths 2**k for k in -3..1.
GAUSSIAN_BANDWIDTHS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class KeptTokens:
    """The tokens a pruner kept from F frames, in their original order.

    tokens: [F, k, D]; indices: [F, k], ascending positions within each frame (0 <= i < P).
    lengths: None when every frame keeps k tokens. Selectors whose per-frame budget varies
        (VidCom2) give the kept count of each frame [F]; row f is then valid up to lengths[f] and
        padded after it with zero tokens and index P, so padding sorts last and can never be
        mistaken for (or silently gather) a real token.
    """

    tokens: Tensor
    indices: Tensor
    lengths: Tensor | None = None

    def mask(self) -> Tensor:
        """[F, k] bool, True where a kept token is real rather than padding."""
        num_frames, k = self.indices.shape
        if self.lengths is None:
            return torch.ones(num_frames, k, dtype=torch.bool, device=self.indices.device)
        return torch.arange(k, device=self.indices.device)[None, :] < self.lengths[:, None]

    def flat_tokens(self) -> Tensor:
        """[N, D]: the kept tokens of all frames one after the other, padding dropped."""
        if self.lengths is None:
            return self.tokens.reshape(-1, self.tokens.shape[-1])
        return self.tokens[self.mask()]

    @property
    def num_kept(self) -> int:
        """Total real tokens kept over all frames."""
        if self.lengths is None:
            return self.indices.numel()
        return int(self.lengths.sum())


def check_features(features: Tensor) -> None:
    """Raise InputError unless features is a finite floating [F, P, D] tensor with F, P, D >= 1.

    The finiteness check reads one flag back from the device: NaN/inf would otherwise poison the
    stream's memory for every later frame without any visible error.
    """
    if not isinstance(features, Tensor):
        raise InputError(f"features must be a torch.Tensor [F, P, D], got {type(features).__name__}")
    if features.dim() != 3:
        raise InputError(
            f"features must have rank 3 [frames, tokens per frame, channels], got shape {tuple(features.shape)}"
        )
    if min(features.shape) < 1:
        raise InputError(f"features must have at least one frame, token and channel, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise InputError(f"features must be floating point, got dtype {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise InputError("features contain NaN or inf values; the vision tower or projector produced non-finite output")


def gather_tokens(features: Tensor, indices: Tensor) -> Tensor:
    """features [F, P, D] at indices [F, k] -> [F, k, D]."""
    return torch.take_along_dim(features, indices.unsqueeze(-1), dim=1)


def keep_top_k(features: Tensor, scores: Tensor, k: int, largest: bool) -> KeptTokens:
    """Keep the k tokens per frame with the highest (largest=True) or lowest scores, in original order."""
    indices = torch.topk(scores, k, dim=-1, largest=largest, sorted=False).indices.sort(dim=-1).values
    return KeptTokens(gather_tokens(features, indices), indices)


def low_variance_channels(tokens: Tensor, ratio: float = 0.5) -> Tensor:
    """Indices of the int(D * ratio) channels with the lowest variance over tokens [N, D].

    Released-code order (lowest variance first) is kept on purpose: the released memory averages
    these per-call channel vectors position by position (see `gaussian_scores`).
    """
    variance = tokens.var(dim=0, unbiased=False)
    return torch.topk(variance, int(tokens.shape[-1] * ratio), largest=False).indices


def multi_scale_gaussian(x: Tensor, anchor: Tensor, bandwidths: tuple[float, ...] = GAUSSIAN_BANDWIDTHS) -> Tensor:
    """sum_sigma exp(-||x - anchor||^2 / (2 sigma)) over the last dim; anchor broadcasts against x."""
    dist_sq = (x - anchor).pow(2).sum(dim=-1)
    return sum(torch.exp(dist_sq / (-2.0 * sigma)) for sigma in bandwidths)


def gaussian_scores(selected: Tensor, memory_mean: Tensor) -> Tensor:
    """Released STC scoring of selected-channel tokens [F, P, C] -> [F, P]; keep the lowest.

    memory_mean [C] is the mean of the stream's per-call mean tokens including the current call,
    un-normalised (the released code normalises it here). Tokens are L2-normalised; the frame
    anchor is the mean of the frame's normalised tokens. High scores mean "close to both anchors",
    i.e. redundant.
    """
    x = F.normalize(selected, dim=-1)
    frame_anchor = x.mean(dim=1, keepdim=True)
    memory_anchor = F.normalize(memory_mean, dim=-1)
    return multi_scale_gaussian(x, frame_anchor) + multi_scale_gaussian(x, memory_anchor)


def spatial_anchors(features: Tensor) -> Tensor:
    """Each frame's mean token: [F, P, D] -> [F, D]."""
    return features.mean(dim=1)


def windowed_temporal_anchors(previous: Tensor, spatial: Tensor, window: int) -> Tensor:
    """Temporal anchor of each frame: mean spatial anchor of the `window` frames before it.

    previous [n, D] holds the stream's earlier anchors (oldest first, n <= window is enough);
    spatial [F, D] the anchors of this call. Frame f averages the rows just before it in
    [previous; spatial], never itself. A stream's very first frame has no earlier frame and gets
    its own spatial anchor, which reduces its score to spatial novelty alone. Each frame's window
    is averaged with the same op on the same rows whether frames come in one call or many, so the
    result does not depend on how a stream is chunked.
    """
    sequence = torch.cat([previous, spatial])
    n = previous.shape[0]
    return torch.stack([
        sequence[max(0, n + f - window): n + f].mean(dim=0) if n + f > 0 else spatial[f]
        for f in range(spatial.shape[0])
    ])


def cumulative_temporal_anchors(previous_sum: Tensor, previous_count: int, spatial: Tensor) -> tuple[Tensor, Tensor]:
    """Temporal anchors over an unbounded history: mean of every earlier spatial anchor.

    previous_sum [D] is the sum of the stream's earlier anchors (previous_count of them). Returns
    the anchors [F, D] and the new running sum. The sum is accumulated one frame at a time, so
    one call of F frames and F calls of one frame add in the same order. First frame of a stream:
    its own spatial anchor, as in `windowed_temporal_anchors`.
    """
    anchors = []
    total = previous_sum
    for f in range(spatial.shape[0]):
        count = previous_count + f
        anchors.append(total / count if count > 0 else spatial[f])
        total = total + spatial[f]
    return torch.stack(anchors), total


def dual_anchor_scores(features: Tensor, spatial: Tensor, temporal: Tensor, alpha: float) -> Tensor:
    """Paper Eq. 8, [F, P]: alpha * (1 - cos(z, a_t)) + (1 - alpha) * (1 - cos(z, a_s)); keep the highest.

    The cosines are elementwise products summed per token (no batched matmul), so a frame's
    scores do not depend on how many frames share the call.
    """
    z = F.normalize(features, dim=-1)
    cos_spatial = (z * F.normalize(spatial, dim=-1).unsqueeze(1)).sum(dim=-1)
    cos_temporal = (z * F.normalize(temporal, dim=-1).unsqueeze(1)).sum(dim=-1)
    return alpha * (1.0 - cos_temporal) + (1.0 - alpha) * (1.0 - cos_spatial)


__all__ = [
    "GAUSSIAN_BANDWIDTHS",
    "KeptTokens",
    "check_features",
    "gather_tokens",
    "keep_top_k",
    "low_variance_channels",
    "multi_scale_gaussian",
    "gaussian_scores",
    "spatial_anchors",
    "windowed_temporal_anchors",
    "cumulative_temporal_anchors",
    "dual_anchor_scores",
]
