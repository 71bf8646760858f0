"""Built-in model presets: randomly initialised configs of real architectures, built locally.

No weights can be downloaded for tests or the default demo, so every preset here is a config that
mirrors a public checkpoint's architecture (sizes taken from the checkpoint's public config.json),
instantiated with a fixed seed. Real weights go through `load_pretrained(path_or_id)`, which is
plain `from_pretrained` on the matching transformers class.

Presets:
    siglip-so400m-384   SigLIP-so400m/14 at 384 px as in LLaVA-OneVision (26 of its 27 layers)
    siglip-b16-224      SigLIP-B/16 at 224 px (google/siglip-base-patch16-224)
    clip-l14-336        CLIP-L/14 at 336 px (openai/clip-vit-large-patch14-336)
    tiny-siglip         2-layer, 64-wide SigLIP for tests
    tiny-clip           2-layer, 64-wide CLIP for tests
    llava-ov-0.5b       LLaVA-OneVision-0.5B (llava-hf/llava-onevision-qwen2-0.5b-ov-hf)
    llava-ov-7b         LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf)
    tiny-llava-ov       tiny LLaVA-OneVision (tiny SigLIP + 2-layer Qwen2) for tests and the demo
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from .errors import ConfigError, UnsupportedModelError
from .tokenizer import BPE_VOCAB_SIZE

# Model dtypes by the names the CLIs and saved configs use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Qwen2 token ids of LLaVA-OneVision's <image> and <video> placeholders (llava-hf configs).
LLAVA_OV_IMAGE_TOKEN_ID = 151646
LLAVA_OV_VIDEO_TOKEN_ID = 151647

# The tiny preset fits the built-in tokenizer unpadded (`streamtc.tokenizer`): 1024 BPE tokens, then
# <|endoftext|> <|im_start|> <|im_end|> <image> <video> at 1024..1028, so 1029 vocabulary rows.
TINY_IMAGE_TOKEN_ID = BPE_VOCAB_SIZE + 3
TINY_VIDEO_TOKEN_ID = BPE_VOCAB_SIZE + 4


def _siglip_so400m_384(num_layers: int | None) -> SiglipVisionConfig:
    # LLaVA-OneVision drops the last of so400m's 27 layers and has no pooling head.
    return SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=num_layers or 26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def _siglip_b16_224(num_layers: int | None) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=num_layers or 12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )


def _clip_l14_336(num_layers: int | None) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=num_layers or 24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _tiny_siglip(num_layers: int | None) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers or 2,
        num_attention_heads=4,
        image_size=56,
        patch_size=8,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def _tiny_clip(num_layers: int | None) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers or 2,
        num_attention_heads=4,
        image_size=56,
        patch_size=8,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _qwen2_0_5b() -> Qwen2Config:
    # llava-hf pads Qwen2-0.5B's 151,936-token vocabulary (+<image>, <video>) to a multiple of 64.
    return Qwen2Config(
        vocab_size=152000,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        hidden_act="silu",
    )


def _qwen2_7b() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=152128,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def _tiny_qwen2() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=TINY_VIDEO_TOKEN_ID + 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        hidden_act="silu",
    )


def _llava_onevision(
    vision: SiglipVisionConfig,
    text: Qwen2Config,
    image_token_id: int = LLAVA_OV_IMAGE_TOKEN_ID,
    video_token_id: int = LLAVA_OV_VIDEO_TOKEN_ID,
) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        multimodal_projector_bias=True,
        tie_word_embeddings=text.tie_word_embeddings,
    )


@dataclass(frozen=True)
class Preset:
    """A named architecture: how to build its config and which model class runs it."""

    name: str
    description: str
    model_class: type[PreTrainedModel]
    build_config: Callable[[int | None], PretrainedConfig]
    tiny: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("siglip-so400m-384", "SigLIP-so400m/14-384 tower of LLaVA-OneVision (26 layers, 729 tokens)",
               SiglipVisionModel, _siglip_so400m_384),
        Preset("siglip-b16-224", "SigLIP-B/16-224 (12 layers, 196 tokens)", SiglipVisionModel, _siglip_b16_224),
        Preset("clip-l14-336", "CLIP-L/14-336 (24 layers, 577 tokens)", CLIPVisionModel, _clip_l14_336),
        Preset("tiny-siglip", "2-layer 64-wide SigLIP, 49 tokens (tests)", SiglipVisionModel, _tiny_siglip, tiny=True),
        Preset("tiny-clip", "2-layer 64-wide CLIP, 50 tokens (tests)", CLIPVisionModel, _tiny_clip, tiny=True),
        Preset("llava-ov-0.5b", "LLaVA-OneVision-0.5B: SigLIP-so400m + Qwen2-0.5B",
               LlavaOnevisionForConditionalGeneration,
               lambda n: _llava_onevision(_siglip_so400m_384(n), _qwen2_0_5b())),
        Preset("llava-ov-7b", "LLaVA-OneVision-7B: SigLIP-so400m + Qwen2-7B",
               LlavaOnevisionForConditionalGeneration,
               lambda n: _llava_onevision(_siglip_so400m_384(n), _qwen2_7b())),
        Preset("tiny-llava-ov", "tiny LLaVA-OneVision: tiny SigLIP + 2-layer Qwen2 (tests, demo)",
               LlavaOnevisionForConditionalGeneration,
               lambda n: _llava_onevision(_tiny_siglip(n), _tiny_qwen2(), TINY_IMAGE_TOKEN_ID, TINY_VIDEO_TOKEN_ID),
               tiny=True),
    ]
}


def get_preset(name: str) -> Preset:
    """Return the preset called `name`, or raise a ConfigError that lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}") from None


def _check_depth(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


def build_config(name: str, num_layers: int | None = None, text_layers: int | None = None) -> PretrainedConfig:
    """The preset's transformers config; `num_layers` overrides the vision tower's depth and
    `text_layers` the language model's (VLM presets only)."""
    _check_depth("num_layers", num_layers)
    _check_depth("text_layers", text_layers)
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
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    text_layers: int | None = None,
) -> PreTrainedModel:
    """Instantiate a preset with random weights drawn from a fixed seed, in eval mode.

    The same (name, num_layers, text_layers, seed) always gives the same weights, on any machine.
    """
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


_CLASS_BY_MODEL_TYPE: dict[str, type[PreTrainedModel]] = {
    "siglip_vision_model": SiglipVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}


def load_pretrained(
    path_or_id: str | Path,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
    **kwargs,
) -> PreTrainedModel:
    """Load real weights with `from_pretrained`, choosing the class from the saved config.

    Works on a local directory written by `save_pretrained` or on a hub id (where the machine can
    reach the hub). Raises UnsupportedModelError for architectures streamtc has no adapter for.
    """
    config = AutoConfig.from_pretrained(path_or_id)
    model_class = _CLASS_BY_MODEL_TYPE.get(config.model_type)
    if model_class is None:
        raise UnsupportedModelError(
            f"{path_or_id}: model_type {config.model_type!r} is not supported; "
            f"supported: {', '.join(sorted(_CLASS_BY_MODEL_TYPE))}"
        )
    model = model_class.from_pretrained(path_or_id, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return model.eval()


__all__ = ["DTYPES", "Preset", "PRESETS", "get_preset", "build_config", "build_model", "load_pretrained"]
