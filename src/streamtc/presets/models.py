"""Models from the preset table or from real weights, with what a session needs beside them.

`build_model(name)` draws a preset's random weights from a seed; `load_pretrained(path_or_id)` is
plain `from_pretrained` on the transformers class the saved config names. `load_preset` and
`load_checkpoint` add the tokenizer (a checkpoint's with its processor's chat template) and the
frame preprocessing, which is all `StreamingSession.from_preset` / `from_pretrained` need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checks import positive_int
from ..errors import ConfigError, UnsupportedModelError
from .table import get_preset

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

# Model dtypes by the names the CLIs and saved configs use (`torch_dtype` gives the torch dtype).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` (one of DTYPE_NAMES); a ConfigError naming them otherwise."""
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    import torch

    return getattr(torch, name)


def build_config(name: str, num_layers: int | None = None, text_layers: int | None = None) -> PretrainedConfig:
    """The preset's transformers config; `num_layers` overrides the vision tower's depth and
    `text_layers` the language model's (VLM presets only)."""
    positive_int(num_layers, "num_layers", optional=True)
    positive_int(text_layers, "text_layers", optional=True)
    config = get_preset(name).build_config(num_layers)
    if text_layers is not None:
        text = getattr(config, "text_config", None)
        if text is None:
            raise ConfigError(f"preset {name!r} has no language model; text_layers applies to VLM presets")
        text.num_hidden_layers = text_layers
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = text.layer_types[:text_layers]
    return config


def build_model(
    name: str,
    num_layers: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    text_layers: int | None = None,
) -> PreTrainedModel:
    """Instantiate a preset with random weights drawn from a fixed seed, in eval mode (dtype None:
    float32).

    The same (name, num_layers, text_layers, seed) always gives the same weights, on any machine.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    preset = get_preset(name)
    config = build_config(name, num_layers, text_layers)
    config._attn_implementation = attn_implementation
    for sub in ("vision_config", "text_config"):
        if hasattr(config, sub):
            getattr(config, sub)._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG as it was
        torch.manual_seed(seed)
        model = preset.model_class._from_config(config, dtype=dtype)
    return model.eval()


# The transformers class (by name) of each supported checkpoint model_type.
_CLASS_BY_MODEL_TYPE: dict[str, str] = {
    "siglip_vision_model": "SiglipVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


def pretrained_model_class(path_or_id: str | Path) -> type[PreTrainedModel]:
    """The transformers class of a checkpoint, from its saved config's model_type."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path_or_id)
    class_name = _CLASS_BY_MODEL_TYPE.get(config.model_type)
    if class_name is None:
        raise UnsupportedModelError(
            f"{path_or_id}: model_type {config.model_type!r} is not supported; "
            f"supported: {', '.join(sorted(_CLASS_BY_MODEL_TYPE))}"
        )
    return getattr(transformers, class_name)


def load_pretrained(
    path_or_id: str | Path,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    **kwargs,
) -> PreTrainedModel:
    """Load real weights with `from_pretrained`, choosing the class from the saved config (dtype
    None: float32).

    Works on a local directory written by `save_pretrained` or on a hub id (where the machine can
    reach the hub). Raises UnsupportedModelError for architectures streamtc has no adapter for.
    """
    import torch

    model_class = pretrained_model_class(path_or_id)
    dtype = torch.float32 if dtype is None else dtype
    model = model_class.from_pretrained(path_or_id, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return model.eval()


def load_chat_template(path_or_id: str | Path) -> str | None:
    """The processor's chat template saved with a checkpoint (chat_template.jinja/.json), if any."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        resolved = cached_file(
            str(path_or_id), name, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if resolved:
            text = Path(resolved).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def load_tokenizer(path_or_id: str | Path) -> Any:
    """A checkpoint's tokenizer with its processor's chat template (chat_template.jinja/.json beside
    the weights; the tokenizer's own template only when there is none): a text-only LLM template
    would not place the video."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    tokenizer.chat_template = load_chat_template(path_or_id) or tokenizer.chat_template
    return tokenizer


def load_checkpoint(path_or_id: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    attn_implementation: str = "sdpa", protocol: str | None = None) -> tuple[PreTrainedModel, Any, Any]:
    """(model on `device`, tokenizer with the chat template, frame preprocessor) of real weights.
    Frames are preprocessed as the checkpoint's processor config says (preprocessor_config.json;
    Qwen-VL: video_preprocessor_config.json when present), for the prompt `protocol`."""
    from ..hosts import host_class_for

    model = load_pretrained(path_or_id, dtype=dtype, attn_implementation=attn_implementation).to(device)
    preprocessor = host_class_for(type(model)).preprocessor_from_pretrained(path_or_id, protocol)
    return model, load_tokenizer(path_or_id), preprocessor


def load_preset(name: str, *, num_layers: int | None = None, text_layers: int | None = None, seed: int = 0,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, Any, dict[str, Any]]:
    """(model on `device`, built-in tokenizer, the preset's session settings: its prompt `protocol`
    and `preprocessor` where it sets them) of a VideoLLM preset with random weights."""
    from ..hosts import host_class_for
    from .tokenizer import tokenizer_for_config

    preset = get_preset(name)
    try:
        host_class_for(preset.model_class)
    except UnsupportedModelError:
        raise ConfigError(f"preset {name!r} is a {preset.model_class.__name__}, not a VideoLLM") from None
    model = build_model(name, num_layers=num_layers, seed=seed, dtype=dtype, attn_implementation=attn_implementation,
                        text_layers=text_layers).to(device)
    settings: dict[str, Any] = {}
    if preset.protocol is not None:
        settings["protocol"] = preset.protocol
    if preset.preprocessor is not None:
        settings["preprocessor"] = preset.preprocessor()
    return model, tokenizer_for_config(model.config), settings


__all__ = ["DTYPE_NAMES", "build_config", "build_model", "load_chat_template", "load_checkpoint", "load_pretrained",
           "load_preset", "load_tokenizer", "pretrained_model_class", "torch_dtype"]
