"""Named compression variants: STC, its two halves, and the baselines it is compared with.

    variant = get_variant("pruner dual_anchor 30%")
    session = SessionSpec(preset="tiny-llava-ov", variant=variant.name).build()   # streamtc.factory

One registry serves `streamtc run --variant`, `streamtc eval run --variant` and `streamtc bench
pipeline --variants` (`streamtc variants` lists it). A variant is either an STC setting (Cacher
and/or Pruner, `STCConfig`), or a baseline that replaces the Pruner (a token selector: uniform,
random, VidCom2-style, VisionZip-style) or the video path (ToMe merges tokens inside the ViT),
keeping `keep_ratio` of the pooled tokens per frame, or nothing (the uncompressed model).

Some variants change the model they run on: the Cacher patches the vision tower, ToMe merges inside
it, VisionZip hooks its last attention, and `delay_ms` (the pipeline benchmark's check that it times
what runs) sleeps in it. `session_options(host)` applies those changes to the host's model for
good, so it is given a model private to the variant (`streamtc.factory.derive_session` makes a
shared-weights view when the model is shared).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .checks import unit_ratio
from .config import DEFAULT_KEEP_RATIO, CacherConfig, PrunerConfig, STCConfig
from .errors import ConfigError

if TYPE_CHECKING:
    from .hosts import VideoHost


# -- the baselines: one entry each ---------------------------------------------------------------


@dataclass(frozen=True)
class BaselineEntry:
    """One comparison method: what it is, and how it runs on a host.

    options: (host, keep_ratio) -> the session arguments running it (a `selector` or an `encoder`),
    applying any change of `host.model` for good. patches_model: whether it changes the model's
    modules. merges_on_llava_or_qwen2: it only runs on LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL hosts
    (on Qwen3-VL the DeepStack features would need merging too).
    """

    description: str
    options: Callable[[VideoHost, float], dict[str, Any]]
    patches_model: bool = False
    merges_on_llava_or_qwen2: bool = False


def _selector(class_name: str) -> Callable[[VideoHost, float], dict[str, Any]]:
    """Options of a baseline that is a plain token selector from `streamtc.baselines`."""

    def options(host: VideoHost, keep_ratio: float) -> dict[str, Any]:
        from . import baselines

        return {"selector": getattr(baselines, class_name)(keep_ratio=keep_ratio)}

    return options


def _visionzip_options(host: VideoHost, keep_ratio: float) -> dict[str, Any]:
    """VisionZip's selector, hooked into the tower's last attention (LLaVA-OneVision: at the pooled grid)."""
    from .baselines import VisionZipPruner

    selector = VisionZipPruner(keep_ratio=keep_ratio)
    return {"selector": selector.attach(host.model, pooled_size=getattr(host, "pooled_side", None))}


def _tome_options(host: VideoHost, keep_ratio: float) -> dict[str, Any]:
    """ToMe inside the ViT on LLaVA-OneVision (its tokens skip the pooling), on the merged tokens on Qwen-VL."""
    from .baselines import ToMe, ToMeTokenMerger, tome_video_features
    from .baselines.tome import min_keep_tokens

    pooled_side = getattr(host, "pooled_side", None)  # LLaVA-OneVision's pooled grid
    if pooled_side is None:
        return {"selector": ToMeTokenMerger(keep_ratio=keep_ratio)}
    config = host.vision_tower.config
    tokens, layers = (config.image_size // config.patch_size) ** 2, config.num_hidden_layers
    keep = max(1, round(keep_ratio * pooled_side**2))
    ToMe(keep_tokens=max(keep, min_keep_tokens(tokens, layers))).apply(host.vision_tower)
    return {"encoder": tome_video_features}


BASELINE_REGISTRY: dict[str, BaselineEntry] = {
    "uniform": BaselineEntry("evenly spaced tokens of each frame (the simplest selector)", _selector("UniformPruner")),
    "random": BaselineEntry("tokens drawn at random per frame (seeded per stream)", _selector("RandomPruner")),
    "vidcom2": BaselineEntry("VidCom2-style: frames that differ more from the video keep more tokens",
                             _selector("VidCom2Pruner")),
    "visionzip": BaselineEntry("VisionZip-style: the tokens the ViT's last attention looks at most, plus merged "
                               "context tokens", _visionzip_options, patches_model=True, merges_on_llava_or_qwen2=True),
    "tome": BaselineEntry("ToMe: tokens merged by similarity inside the ViT, layer by layer", _tome_options,
                          patches_model=True, merges_on_llava_or_qwen2=True),
}
BASELINES: tuple[str, ...] = tuple(BASELINE_REGISTRY)


# -- variants -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One compression setting of the streaming pipeline.

    stc: STC levels to enable (None: neither). baseline: a comparison method in place of the
    Pruner (uniform, random, vidcom2, visionzip) or of the video path (tome), keeping
    `keep_ratio` of the pooled tokens per frame. delay_ms: a sleep injected into every vision
    forward, the pipeline benchmark's own check that it times what runs. description: what the
    variant is, for people (`describe()` gives its exact settings).
    """

    name: str
    stc: STCConfig | None = None
    baseline: str | None = None
    keep_ratio: float = 0.25
    delay_ms: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ConfigError(f"unknown baseline {self.baseline!r}; choose from {', '.join(BASELINES)}")
        if self.baseline is not None and self.stc is not None:
            raise ConfigError(f"variant {self.name!r}: a baseline runs without STC")
        unit_ratio(self.keep_ratio, "keep_ratio")

    @property
    def uncompressed(self) -> bool:
        return self.stc is None and self.baseline is None

    @property
    def patches_model(self) -> bool:
        """Whether running it changes the model's modules (see the module docstring)."""
        cacher = self.stc is not None and self.stc.cacher is not None
        baseline = self.baseline is not None and BASELINE_REGISTRY[self.baseline].patches_model
        return cacher or baseline or self.delay_ms > 0

    def describe(self) -> str:
        """One line: the exact settings the variant runs."""
        if self.baseline is not None:
            return f"{self.baseline}, keeping {self.keep_ratio:.0%} of the pooled tokens"
        if self.stc is None:
            return "no compression" + (f", {self.delay_ms:g} ms sleep per vision forward" if self.delay_ms else "")
        parts = []
        if (c := self.stc.cacher) is not None:
            options = [c.selection, f"{c.refresh} refresh"]
            if c.granularity != "token":
                options.append(f"{c.granularity.replace('_', ' ')}s")
            if c.refresh == "adaptive":
                options.append(f"threshold {c.refresh_threshold}, budget {c.refresh_budget}")
            if c.compile_mode:
                options.append(f"compiled ({c.compile_mode})")
            parts.append(f"Cacher N={c.cache_interval} r={c.update_ratio} ({', '.join(options)})")
        if (pr := self.stc.pruner) is not None:
            budget = f"{pr.tokens_per_frame} tokens" if pr.tokens_per_frame else f"{pr.keep_ratio:.0%}"
            parts.append(f"Pruner {pr.scoring} {budget}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.describe(),
                "stc": None if self.stc is None else self.stc.to_dict(),
                "baseline": self.baseline, "keep_ratio": self.keep_ratio if self.baseline else None,
                "delay_ms": self.delay_ms}

    def unsupported_reason(self, host: VideoHost) -> str | None:
        """Why `host` cannot run this variant (None: it can). The Cacher needs a supported vision
        tower and options that tower supports (no compiled path for Qwen towers); ToMe and VisionZip
        run on LLaVA-OneVision (in and on its SigLIP tower) and on Qwen2-VL / Qwen2.5-VL (ToMe on the
        merged tokens, VisionZip from the tower's own attention), not on Qwen3-VL (its DeepStack
        features would need merging too)."""
        from .cacher.towers import check_attachable
        from .errors import UnsupportedModelError
        from .hosts import LlavaOnevisionHost, Qwen3VLHost, QwenVLHost

        if self.stc is not None and self.stc.cacher is not None:
            if not host.supports_cacher:
                return f"STC-Cacher does not support {type(host.vision_tower).__name__}"
            try:
                check_attachable(host.model, self.stc.cacher)
            except UnsupportedModelError as error:
                return str(error)
        if self.baseline is not None and BASELINE_REGISTRY[self.baseline].merges_on_llava_or_qwen2 and (
                not isinstance(host, (LlavaOnevisionHost, QwenVLHost)) or isinstance(host, Qwen3VLHost)):
            return f"{self.baseline} needs a LLaVA-OneVision, Qwen2-VL or Qwen2.5-VL host"
        return None

    def session_options(self, host: VideoHost) -> dict[str, Any]:
        """The `StreamingSession` arguments running this variant on `host.model` (`stc`, and a
        baseline's `selector` or `encoder`); ToMe, VisionZip and the injected sleep are applied to
        `host.model` here, for good (the Cacher is attached by the session). ConfigError when the
        host cannot run it."""
        reason = self.unsupported_reason(host)
        if reason is not None:
            raise ConfigError(f"variant {self.name!r}: {reason}")
        options: dict[str, Any] = {"stc": self.stc}
        if self.baseline is not None:
            options.update(BASELINE_REGISTRY[self.baseline].options(host, self.keep_ratio))
        if self.delay_ms > 0:
            delay = self.delay_ms / 1e3
            host.vision_tower.register_forward_hook(lambda module, args, output: time.sleep(delay))
        return options


def _cacher_only(interval: int, **options: Any) -> STCConfig:
    return STCConfig(cacher=CacherConfig(cache_interval=interval, update_ratio=0.25, **options), pruner=None)


def _pruner_only(scoring: str, ratio: float) -> STCConfig:
    return STCConfig(cacher=None, pruner=PrunerConfig(scoring=scoring, keep_ratio=ratio))


def _stc(**cacher_options: Any) -> STCConfig:
    return STCConfig(cacher=CacherConfig(cache_interval=2, update_ratio=0.25, **cacher_options),
                     pruner=PrunerConfig(keep_ratio=DEFAULT_KEEP_RATIO))


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("none", description="the uncompressed model (the reference every ratio refers to)"),
        Variant("cacher N=2", _cacher_only(2), description="STC-Cacher alone at the paper's interval: every other "
                "chunk refreshes fully, the others recompute a quarter of the tokens"),
        Variant("cacher N=4", _cacher_only(4), description="STC-Cacher alone, a full refresh every fourth chunk"),
        Variant("pruner gaussian 25%", _pruner_only("gaussian", 0.25),
                description="STC-Pruner alone with the released code's Gaussian scoring, 25% of the tokens"),
        Variant("pruner gaussian 30%", _pruner_only("gaussian", DEFAULT_KEEP_RATIO),
                description="STC-Pruner alone with the released code's Gaussian scoring, 30% of the tokens"),
        Variant("pruner dual_anchor 25%", _pruner_only("dual_anchor", 0.25),
                description="STC-Pruner alone with the paper's dual-anchor scoring, 25% of the tokens"),
        Variant("pruner dual_anchor 30%", _pruner_only("dual_anchor", DEFAULT_KEEP_RATIO),
                description="STC-Pruner alone with the paper's dual-anchor scoring, 30% of the tokens"),
        Variant("stc", _stc(), description="STC as the paper combines it (the default STCConfig)"),
        Variant("stc shared", _stc(selection="shared"),
                description="STC with one token selection shared by every ViT layer"),
        Variant("stc merge blocks", _stc(granularity="merge_block"),
                description="STC whose Cacher recomputes whole 2x2 merge blocks (Qwen-VL towers only)"),
        Variant("stc adaptive", STCConfig(
            cacher=CacherConfig(cache_interval=8, update_ratio=0.25, refresh="adaptive", refresh_signal="keys",
                                refresh_threshold=0.92, refresh_budget=2),
            pruner=PrunerConfig(keep_ratio=DEFAULT_KEEP_RATIO)),
            description="STC whose Cacher refreshes when the first layer's keys drift (at most as often as "
                        "N=2 would, at least every 8 chunks)"),
        Variant("stc compiled", _stc(compile_mode="default"),
                description="STC with the Cacher's patched forwards compiled by torch.compile"),
        *(Variant(f"{name} 25%", baseline=name, description=entry.description)
          for name, entry in BASELINE_REGISTRY.items()),
    ]
}


def get_variant(name: str) -> Variant:
    """The registered variant called `name`, or a ConfigError listing them."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown variant {name!r}; variants: {', '.join(VARIANTS)} "
                          "(`streamtc variants` describes them)") from None


__all__ = ["BASELINES", "BASELINE_REGISTRY", "VARIANTS", "BaselineEntry", "Variant", "get_variant"]
