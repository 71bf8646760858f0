"""STC-Pruner scoring as pure tensor functions (docs/algorithms.md, section 3): tensors in, scores or kept tokens out.

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
from ..tokens import gather_tokens

# Released code: Gaussian kernel bandwidths 2**k for k in -3..1.
GAUSSIAN_BANDWIDTHS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class KeptTokens:
    """The tokens a pruner kept from F frames, in their original order.

    tokens: [F, k, D]; indices: [F, k], ascending positions within each frame (0 <= i < P).
    lengths: None when every frame keeps k tokens. Selectors whose per-frame budget varies
        (VidCom2) give the kept count of each frame [F]; row f is then valid up to lengths[f] and
        padded after it with zero tokens and index P (outside the frame, so indices stay
        ascending); `mask()` tells real entries from padding, and the layouts take `lengths`.
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

    def frame_counts(self) -> list[int]:
        """Real tokens kept in each frame."""
        if self.lengths is None:
            return [self.indices.shape[1]] * self.indices.shape[0]
        return self.lengths.tolist()

    @property
    def num_kept(self) -> int:
        """Total real tokens kept over all frames."""
        if self.lengths is None:
            return self.indices.numel()
        return int(self.lengths.sum())


def check_features(features: Tensor) -> None:
    """Raise InputError unless features is a finite floating [F, P, D] tensor with F, P, D >= 1.

    The finiteness check reads one flag back from the device: NaN/inf would otherwise poison the
    stream's memory for every later frame without any visible error. It looks at min and max only
    (NaN propagates through both): one pass, no full-size temporary.
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
    if not bool(torch.isfinite(torch.stack(torch.aminmax(features))).all()):
        raise InputError("features contain NaN or inf values; the vision tower or projector produced non-finite output")


def keep_top_k(features: Tensor, scores: Tensor, k: int, largest: bool) -> KeptTokens:
    """Keep the k tokens per frame with the highest (largest=True) or lowest scores, in original order."""
    indices = torch.topk(scores, k, dim=-1, largest=largest, sorted=False).indices.sort(dim=-1).values
    return KeptTokens(gather_tokens(features, indices), indices)


def low_variance_channels(tokens: Tensor, ratio: float = 0.5) -> Tensor:
    """Indices of the int(D * ratio) channels with the lowest variance over tokens [N, D].

    Released-code order (lowest variance first) is kept on purpose: the released memory averages
    these per-call channel vectors position by position (see `gaussian_scores`). The population
    variance is computed in two passes, several times faster on CPU than `var(dim=0)`.
    """
    variance = (tokens - tokens.mean(dim=0)).pow(2).mean(dim=0)
    return torch.topk(variance, int(tokens.shape[-1] * ratio), largest=False).indices


def gaussian_kernel(dist_sq: Tensor, bandwidths: tuple[float, ...] = GAUSSIAN_BANDWIDTHS) -> Tensor:
    """Released multi-scale kernel: sum over sigma of exp(-d^2 / (2 sigma)), elementwise."""
    return sum(torch.exp(dist_sq / (-2.0 * sigma)) for sigma in bandwidths)


def squared_distances(x: Tensor, anchors: Tensor) -> Tensor:
    """||x[f, p] - anchors[f, a]||^2 for x [F, P, C], anchors [F, A, C] -> [F, P, A].

    Expanded as |x|^2 + |a|^2 - 2 x.a with one batched matmul, so no [F, P, C] difference tensor
    is made per anchor.
    """
    dots = torch.bmm(x, anchors.transpose(1, 2))
    x_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow(2)
    a_sq = torch.linalg.vector_norm(anchors, dim=-1).pow(2).unsqueeze(1)
    return (x_sq + a_sq - 2.0 * dots).clamp_min(0.0)


def gaussian_scores(selected: Tensor, memory_mean: Tensor) -> Tensor:
    """Released STC scoring of selected-channel tokens [F, P, C] -> [F, P]; keep the lowest.

    memory_mean [C] is the mean of the stream's per-call mean tokens including the current call,
    un-normalised (the released code normalises it here). Tokens are L2-normalised; the frame
    anchor is the mean of the frame's normalised tokens. Score = g(x, frame anchor) +
    g(x, memory anchor) with g = `gaussian_kernel` of the squared distance: high means "close to
    both anchors", i.e. redundant.
    """
    x = F.normalize(selected, dim=-1)
    memory_anchor = F.normalize(memory_mean, dim=-1).expand(x.shape[0], -1)
    anchors = torch.stack([x.mean(dim=1), memory_anchor], dim=1)  # [F, 2, C]
    return gaussian_kernel(squared_distances(x, anchors)).sum(dim=-1)


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


def dual_anchor_scores(features: Tensor, spatial: Tensor, temporal: Tensor, alpha: float, eps: float = 1e-8) -> Tensor:
    """Paper Eq. 8, [F, P]: alpha * (1 - cos(z, a_t)) + (1 - alpha) * (1 - cos(z, a_s)); keep the highest.

    cos(z, a) = z.a / max(|z| |a|, eps), as `torch.nn.functional.cosine_similarity`, with both
    anchors in one batched matmul (no normalised copy of the features). Each frame's scores come
    from its own batch entry, so they do not depend on how many frames share the call.
    """
    anchors = torch.stack([temporal, spatial], dim=1)  # [F, 2, D]
    dots = torch.bmm(features, anchors.transpose(1, 2))  # [F, P, 2]
    token_norms = torch.linalg.vector_norm(features, dim=-1, keepdim=True)  # [F, P, 1]
    anchor_norms = torch.linalg.vector_norm(anchors, dim=-1).unsqueeze(1)  # [F, 1, 2]
    cos = dots / (token_norms * anchor_norms).clamp_min(eps)
    return alpha * (1.0 - cos[..., 0]) + (1.0 - alpha) * (1.0 - cos[..., 1])


__all__ = [
    "GAUSSIAN_BANDWIDTHS",
    "KeptTokens",
    "check_features",
    "keep_top_k",
    "low_variance_channels",
    "gaussian_kernel",
    "squared_distances",
    "gaussian_scores",
    "spatial_anchors",
    "windowed_temporal_anchors",
    "cumulative_temporal_anchors",
    "dual_anchor_scores",
]
