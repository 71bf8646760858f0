"""STC-Pruner: the small stateful wrapper around `functional` (docs/algorithms.md, section 3).

    pruner = STCPruner(PrunerConfig(scoring="dual_anchor", keep_ratio=0.3))
    kept = pruner.prune(features)            # features [F, P, D] of one stream
    kept.tokens, kept.indices                # [F, k, D], [F, k] ascending
    pruner.reset()                           # a new stream starts

One pruner can serve several streams: each stream owns a `PrunerState`, and
`with pruner.stream(state): ...` makes it the current one.

Decisions:
- Budget: k = tokens_per_frame, or round(keep_ratio * P) (at least 1). A budget of P or more
  keeps every token of the frame (the memory is still updated), so one config works for any
  token count.
- gaussian is per call, as released: the channel selection, the call's mean token pushed into
  the memory, and hence the kept set depend on how frames are grouped into calls.
- dual_anchor is chunking-invariant: 16 frames in one call keep the same tokens as 16 calls of
  one frame (bit-exact on CPU, tested; on GPU, batched matmuls may round differently, which can
  only matter for exact score ties). The first frame of a stream has no temporal anchor yet and uses its own spatial
  anchor in its place, i.e. it is scored on spatial novelty alone.
- Scores are computed in float32 whatever the feature dtype; kept tokens keep the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..config import PrunerConfig
from ..errors import ConfigError, StreamStateError
from . import functional as PF
from .functional import KeptTokens

@dataclass(frozen=True)
class Budget:
    """Per-frame token budget: a count (tokens_per_frame) or a share of P (keep_ratio).

    Give at most one; with neither, keep_ratio is DEFAULT_KEEP_RATIO. The rules are PrunerConfig's:
    the budget is read from a PrunerConfig made of the two values, which validates them.
    """

    tokens_per_frame: int | None = None
    keep_ratio: float | None = None

    def __post_init__(self) -> None:
        config = PrunerConfig(tokens_per_frame=self.tokens_per_frame, keep_ratio=self.keep_ratio)
        object.__setattr__(self, "keep_ratio", config.keep_ratio)

    def resolve(self, num_tokens: int) -> int:
        """Tokens to keep from a frame of num_tokens: the budget, at least 1, at most num_tokens."""
        if self.tokens_per_frame is not None:
            k = self.tokens_per_frame
        else:
            k = max(1, math.floor(float(self.keep_ratio) * num_tokens + 0.5))
        return min(k, num_tokens)


@runtime_checkable
class TokenSelector(Protocol):
    """What STCPruner and every token-selection baseline expose (one stream at a time)."""

    def prune(self, features: Tensor) -> KeptTokens: ...

    def reset(self) -> None: ...


@dataclass
class PrunerState:
    """One stream's pruner memory. Fresh (or reset) means "the stream starts now".

    width: channel count D of the stream's features, fixed by its first call.
    frames: frames pruned so far.
    memory_sum / memory_calls: gaussian; sum of the per-call mean tokens over the selected
        channels [D // 2], and how many calls contributed.
    anchor_window: dual_anchor with a bounded history W; the last <= W spatial anchors [n, D].
    anchor_sum: dual_anchor with unbounded history; sum of all earlier spatial anchors [D].
    """

    width: int | None = None
    frames: int = 0
    memory_sum: Tensor | None = None
    memory_calls: int = 0
    anchor_window: Tensor | None = None
    anchor_sum: Tensor | None = None

    def reset(self) -> None:
        """Forget the stream in place (objects holding this state see the reset)."""
        for f in fields(self):
            setattr(self, f.name, f.default)

    def state_dict(self) -> dict[str, Tensor | int | None]:
        """Every field (tensors as they are), for saving a stream."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Tensor | int | None], device: torch.device | str | None = None) -> None:
        """Take back what `state_dict` returned in place, tensors moved to `device` (default: where they are)."""
        for f in fields(self):
            value = state[f.name]
            setattr(self, f.name, value.to(device) if isinstance(value, Tensor) and device is not None else value)

    def check_width(self, width: int) -> None:
        """Raise StreamStateError if this stream was started with another feature width."""
        if self.width is not None and width != self.width:
            raise StreamStateError(
                f"this stream's features had {self.width} channels and now have {width}; "
                "a stream cannot change feature width: call reset() or use a new PrunerState"
            )


class STCPruner:
    """STC-Pruner over [F, P, D] projector outputs of one stream at a time (see module docstring)."""

    def __init__(self, config: PrunerConfig | None = None) -> None:
        self.config = config if config is not None else PrunerConfig()
        if not isinstance(self.config, PrunerConfig):
            raise ConfigError(f"config must be a PrunerConfig, got {type(self.config).__name__}")
        self.budget = Budget(self.config.tokens_per_frame, self.config.keep_ratio)
        scorers: dict[str, Callable[[Tensor], tuple[Tensor, bool]]] = {
            "gaussian": self._score_gaussian,
            "dual_anchor": self._score_dual_anchor,
        }
        self._score = scorers[self.config.scoring]
        self._state = PrunerState()

    @property
    def state(self) -> PrunerState:
        """The current stream's state (not a copy)."""
        return self._state

    @state.setter
    def state(self, state: PrunerState) -> None:
        if not isinstance(state, PrunerState):
            raise StreamStateError(f"state must be a PrunerState, got {type(state).__name__}")
        self._state = state

    @contextmanager
    def stream(self, state: PrunerState) -> Iterator[PrunerState]:
        """Make `state` the current stream inside the block; the previous one is restored after."""
        previous = self._state
        self.state = state
        try:
            yield state
        finally:
            self._state = previous

    def reset(self) -> None:
        """Start a new stream on the current state."""
        self._state.reset()

    def prune(self, features: Tensor) -> KeptTokens:
        """Keep the budget's k most novel tokens of each frame of features [F, P, D].

        Frames must be consecutive frames of the current stream, oldest first.
        """
        PF.check_features(features)
        self._state.check_width(features.shape[-1])
        k = self.budget.resolve(features.shape[1])
        scores, largest = self._score(features.float())
        self._state.width = features.shape[-1]
        self._state.frames += features.shape[0]
        return PF.keep_top_k(features, scores, k, largest)

    def _score_gaussian(self, features: Tensor) -> tuple[Tensor, bool]:
        """Released scoring; pushes this call's mean token into the memory. Keep the lowest."""
        state = self._state
        channels = PF.low_variance_channels(features.reshape(-1, features.shape[-1]))
        selected = features[..., channels]
        call_mean = selected.mean(dim=(0, 1))
        memory_sum = call_mean if state.memory_sum is None else state.memory_sum.to(call_mean) + call_mean
        scores = PF.gaussian_scores(selected, memory_sum / (state.memory_calls + 1))
        state.memory_sum, state.memory_calls = memory_sum, state.memory_calls + 1
        return scores, False

    def _score_dual_anchor(self, features: Tensor) -> tuple[Tensor, bool]:
        """Paper scoring; pushes each frame's spatial anchor into the history. Keep the highest."""
        state, window = self._state, self.config.history
        spatial = PF.spatial_anchors(features)
        if window is None:
            previous_sum = spatial.new_zeros(spatial.shape[-1]) if state.anchor_sum is None else state.anchor_sum
            previous_sum = previous_sum.to(spatial)  # the state follows the stream across devices
            temporal, state.anchor_sum = PF.cumulative_temporal_anchors(previous_sum, state.frames, spatial)
        else:
            previous = (spatial[:0] if state.anchor_window is None else state.anchor_window).to(spatial)
            temporal = PF.windowed_temporal_anchors(previous, spatial, window)
            state.anchor_window = torch.cat([previous, spatial])[-window:]
        return PF.dual_anchor_scores(features, spatial, temporal, self.config.alpha), True


__all__ = ["Budget", "TokenSelector", "PrunerState", "STCPruner"]
