"""Build streaming sessions in one place: which model (real weights or a preset, its dtype and
depth), which variant (an STC setting or a baseline, `streamtc.variants`), which memory (every
token, a sliding window, or ReKV retrieval: `streamtc.memory`) and which system prompt become a
`StreamingSession`. `streamtc run`,
`bench pipeline`, `eval run` (in this process and on Ray actors) and `serve` all build here.

    spec = SessionSpec(preset="tiny-llava-ov", variant="stc", window_tokens=15000)
    session = spec.build("cpu")          # the model, running the variant
    base = spec.load("cpu")              # the model, uncompressed
    other = derive_session(base, get_variant("uniform 25%"), share_weights=True)

`derive_session` runs another variant on a loaded model. With `share_weights`, a variant that
changes the model's modules (the Cacher, ToMe, VisionZip) gets a shared-weights view of it, so that
several variants run side by side on one copy of the weights (`bench pipeline`, `serve`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import STCConfig
from .errors import ConfigError
from .presets import DTYPE_NAMES, get_preset, pretrained_model_class, torch_dtype
from .variants import Variant, get_variant

if TYPE_CHECKING:
    import torch

    from .hosts import VideoHost
    from .memory import CachePolicy
    from .session import StreamingSession


@dataclass(frozen=True)
class SessionSpec:
    """How to build a session; picklable, so Ray actors build the same one.

    model: real weights (a directory or hub id; LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL or Qwen3-VL, see
    `streamtc.hosts`); None uses `preset` (random weights drawn from `seed`; `num_layers` and
    `text_layers` override the vision tower's and the language model's depth). dtype: "float32",
    "bfloat16" or "float16". stc: an `STCConfig` (or its `to_dict()`), None for no STC; variant: a
    registered variant's name in its place (`streamtc.variants`). memory: the stream's LLM memory
    by name (`streamtc.memory.MEMORIES`: "full", "window", "retrieval"); None means "window" when
    `window_tokens` is given, else "full". window_tokens: the window of the window and retrieval
    memories (visual tokens; default 15,000 for retrieval); retrieve_frames, offload_dir,
    offload_budget: the retrieval memory's settings (`RetrievalCache`). system_prompt: the system
    turn (None: the session's default).
    """

    model: str | None = None
    preset: str = "tiny-llava-ov"
    num_layers: int | None = None
    text_layers: int | None = None
    seed: int = 0
    dtype: str = "float32"
    stc: STCConfig | dict[str, Any] | None = None
    variant: str | None = None
    window_tokens: int | None = None
    memory: str | None = None
    retrieve_frames: int = 64
    offload_dir: str | None = None
    offload_budget: int | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if isinstance(self.stc, dict):
            object.__setattr__(self, "stc", STCConfig.from_dict(self.stc))  # validates
        elif self.stc is not None and not isinstance(self.stc, STCConfig):
            raise ConfigError(f"stc must be an STCConfig, its dict or None, got {type(self.stc).__name__}")
        if self.variant is not None:
            get_variant(self.variant)  # validates
            if self.stc is not None:
                raise ConfigError(f"give either stc or variant, not both (variant {self.variant!r} sets its own)")
        if self.model is not None and (self.num_layers is not None or self.text_layers is not None):
            raise ConfigError("depth overrides apply to presets; real weights (model=...) run at their own depth")
        if self.memory is not None or self.window_tokens is not None:
            self.cache_policy()  # validates
        if self.memory == "streaming-vlm" and self.protocol() != "livecc":
            raise ConfigError(f"memory 'streaming-vlm' keeps per-chunk turns: it needs the 'livecc' prompt protocol "
                              f"(the livecc-tiny and livecc-7b presets); {self.model or self.preset} runs protocol "
                              f"{self.protocol()!r}: choose memory full, window or retrieval")

    @property
    def model_id(self) -> str:
        """The weights' path or hub id, or "preset:<name>" for a random-weight preset."""
        return self.model if self.model is not None else f"preset:{self.preset}"

    def identity(self) -> dict[str, Any]:
        """What determines the model's answers besides the variant (an eval results header's
        config; the variant is recorded beside it)."""
        memory = {"window_tokens": self.window_tokens}
        if self.memory is not None:
            memory.update(memory=self.memory, retrieve_frames=self.retrieve_frames)
        if self.offload_budget is not None:  # the budget deletes blocks a question could retrieve
            memory.update(offload_budget=self.offload_budget)
        if self.model is not None:
            return {"id": self.model, "dtype": self.dtype, **memory, "system_prompt": self.system_prompt}
        depth = {} if self.text_layers is None else {"text_layers": self.text_layers}
        return {"id": self.model_id, "num_layers": self.num_layers, **depth, "seed": self.seed, "dtype": self.dtype,
                **memory, "system_prompt": self.system_prompt}

    def cache_policy(self) -> Callable[[], CachePolicy] | None:
        """The cache-policy factory of this spec's memory, or None for the session's default
        (`FullCache`)."""
        if self.memory is None and self.window_tokens is None:
            return None
        from .memory import memory_policy

        kind = self.memory or "window"
        window = self.window_tokens if self.window_tokens is not None else 15_000
        return memory_policy(kind, window, self.retrieve_frames, self.offload_dir, self.offload_budget)

    def resolved_variant(self) -> Variant:
        """The variant this spec runs: the registered one named `variant`, else `stc` as a variant."""
        if self.variant is not None:
            return get_variant(self.variant)
        return Variant("STC" if self.stc is not None else "no STC", stc=self.stc)

    def model_class(self) -> type:
        """The transformers class of the model, without loading it (a checkpoint's config is read)."""
        return pretrained_model_class(self.model) if self.model is not None else get_preset(self.preset).model_class

    def host_class(self) -> type[VideoHost]:
        from .hosts import host_class_for

        return host_class_for(self.model_class())

    def protocol(self) -> str:
        """The prompt protocol the session will run: the preset's, else the host's default."""
        preset = get_preset(self.preset).protocol if self.model is None else None
        return preset or self.host_class().protocols[0]

    def protocol_fps(self) -> float | None:
        """The sampling rate the model's prompt protocol is built on (Qwen-VL and LiveCC: 2 fps, in
        their temporal positions and time turns), or None when the protocol has no rate of its own
        (LLaVA-OneVision: 1-D positions)."""
        host = self.host_class()
        return host.default_fps if host.fps_in_prompt else None

    def load(self, device: str | torch.device = "cpu", *, memory: bool = True) -> StreamingSession:
        """The model, uncompressed, as a session (its tokenizer, preprocessor and host come with it);
        memory=False gives it the default memory (a base for `derive_session`, which holds no
        offloaded blocks of its own)."""
        from .session import StreamingSession

        options = self._session_options(memory)
        if self.model is not None:
            return StreamingSession.from_pretrained(self.model, stc=None, device=device, dtype=torch_dtype(self.dtype),
                                                    **options)
        return StreamingSession.from_preset(self.preset, stc=None, num_layers=self.num_layers,
                                            text_layers=self.text_layers, seed=self.seed, device=device,
                                            dtype=torch_dtype(self.dtype), **options)

    def build(self, device: str | torch.device = "cpu") -> StreamingSession:
        """A session running this spec's variant on a freshly loaded model (the model is its own)."""
        return derive_session(self.load(device, memory=False), self.resolved_variant(),
                              cache_policy=self.cache_policy())

    def _session_options(self, memory: bool) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if memory and (policy := self.cache_policy()) is not None:
            options["cache_policy"] = policy
        if self.system_prompt is not None:
            options["system_prompt"] = self.system_prompt
        return options


def shared_weights_view(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s module tree whose parameters and buffers are `model`'s own tensors.

    A Cacher attached to the view (or ToMe, or VisionZip's hooks) changes only the view's
    modules; the weights stay one copy. `model` must carry no Cacher (its patched forwards would
    be copied too)."""
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def derive_session(
    base: StreamingSession,
    variant: Variant,
    *,
    share_weights: bool = False,
    cache_policy: Callable[[], CachePolicy] | None = None,
    prefill_min_tokens: int | None = None,
) -> StreamingSession:
    """A session running `variant` on `base`'s model, tokenizer, preprocessor, system prompt,
    chunk size and prompt protocol. `base` must be uncompressed. share_weights: keep `base`'s
    model as it is (a variant that changes modules gets a shared-weights view); without it the
    variant changes `base.model` for good, so the model must not serve anything else.
    cache_policy: the new session's memory (a `CachePolicy` factory; None: `FullCache`)."""
    from .hosts import host_for
    from .session import StreamingSession

    if base.stc is not None or base.selector is not None or base.encoder is not None:
        raise ConfigError("derive_session needs an uncompressed base session (stc=None, no baseline)")
    model = shared_weights_view(base.model) if share_weights and variant.patches_model else base.model
    host = base.host if model is base.model else host_for(model, base.tokenizer, base.host.protocol)
    policy = {} if cache_policy is None else {"cache_policy": cache_policy}
    return StreamingSession(model, base.tokenizer, preprocessor=base.preprocessor, system_prompt=base.system_prompt,
                            chunk_frames=base.chunk_frames, prefill_min_tokens=prefill_min_tokens, host=host,
                            **variant.session_options(host), **policy)


__all__ = ["SessionSpec", "derive_session", "shared_weights_view"]
