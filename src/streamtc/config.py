"""Validated configuration objects.

Every setting streamtc uses lives in one of these dataclasses; invalid values raise `ConfigError` at
construction, and `from_dict` rejects unknown keys so a misspelt option never silently falls back to
a default. `STCConfig` bundles the per-component configs and is what sessions, the CLI, the
benchmark and the evaluation write next to their results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from .checks import positive_int, unit_ratio
from .errors import ConfigError

# The Pruner's default share of each frame's tokens: the paper's setting with the Cacher combined
# (docs/algorithms.md, "STC-Pruner").
DEFAULT_KEEP_RATIO = 0.3


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


def _from_dict(cls: type, data: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(known)}")
    return cls(**data)


# Default trigger level per adaptive refresh signal (calibrated on real DINOv2 weights; docs/benchmarks.md).
DEFAULT_REFRESH_THRESHOLDS = {"pixels": 0.35, "keys": 0.92}
# The robust profile's reuse check (CacherConfig.reuse_check), tuned on the tuning clips with real DINOv2-S
# weights: a reused frame whose attention drift exceeds it is encoded again (docs/benchmarks.md).
ROBUST_REUSE_CHECK = 0.16


@dataclass(frozen=True)
class CacherConfig:
    """STC-Cacher settings (docs/algorithms.md, section 2).

    cache_interval: N; chunk c of a stream is a refresh chunk when c % N == 0.
    update_ratio: r, the share of tokens recomputed in every layer of a non-refresh chunk
        (the paper's R_Cacher is the reused share 1 - r); k = max(1, floor(T * r)).
    selection: "per_layer" (paper: each layer picks its own tokens from its own keys) or
        "shared" (pick once from the first layer's keys, reuse the index set in every layer).
    granularity: what a non-refresh layer selects. "token" (paper: the k least similar tokens) or
        "merge_block" (Qwen-VL towers only: whole 2x2 merge blocks, the 4 tokens the patch merger
        fuses into one LLM token, ranked by their mean key cosine; k // 4 blocks, at least one, so
        the same or up to 3 fewer tokens than "token"). Measured in docs/benchmarks.md.
    refresh: "fixed" (paper: chunk c refreshes when c % N == 0), "adaptive": refresh when the
        reference is N chunks old, or earlier when refresh_signal says a frame of the chunk moved
        too far from the reference (scene cuts, fast motion), or "budget": spend a per-stream FLOP
        budget (flop_budget) chunk by chunk on the best of refresh, reuse and a downscaled encode,
        driven by codec hints where the source has them and by pixel change otherwise
        (docs/algorithms.md, "Budget refresh"; `CacherConfig.robust()`).
    flop_budget: refresh="budget" only: the share of the unpatched tower's encoder FLOPs the stream
        may spend, on every prefix of the stream; None: what the fixed schedule with this
        cache_interval and update_ratio spends.
    stale_threshold: refresh="budget" only: the relative pixel change to the reference (see
        refresh_signal "pixels") above which reusing it is not worth its cost; with codec hints,
        the share of the patch area that changed since the reference above which the same holds
        is stale_share.
    stale_share: refresh="budget", with codec hints: see stale_threshold.
    cut_threshold: refresh="budget" only, without codec hints: the relative pixel change to the
        previous frame from which a chunk counts as a scene cut (codec hints flag cuts themselves).
    token_signal: how a non-refresh chunk that has codec hints chooses the tokens it recomputes:
        "keys" (the paper: each layer its own least similar keys), "codec" (the tokens that changed
        most since the reference by the decoder's motion vectors and intra-coded blocks, one set
        for every layer) or "codec+keys" (the first layer's key cosine lowered by that change,
        one set for every layer). Without hints every signal selects by keys.
    refresh_signal: what an adaptive cacher watches. "pixels" (default): the relative pixel
        change of the tower's input to the reference frame, mean |x - x_ref| / mean |x_ref - mean
        x_ref|, free to compute and the best predictor of the cached output's error we measured
        on real weights (docs/benchmarks.md); refresh when it exceeds refresh_threshold. "keys":
        the median first-layer key cosine of the tokens that would be reused (all but the k least
        similar); refresh when it falls below refresh_threshold.
    refresh_threshold: the trigger level; None picks the signal's default (pixels: a change of
        0.35; keys: a cosine of 0.92).
    over_budget: adaptive "pixels" and budget only: what a chunk does when the signal asks for a refresh
        that the budget cannot pay for. "reuse" (the selective path against the old reference, what a
        fixed schedule does), "downscale" (refresh="budget" only: encode the frame whole at a lower
        resolution, as many patches as the remaining budget pays for, and resize the tower's output
        tokens back to its grid bilinearly; SigLIP/CLIP/DINOv2-style towers without padding, else
        as "subsample") or "subsample": encode the frame exactly but on an evenly strided
        subset of its patch tokens (class and register tokens kept; subsample_ratio of the grid),
        each dropped token taking the output of the nearest kept one, and leave the reference as
        it is. After a cut the old reference is worth little and the frame's own tokens are
        worth more (measured on real weights: docs/benchmarks.md).
    subsample_ratio: the share of the patch grid an over-budget "subsample" chunk encodes; the
        default 0.32 costs about what a non-refresh chunk does at update_ratio 0.25.
    subsample_threshold: the relative pixel change from which an over-budget chunk counts as a
        cut and is subsampled; below it (small motion) it is reused as usual. Default 0.5: on the
        street clip at 1 fps cuts measure 1.1-2.4, and reused frames at 0.59-0.63 keep a cosine of
        0.56; on steady footage (carphone, a talking head) changes stay under 0.45 and reuse beats
        subsampling.
    refresh_budget: adaptive only; None (no cap) or an interval B: the stream never refreshes
        more chunks than the fixed schedule with N = B would have by the same chunk
        (c // B + 1 by chunk c). A credit of 1/B per chunk, unused credit carried over: still
        scenes bank refreshes that cuts and fast motion spend. The budget wins over the trigger
        and the max-age refresh; a chunk without a reference (stream start, new resolution)
        always refreshes. Must not exceed cache_interval.
    compile_mode: None (eager) or a `torch.compile` mode ("default", "reduce-overhead",
        "max-autotune", "max-autotune-no-cudagraphs") for the static-shape path: the refresh and
        selective layer functions have fixed k, write references into preallocated buffers in
        place and contain no host syncs or data-dependent branches, so one full graph is compiled
        per chunk shape and reused by every layer; "reduce-overhead" adds CUDA graphs on a GPU.
    cpu_kernels: "onednn" (matrix products of the patched layers through oneDNN on CPU, float32
        and bfloat16, where PyTorch would call MKL: faster at both a full frame's and a
        non-refresh layer's row counts, see streamtc/cacher/kernels.py) or "torch" (PyTorch's
        own kernels, as the unpatched model). GPUs and the compiled path always use the latter.
    """

    cache_interval: int = 2
    update_ratio: float = 0.25
    selection: Literal["per_layer", "shared"] = "per_layer"
    granularity: Literal["token", "merge_block"] = "token"
    refresh: Literal["fixed", "adaptive", "budget"] = "fixed"
    refresh_signal: Literal["pixels", "keys"] = "pixels"
    refresh_threshold: float | None = None
    refresh_budget: int | None = None
    flop_budget: float | None = None
    stale_threshold: float = 0.5
    stale_share: float = 0.5
    cut_threshold: float = 0.6
    token_signal: Literal["keys", "codec", "codec+keys"] = "keys"
    over_budget: Literal["reuse", "subsample", "downscale"] = "reuse"
    reuse_check: float | None = None
    subsample_ratio: float = 0.32
    subsample_threshold: float = 0.5
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    cpu_kernels: Literal["onednn", "torch"] = "onednn"

    def __post_init__(self) -> None:
        positive_int(self.cache_interval, "cache_interval", hint="1 refreshes every chunk")
        unit_ratio(self.update_ratio, "update_ratio")
        _check_choice("selection", self.selection, ("per_layer", "shared"))
        _check_choice("granularity", self.granularity, ("token", "merge_block"))
        _check_choice("refresh", self.refresh, ("fixed", "adaptive", "budget"))
        _check_choice("token_signal", self.token_signal, ("keys", "codec", "codec+keys"))
        _check_choice(
            "compile_mode", self.compile_mode,
            (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        )
        _check_choice("cpu_kernels", self.cpu_kernels, ("onednn", "torch"))
        _check_choice("refresh_signal", self.refresh_signal, ("pixels", "keys"))
        if self.refresh_threshold is None:
            object.__setattr__(self, "refresh_threshold", DEFAULT_REFRESH_THRESHOLDS[self.refresh_signal])
        if self.refresh_signal == "keys" and (
            not isinstance(self.refresh_threshold, (int, float)) or not -1.0 <= self.refresh_threshold <= 1.0
        ):
            raise ConfigError(f"refresh_threshold is a cosine similarity in [-1, 1] for refresh_signal='keys', got {self.refresh_threshold!r}")
        if self.refresh_signal == "pixels" and (
            not isinstance(self.refresh_threshold, (int, float)) or self.refresh_threshold < 0.0
        ):
            raise ConfigError(f"refresh_threshold is a relative pixel change >= 0 for refresh_signal='pixels', got {self.refresh_threshold!r}")
        _check_choice("over_budget", self.over_budget, ("reuse", "subsample", "downscale"))
        self._check_budget()
        unit_ratio(self.subsample_ratio, "subsample_ratio")
        if not isinstance(self.subsample_threshold, (int, float)) or self.subsample_threshold < 0.0:
            raise ConfigError(f"subsample_threshold is a relative pixel change >= 0, got {self.subsample_threshold!r}")
        if self.over_budget == "subsample" and self.refresh == "fixed":
            raise ConfigError("over_budget='subsample' needs refresh='adaptive' (refresh_signal='pixels') or 'budget'")
        if self.over_budget == "subsample" and self.refresh == "adaptive" and self.refresh_signal != "pixels":
            raise ConfigError("over_budget='subsample' needs refresh='adaptive' with refresh_signal='pixels'")
        if self.refresh_budget is not None:
            positive_int(self.refresh_budget, "refresh_budget", optional=True)
            if self.refresh != "adaptive":
                raise ConfigError("refresh_budget only applies to refresh='adaptive' (a fixed schedule is its own budget)")
            if self.refresh_budget > self.cache_interval:
                raise ConfigError(
                    f"refresh_budget ({self.refresh_budget}) must not exceed cache_interval ({self.cache_interval}), "
                    "the longest an adaptive cacher keeps a reference"
                )

    def _check_budget(self) -> None:
        """The refresh="budget" settings: a budget in (0, 1], thresholds >= 0, downscale only there."""
        if self.flop_budget is not None:
            if self.refresh != "budget":
                raise ConfigError("flop_budget only applies to refresh='budget'")
            unit_ratio(self.flop_budget, "flop_budget")
        for name in ("stale_threshold", "stale_share", "cut_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if self.over_budget == "downscale" and self.refresh != "budget":
            raise ConfigError("over_budget='downscale' needs refresh='budget'")
        if self.reuse_check is not None:
            if isinstance(self.reuse_check, bool) or not isinstance(self.reuse_check, (int, float)) or not self.reuse_check > 0:
                raise ConfigError(f"reuse_check is an attention drift > 0 (or None: off), got {self.reuse_check!r}")
            if self.refresh != "budget":
                raise ConfigError("reuse_check needs refresh='budget' (a rejected reuse is encoded again within the budget)")

    @classmethod
    def robust(cls, cache_interval: int = 2, **overrides: Any) -> Self:
        """The best policy measured on real footage (docs/benchmarks.md, issue 24): a FLOP budget equal
        to the paper's fixed schedule with this cache_interval (N=2 by default), spent chunk by chunk
        on refreshes where the scene changed, reuse where it did not, and a downscaled encode at a steady
        cost where a stale reference cannot serve and the budget cannot refresh; codec hints where the
        source has them; each reuse checked after the fact by its attention drift (reuse_check), and
        encoded again when it fails. `CacherConfig()` stays the
        paper's fixed schedule; overrides replace any field (e.g. flop_budget=0.5)."""
        settings: dict[str, Any] = dict(
            cache_interval=cache_interval, update_ratio=0.25, refresh="budget", over_budget="downscale",
            token_signal="keys", reuse_check=ROBUST_REUSE_CHECK,
        )
        return cls(**{**settings, **overrides})

    @property
    def profile(self) -> str:
        """"paper", "robust" or "custom": which named setting this is, for summaries and results headers."""
        if self == CacherConfig(cache_interval=self.cache_interval, update_ratio=self.update_ratio):
            return "paper" if self.update_ratio == 0.25 and self.cache_interval in (2, 4) else "custom"
        return "robust" if self == CacherConfig.robust(self.cache_interval) else "custom"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PrunerConfig:
    """STC-Pruner settings (docs/algorithms.md, section 3).

    scoring: "gaussian" (the released code, which produced the published numbers) or
        "dual_anchor" (the paper's Eq. 8).
    tokens_per_frame / keep_ratio: the per-frame budget, as a count or as a share of the frame's
        tokens (k = round(keep_ratio * P), at least 1); give at most one (keep_ratio defaults to
        DEFAULT_KEEP_RATIO = 0.3, the paper's combined setting). A budget of P or more keeps every token.
    alpha: weight of the temporal anchor in dual_anchor scoring.
    history: W, how many previous frames the dual_anchor temporal anchor averages (None = all);
        a stream's first frame, with no previous frame, is scored on its spatial anchor alone.
    """

    scoring: Literal["gaussian", "dual_anchor"] = "gaussian"
    tokens_per_frame: int | None = None
    keep_ratio: float | None = None
    alpha: float = 0.5
    history: int | None = None

    def __post_init__(self) -> None:
        _check_choice("scoring", self.scoring, ("gaussian", "dual_anchor"))
        if self.tokens_per_frame is not None and self.keep_ratio is not None:
            raise ConfigError("give either tokens_per_frame or keep_ratio, not both")
        if self.tokens_per_frame is None and self.keep_ratio is None:
            object.__setattr__(self, "keep_ratio", DEFAULT_KEEP_RATIO)
        positive_int(self.tokens_per_frame, "tokens_per_frame", optional=True)
        if self.keep_ratio is not None:
            unit_ratio(self.keep_ratio, "keep_ratio")
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha!r}")
        positive_int(self.history, "history", optional=True, hint="None is unbounded")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class STCConfig:
    """Both STC levels with the paper's combined defaults: Cacher N = 2, r = 0.25; Pruner 30%.

    Set a component to None to switch it off (its model code is then left untouched).
    """

    cacher: CacherConfig | None = field(default_factory=CacherConfig)
    pruner: PrunerConfig | None = field(default_factory=PrunerConfig)

    def __post_init__(self) -> None:
        if self.cacher is not None and not isinstance(self.cacher, CacherConfig):
            raise ConfigError(f"cacher must be a CacherConfig or None, got {type(self.cacher).__name__}")
        if self.pruner is not None and not isinstance(self.pruner, PrunerConfig):
            raise ConfigError(f"pruner must be a PrunerConfig or None, got {type(self.pruner).__name__}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        unknown = sorted(set(data) - {"cacher", "pruner"})
        if unknown:
            raise ConfigError(f"unknown STCConfig keys {unknown}; valid keys are ['cacher', 'pruner']")
        cacher = data.get("cacher", CacherConfig().to_dict())
        pruner = data.get("pruner", PrunerConfig().to_dict())
        return cls(
            cacher=None if cacher is None else CacherConfig.from_dict(cacher),
            pruner=None if pruner is None else PrunerConfig.from_dict(pruner),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cacher": None if self.cacher is None else self.cacher.to_dict(),
            "pruner": None if self.pruner is None else self.pruner.to_dict(),
        }


__all__ = ["CacherConfig", "PrunerConfig", "STCConfig"]
