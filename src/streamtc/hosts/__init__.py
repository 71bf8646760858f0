"""Host models: one module per VideoLLM family behind one small interface (`base.VideoHost`).

    host = host_for(model, tokenizer)              # the host class is chosen by the model's class
    host_class_for(Qwen2VLForConditionalGeneration)  # -> QwenVLHost

Supported: LLaVA-OneVision (`llava_onevision`), Qwen2-VL and Qwen2.5-VL, LiveCC included
(`qwen_vl`), Qwen3-VL with DeepStack (`qwen3_vl`). A new family is one module with a `VideoHost`
subclass added to `HOST_CLASSES`.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from ..errors import UnsupportedModelError
from .base import Deepstack, EncodedChunk, HostStream, Placed, RecomputedTokens, VideoEncoder, VideoHost
from .llava_onevision import LlavaOnevisionHost
from .qwen3_vl import Qwen3VLHost
from .qwen_vl import QwenVLHost

HOST_CLASSES: tuple[type[VideoHost], ...] = (LlavaOnevisionHost, QwenVLHost, Qwen3VLHost)


def supported_model_classes() -> list[str]:
    """Names of the transformers classes a host runs."""
    return [cls.__name__ for host in HOST_CLASSES for cls in host.model_classes]


def host_class_for(model_class: type) -> type[VideoHost]:
    """The host class running `model_class`; UnsupportedModelError naming the supported classes."""
    for host in HOST_CLASSES:
        if issubclass(model_class, host.model_classes):
            return host
    raise UnsupportedModelError(
        f"{model_class.__name__} is not a supported VideoLLM; supported: {', '.join(supported_model_classes())}"
    )


def cacher_supports(model_class: type) -> bool:
    """Whether STC-Cacher can attach to the vision tower of `model_class` (decided by class)."""
    from ..cacher.towers import SUPPORTED_TOWERS

    return issubclass(host_class_for(model_class).tower_class(model_class), SUPPORTED_TOWERS)


def host_for(model: PreTrainedModel, tokenizer: Any, protocol: str | None = None, **options: Any) -> VideoHost:
    """A host for `model` (its class picks the family), its tokenizer and prompt protocol."""
    return host_class_for(type(model))(model, tokenizer, protocol, **options)


__all__ = [
    "Deepstack", "EncodedChunk", "HOST_CLASSES", "HostStream", "LlavaOnevisionHost", "Placed", "Qwen3VLHost",
    "QwenVLHost", "RecomputedTokens", "VideoEncoder",
    "VideoHost", "cacher_supports", "host_class_for", "host_for", "supported_model_classes",
]
