"""STC-Pruner behind vLLM's video-pruning contract (vLLM 0.33, `--video-pruning-rate q`).

vLLM prunes a request's video tokens in two steps, each a pure function of its arguments:

1. Before the model runs, the multimodal processor sizes the prompt's video placeholders with
   `compute_retained_tokens_count(tokens_per_frame, num_frames, q) -> int` (tokens_per_frame: merged
   tokens of one temporal patch, (H / m) * (W / m); num_frames: temporal patches T; q: the share
   pruned, 0 <= q < 1).
2. After the vision tower, the model keeps the rows of `compute_retention_mask(video_embeds,
   (T, H, W), spatial_merge_size, q) -> bool [T * H * W / m^2]` of the video's embeddings
   `video_embeds` [T * H * W / m^2, D] (one video, rows in temporal-patch then row-major order;
   (T, H, W) is its `video_grid_thw` row, a list of ints or a LongTensor). The mask must keep
   exactly the count of step 1, or the embeddings no longer fill the placeholders.

`STCVideoPruning` gives STC-Pruner (scoring "gaussian" or "dual_anchor") both signatures. Each call
is one request on its own: a fresh pruner state, the video's T temporal patches pruned in one call
(in order, so the temporal anchor is computed from the request's own earlier patches, nothing is
carried from other requests), the same k tokens kept in every temporal patch; the count is T * k.
k = round((1 - q) * P) (P = tokens_per_frame), raised to ceil(P / T) when that is more, so that a
video keeps at least one temporal patch's worth of tokens: vLLM's Qwen3-VL writes a pruned video's
placeholders as one block in its first patch and gives that block M-RoPE ids of whole patch grids,
and EVS's own count never goes below P either. The kept set is exactly what
`STCPruner(PrunerConfig(scoring, tokens_per_frame=k)).prune` keeps from the [T, P, D] frames.

M-RoPE. vLLM's Qwen2.5-VL and Qwen3-VL carry each kept token's (t, h, w) ids in extra embedding
channels: Qwen2.5-VL appends `compute_mrope_for_media(grid, m, tokens_per_second,
second_per_grid)[mask]` (t, h, w and the grid width, as if the video started at position 0),
Qwen3-VL the unpruned sequence's M-RoPE ids of the kept rows (its per-patch groups, the timestamps
and vision start/end tokens included) plus flags for vision-start and video rows. Before the
language model runs, `recompute_mrope_positions` strips those channels and rewrites the prompt's
positions: each kept token at its carried ids plus the position after the video's start token,
the text after the video continuing after the largest carried id. So a mask is all a pruning
method has to supply; `kept_mrope_positions` gives the ids vLLM carries for Qwen2.5-VL, which equal
`streamtc`'s own (`QwenVLLayout.mrope_positions`).

Qwen3-VL DeepStack. vLLM's Qwen3-VL hands the mask function the main merger's output with the
DeepStack levels concatenated as extra channels ([n, D * (1 + L)]), and the mask drops the same
rows of all of them. `score_channels=D` (the model's `vision_config.out_hidden_size`) scores on the
main output alone, as streamtc's own Qwen3-VL host does.

Registering. vLLM 0.33 has no registry of pruning methods: `--video-pruning-method` takes "evs" or
"vidcom2", and each model picks the functions of that name (`supported_video_pruning_methods`).
`install(pruning, method="evs")` puts STC in the place of one of them: it replaces the two
functions in vLLM's module of that method (so modules imported later bind STC's) and every
reference to the original functions in vLLM modules already imported (those that bound them
with `from ... import`); `uninstall()` restores them. Inside vLLM's processes the entry point
`streamtc.vllm:register` (group `vllm.general_plugins`, declared by a one-file plugin package on
the vLLM machine: docs/design.md) does it
when `STREAMTC_VLLM_PRUNER` is set:

    STREAMTC_VLLM_PRUNER=gaussian vllm serve Qwen/Qwen2.5-VL-7B-Instruct \\
        --video-pruning-rate 0.7 --video-pruning-method evs
    # Qwen3-VL: also STREAMTC_VLLM_SCORE_CHANNELS=<vision_config.out_hidden_size>

What was run: the functions, their counts and masks, and `install`/`uninstall` on stand-in modules
laid out as vLLM's, on CPU (tests/test_vllm.py). vLLM itself cannot be installed where streamtc is
developed (it pulls torchvision), so no vLLM server has run with it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .config import PrunerConfig
from .errors import ConfigError, InputError
from .hosts.qwen_vl import QwenVLLayout
from .pruner import Budget, STCPruner

# Where vLLM keeps each method's functions, newest layout first (module names only, never imported
# unless vLLM is installed).
METHOD_MODULES: dict[str, tuple[str, ...]] = {
    "evs": ("vllm.multimodal.video_prune.evs", "vllm.multimodal.evs"),
    "vidcom2": ("vllm.multimodal.video_prune.vidcom2",),
}
FUNCTION_NAMES = ("compute_retained_tokens_count", "compute_retention_mask")


def _check_rate(q: float) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= float(q) < 1.0:
        raise ConfigError(f"the video pruning rate q must lie in [0, 1), got {q!r}")
    return float(q)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class STCVideoPruning:
    """STC-Pruner as a vLLM video-pruning method (see the module docstring).

    scoring, alpha, history: as in `PrunerConfig`. score_channels: score on the first C channels
    of the embeddings only (Qwen3-VL in vLLM: the main merger output ahead of the DeepStack
    levels); None scores on all of them.
    """

    scoring: Literal["gaussian", "dual_anchor"] = "gaussian"
    alpha: float = 0.5
    history: int | None = None
    score_channels: int | None = None

    def __post_init__(self) -> None:
        PrunerConfig(scoring=self.scoring, alpha=self.alpha, history=self.history)  # validates them
        if self.score_channels is not None:
            _check_count("score_channels", self.score_channels)

    @staticmethod
    def tokens_per_patch(tokens_per_frame: int, num_frames: int, q: float) -> int:
        """k: round((1 - q) * P), at least ceil(P / T) and 1, at most P (see the module docstring)."""
        tokens, frames = _check_count("tokens_per_frame", tokens_per_frame), _check_count("num_frames", num_frames)
        share = Budget(keep_ratio=1.0 - _check_rate(q)).resolve(tokens)
        return min(tokens, max(share, -(-tokens // frames)))

    def pruner(self, tokens_per_patch: int) -> STCPruner:
        """A fresh pruner (a new request) keeping `tokens_per_patch` tokens of every temporal patch."""
        return STCPruner(PrunerConfig(scoring=self.scoring, tokens_per_frame=tokens_per_patch, alpha=self.alpha,
                                      history=self.history))

    def compute_retained_tokens_count(self, tokens_per_frame: int, num_frames: int, q: float) -> int:
        """Video tokens kept from num_frames temporal patches of tokens_per_frame tokens: T * k."""
        return num_frames * self.tokens_per_patch(tokens_per_frame, num_frames, q)

    def compute_retention_mask(self, video_embeds: Tensor, video_size_thw: Tensor | Sequence[int],
                               spatial_merge_size: int, q: float) -> Tensor:
        """bool [T * H * W / m^2] on the embeddings' device, True for the rows STC-Pruner keeps."""
        frames, tokens = self._frames(video_embeds, video_size_thw, spatial_merge_size)
        if self.score_channels is not None:
            if self.score_channels > frames.shape[-1]:
                raise InputError(f"score_channels {self.score_channels} exceeds the {frames.shape[-1]} channels")
            frames = frames[..., : self.score_channels]
        kept = self.pruner(self.tokens_per_patch(tokens, frames.shape[0], q)).prune(frames)
        mask = torch.zeros(frames.shape[0], tokens, dtype=torch.bool, device=video_embeds.device)
        return mask.scatter_(1, kept.indices, True).view(-1)

    @staticmethod
    def _frames(video_embeds: Tensor, video_size_thw: Tensor | Sequence[int], merge: int) -> tuple[Tensor, int]:
        """video_embeds [T * h * w, D] -> ([T, h * w, D], h * w), checked against the grid."""
        if video_embeds.ndim != 2:
            raise InputError(f"video_embeds must be [T * H * W / m^2, D], got shape {tuple(video_embeds.shape)}")
        grid = QwenVLLayout(tuple(int(v) for v in video_size_thw), _check_count("spatial_merge_size", merge))
        return grid.frame_tokens(video_embeds), grid.tokens_per_frame


def kept_mrope_positions(mask: Tensor, video_size_thw: Tensor | Sequence[int], spatial_merge_size: int,
                         time_interval: float = 1.0) -> Tensor:
    """[3, kept] (t, h, w) ids of the kept rows with the video at position 0, t = floor(patch *
    time_interval) (Qwen2.5-VL: tokens_per_second * seconds per temporal patch): the ids vLLM's
    Qwen2.5-VL carries for them."""
    grid = QwenVLLayout(tuple(int(v) for v in video_size_thw), spatial_merge_size)
    rows = mask.view(grid.grid_thw[0], grid.tokens_per_frame).cpu()
    counts = rows.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise InputError("kept_mrope_positions needs the same count kept in every temporal patch")
    indices = rows.nonzero()[:, 1].view(len(counts), -1)
    return grid.mrope_positions(indices, None, 0, time_interval)


# -- module-level functions with vLLM's signatures (default settings) ----------------------------

DEFAULT = STCVideoPruning()


def compute_retained_tokens_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    """`STCVideoPruning().compute_retained_tokens_count` (gaussian scoring)."""
    return DEFAULT.compute_retained_tokens_count(tokens_per_frame, num_frames, q)


def compute_retention_mask(video_embeds: Tensor, video_size_thw: Tensor | Sequence[int], spatial_merge_size: int,
                           q: float) -> Tensor:
    """`STCVideoPruning().compute_retention_mask` (gaussian scoring)."""
    return DEFAULT.compute_retention_mask(video_embeds, video_size_thw, spatial_merge_size, q)


# -- installing into vLLM -------------------------------------------------------------------------

_INSTALLED: list[tuple[Any, str, Any]] = []  # (module, attribute, original) of every replacement


def _method_module(method: str) -> Any:
    if method not in METHOD_MODULES:
        raise ConfigError(f"method must be one of {', '.join(METHOD_MODULES)} (the vLLM method STC takes the "
                          f"place of), got {method!r}")
    for name in METHOD_MODULES[method]:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if all(callable(getattr(module, f, None)) for f in FUNCTION_NAMES):
            return module
    raise ConfigError(f"no vLLM module of pruning method {method!r} found (looked for "
                      f"{', '.join(METHOD_MODULES[method])}); is vLLM >= 0.33 installed?")


def install(pruning: STCVideoPruning | None = None, method: str = "evs") -> list[str]:
    """Make vLLM's pruning method `method` run STC-Pruner (`pruning`, default settings if None);
    returns the "module.attribute" names replaced. Idempotent in effect: a second call first
    undoes the first."""
    uninstall()
    pruning = pruning or DEFAULT
    source = _method_module(method)
    replacement = {f: getattr(pruning, f) for f in FUNCTION_NAMES}
    originals = {id(getattr(source, f)): f for f in FUNCTION_NAMES}
    replaced = []
    for name, module in sorted(sys.modules.items()):
        if module is None or not (name == "vllm" or name.startswith("vllm.")):
            continue
        for attribute, value in list(vars(module).items()):
            function = originals.get(id(value))
            if function is not None:
                _INSTALLED.append((module, attribute, value))
                setattr(module, attribute, replacement[function])
                replaced.append(f"{name}.{attribute}")
    return replaced


def uninstall() -> None:
    """Put back every function `install` replaced."""
    while _INSTALLED:
        module, attribute, original = _INSTALLED.pop()
        setattr(module, attribute, original)


def register() -> None:
    """vLLM general plugin (entry point `streamtc.vllm:register`): `install` from the environment.

    STREAMTC_VLLM_PRUNER: "gaussian" or "dual_anchor" (unset: do nothing); STREAMTC_VLLM_METHOD:
    the vLLM method replaced (default "evs"); STREAMTC_VLLM_SCORE_CHANNELS: `score_channels`.
    """
    scoring = os.environ.get("STREAMTC_VLLM_PRUNER")
    if not scoring:
        return
    channels = os.environ.get("STREAMTC_VLLM_SCORE_CHANNELS")
    if channels is not None and not channels.isdigit():
        raise ConfigError(f"STREAMTC_VLLM_SCORE_CHANNELS must be a positive int, got {channels!r}")
    pruning = STCVideoPruning(scoring=scoring, score_channels=int(channels) if channels else None)
    install(pruning, os.environ.get("STREAMTC_VLLM_METHOD", "evs"))


__all__ = [
    "DEFAULT", "FUNCTION_NAMES", "METHOD_MODULES", "STCVideoPruning", "compute_retained_tokens_count",
    "compute_retention_mask", "install", "kept_mrope_positions", "register", "uninstall",
]
