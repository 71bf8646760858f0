"""The preset table: randomly initialised configs of real architectures (see `streamtc.presets`).

Each builder mirrors a public checkpoint's config.json; transformers is imported when a config is
built, so the table itself imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from transformers import (
        CLIPVisionConfig,
        LlavaOnevisionConfig,
        PretrainedConfig,
        PreTrainedModel,
        Qwen2_5_VLConfig,
        Qwen2Config,
        Qwen2VLConfig,
        Qwen3VLConfig,
        SiglipVisionConfig,
    )

    from ..hosts.qwen_preprocess import QwenVLPreprocessor

# Qwen2 token ids of LLaVA-OneVision's <image> and <video> placeholders (llava-hf configs).
LLAVA_OV_IMAGE_TOKEN_ID = 151646
LLAVA_OV_VIDEO_TOKEN_ID = 151647


def _tiny_llava_token_ids() -> tuple[int, int]:
    """<image>, <video> ids of the tiny preset, which fits the built-in tokenizer unpadded
    (`streamtc.presets.tokenizer`): 1024 BPE tokens, then <|endoftext|> <|im_start|> <|im_end|> <image>
    <video> at 1024..1028, so 1029 vocabulary rows."""
    from .tokenizer import BPE_VOCAB_SIZE

    return BPE_VOCAB_SIZE + 3, BPE_VOCAB_SIZE + 4


def _siglip_so400m_384(num_layers: int | None) -> SiglipVisionConfig:
    from transformers import SiglipVisionConfig

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
    from transformers import SiglipVisionConfig

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
    from transformers import CLIPVisionConfig

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
    from transformers import SiglipVisionConfig

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
    from transformers import CLIPVisionConfig

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
    from transformers import Qwen2Config

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
    from transformers import Qwen2Config

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
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=_tiny_llava_token_ids()[1] + 1,
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


# Qwen2 / Qwen2-VL special token ids (<|endoftext|> = 151643, then <|im_start|>, ..., <|video_pad|>).
QWEN_VL_FIRST_SPECIAL_ID = 151643
# Frames of the tiny Qwen-VL presets stay small: a 60x80 frame becomes 56x84 (2x3 merged tokens).
TINY_QWEN_VL_PIXELS = (56 * 56, 112 * 112)
MROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}


def _tiny_qwen_vl_first_special_id() -> int:
    """The tiny Qwen-VL presets put the Qwen-VL special tokens right after the built-in BPE."""
    from .tokenizer import BPE_VOCAB_SIZE

    return BPE_VOCAB_SIZE


def _qwen_vl_ids(first_special: int) -> dict[str, int]:
    """image/video/vision_start/vision_end token ids for Qwen-VL special tokens starting at first_special."""
    from .tokenizer import QWEN_VL_SPECIAL_TOKENS

    index = {name: first_special + i for i, name in enumerate(QWEN_VL_SPECIAL_TOKENS)}
    return {"image_token_id": index["<|image_pad|>"], "video_token_id": index["<|video_pad|>"],
            "vision_start_token_id": index["<|vision_start|>"], "vision_end_token_id": index["<|vision_end|>"]}


def _qwen_text(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
               max_positions: int, rope: dict[str, Any] = MROPE) -> dict[str, Any]:
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "rope_parameters": dict(rope), "bos_token_id": 151643, "eos_token_id": 151645}


def _qwen2_vl(num_layers: int | None, text: dict[str, Any], tie: bool, vision: dict[str, Any] | None = None,
              first_special: int = QWEN_VL_FIRST_SPECIAL_ID) -> Qwen2VLConfig:
    from transformers import Qwen2VLConfig

    tower = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_act": "quick_gelu",
             "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, **(vision or {})}
    tower["depth"] = num_layers or tower["depth"]
    tower["hidden_size"] = text["hidden_size"]  # the merger's output width
    return Qwen2VLConfig(text_config=text, vision_config=tower, tie_word_embeddings=tie,
                         **_qwen_vl_ids(first_special))


def _qwen2_5_vl(num_layers: int | None, text: dict[str, Any], tie: bool, vision: dict[str, Any] | None = None,
                first_special: int = QWEN_VL_FIRST_SPECIAL_ID) -> Qwen2_5_VLConfig:
    from transformers import Qwen2_5_VLConfig

    tower = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
             "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
             "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, **(vision or {})}
    depth = tower["depth"] = num_layers or tower["depth"]
    tower["fullatt_block_indexes"] = [i for i in tower["fullatt_block_indexes"] if i < depth] or [depth - 1]
    tower["out_hidden_size"] = text["hidden_size"]
    return Qwen2_5_VLConfig(text_config=text, vision_config=tower, tie_word_embeddings=tie,
                            **_qwen_vl_ids(first_special))


def _tiny_qwen_text() -> dict[str, Any]:
    # head_dim 16: M-RoPE sections (2, 3, 3) cover its 8 rotary frequencies as (16, 24, 24) cover 64
    from .tokenizer import QWEN_VL_SPECIAL_TOKENS

    first = _tiny_qwen_vl_first_special_id()
    text = _qwen_text(64, 128, 2, 4, 2, first + len(QWEN_VL_SPECIAL_TOKENS), 32768,
                      {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    return {**text, "bos_token_id": first, "eos_token_id": first + 2}  # <|endoftext|>, <|im_end|>


_TINY_QWEN2_VL_TOWER = {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 4}
_TINY_QWEN2_5_VL_TOWER = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "window_size": 56,
                          "fullatt_block_indexes": [1, 3]}


def _tiny_qwen2_vl(num_layers: int | None) -> Qwen2VLConfig:
    return _qwen2_vl(num_layers, _tiny_qwen_text(), True, _TINY_QWEN2_VL_TOWER, _tiny_qwen_vl_first_special_id())


def _tiny_qwen2_5_vl(num_layers: int | None) -> Qwen2_5_VLConfig:
    return _qwen2_5_vl(num_layers, _tiny_qwen_text(), True, _TINY_QWEN2_5_VL_TOWER, _tiny_qwen_vl_first_special_id())


def _tiny_qwen_vl_preprocessor() -> QwenVLPreprocessor:
    from ..hosts.qwen_preprocess import QwenVLPreprocessor

    return QwenVLPreprocessor(min_pixels=TINY_QWEN_VL_PIXELS[0], max_pixels=TINY_QWEN_VL_PIXELS[1])


# Qwen3-VL: vision towers of the public checkpoints and the Qwen3 LLM's M-RoPE.
QWEN3_VL_MROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                  "mrope_interleaved": True}
_QWEN3_VL_TOWER_SMALL = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                         "deepstack_visual_indexes": [5, 11, 17]}  # 2B and 4B
_QWEN3_VL_TOWER_8B = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                      "deepstack_visual_indexes": [8, 16, 24]}
_TINY_QWEN3_VL_TOWER = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                        "num_position_embeddings": 64, "deepstack_visual_indexes": [1, 2, 3]}
# Frames of the tiny Qwen3-VL preset: a 60x80 frame becomes 96x128 (3x4 merged tokens).
TINY_QWEN3_VL_PIXELS = (96 * 96, 128 * 128)


def _qwen3_text(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    return {**_qwen_text(hidden, intermediate, layers, heads, 8, 151936, 262144, QWEN3_VL_MROPE), "head_dim": 128}


def _qwen3_vl(num_layers: int | None, text: dict[str, Any], tie: bool, vision: dict[str, Any],
              first_special: int = QWEN_VL_FIRST_SPECIAL_ID) -> Qwen3VLConfig:
    from transformers import Qwen3VLConfig

    tower = {"hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
             "num_position_embeddings": 2304, **vision}
    depth = tower["depth"] = num_layers or tower["depth"]
    tower["deepstack_visual_indexes"] = [i for i in tower["deepstack_visual_indexes"] if i < depth]
    tower["out_hidden_size"] = text["hidden_size"]
    return Qwen3VLConfig(text_config={**text, "tie_word_embeddings": tie}, vision_config=tower,
                         tie_word_embeddings=tie, **_qwen_vl_ids(first_special))


def _tiny_qwen3_vl(num_layers: int | None) -> Qwen3VLConfig:
    # head_dim 16: interleaved sections (4, 2, 2) cover its 8 rotary frequencies as (24, 20, 20) cover 64
    text = {**_tiny_qwen_text(), "num_hidden_layers": 3, "head_dim": 16,
            "rope_parameters": {**QWEN3_VL_MROPE, "mrope_section": [4, 2, 2]}}
    return _qwen3_vl(num_layers, text, True, _TINY_QWEN3_VL_TOWER, _tiny_qwen_vl_first_special_id())


def _tiny_qwen3_vl_preprocessor() -> QwenVLPreprocessor:
    from ..hosts.qwen_preprocess import QWEN3_VL_MEAN, QWEN3_VL_STD, QwenVLPreprocessor

    return QwenVLPreprocessor(min_pixels=TINY_QWEN3_VL_PIXELS[0], max_pixels=TINY_QWEN3_VL_PIXELS[1], patch_size=16,
                              image_mean=QWEN3_VL_MEAN, image_std=QWEN3_VL_STD, upscale_small_frames=True)


def _llava_onevision(
    vision: SiglipVisionConfig,
    text: Qwen2Config,
    image_token_id: int = LLAVA_OV_IMAGE_TOKEN_ID,
    video_token_id: int = LLAVA_OV_VIDEO_TOKEN_ID,
) -> LlavaOnevisionConfig:
    from transformers import LlavaOnevisionConfig

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
    """A named architecture: how to build its config and which model class runs it.

    model_class_name: the transformers class, imported when `model_class` is first read.
    """

    name: str
    description: str
    model_class_name: str
    build_config: Callable[[int | None], PretrainedConfig]
    tiny: bool = False
    protocol: str | None = None  # the host's prompt protocol (None: the host's default)
    preprocessor: Callable[[], Any] | None = None  # frame preprocessing (None: the host's default)

    @property
    def model_class(self) -> type[PreTrainedModel]:
        import transformers

        return getattr(transformers, self.model_class_name)

    @property
    def is_video_llm(self) -> bool:
        """A VideoLLM (vision tower, projector, language model), not a vision tower alone."""
        return self.model_class_name.endswith("ForConditionalGeneration")

    def parameter_count(self) -> int:
        """Parameters of the full-depth architecture (counted on the meta device, nothing allocated)."""
        import torch

        with torch.device("meta"):
            model = self.model_class._from_config(self.build_config(None))
        return sum(p.numel() for p in model.parameters())


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("siglip-so400m-384", "SigLIP-so400m/14-384 tower of LLaVA-OneVision (26 layers, 729 tokens)",
               "SiglipVisionModel", _siglip_so400m_384),
        Preset("siglip-b16-224", "SigLIP-B/16-224 (12 layers, 196 tokens)", "SiglipVisionModel", _siglip_b16_224),
        Preset("clip-l14-336", "CLIP-L/14-336 (24 layers, 577 tokens)", "CLIPVisionModel", _clip_l14_336),
        Preset("tiny-siglip", "2-layer 64-wide SigLIP, 49 tokens (tests)", "SiglipVisionModel", _tiny_siglip, tiny=True),
        Preset("tiny-clip", "2-layer 64-wide CLIP, 50 tokens (tests)", "CLIPVisionModel", _tiny_clip, tiny=True),
        Preset("llava-ov-0.5b", "LLaVA-OneVision-0.5B: SigLIP-so400m + Qwen2-0.5B",
               "LlavaOnevisionForConditionalGeneration",
               lambda n: _llava_onevision(_siglip_so400m_384(n), _qwen2_0_5b())),
        Preset("llava-ov-7b", "LLaVA-OneVision-7B: SigLIP-so400m + Qwen2-7B",
               "LlavaOnevisionForConditionalGeneration",
               lambda n: _llava_onevision(_siglip_so400m_384(n), _qwen2_7b())),
        Preset("tiny-llava-ov", "tiny LLaVA-OneVision: tiny SigLIP + 2-layer Qwen2 (tests, demo)",
               "LlavaOnevisionForConditionalGeneration",
               lambda n: _llava_onevision(_tiny_siglip(n), _tiny_qwen2(), *_tiny_llava_token_ids()),
               tiny=True),
        Preset("qwen2-vl-2b", "Qwen2-VL-2B-Instruct: 32-block ViT (1280 wide) + Qwen2-1.5B LLM",
               "Qwen2VLForConditionalGeneration",
               lambda n: _qwen2_vl(n, _qwen_text(1536, 8960, 28, 12, 2, 151936, 32768), tie=True)),
        Preset("qwen2-vl-7b", "Qwen2-VL-7B-Instruct: 32-block ViT (1280 wide) + Qwen2-7B LLM",
               "Qwen2VLForConditionalGeneration",
               lambda n: _qwen2_vl(n, _qwen_text(3584, 18944, 28, 28, 4, 152064, 32768), tie=False)),
        Preset("livecc-7b", "LiveCC-7B: Qwen2-VL-7B, LiveCC protocol (2 fps, 1-s turns 'Time=t0-t1s', 384x28x28 px)",
               "Qwen2VLForConditionalGeneration",
               lambda n: _qwen2_vl(n, _qwen_text(3584, 18944, 28, 28, 4, 152064, 32768), tie=False),
               protocol="livecc"),
        Preset("qwen2.5-vl-3b", "Qwen2.5-VL-3B-Instruct: 32-block windowed ViT + Qwen2.5-3B LLM",
               "Qwen2_5_VLForConditionalGeneration",
               lambda n: _qwen2_5_vl(n, _qwen_text(2048, 11008, 36, 16, 2, 151936, 128000), tie=True)),
        Preset("qwen2.5-vl-7b", "Qwen2.5-VL-7B-Instruct: 32-block windowed ViT + Qwen2.5-7B LLM",
               "Qwen2_5_VLForConditionalGeneration",
               lambda n: _qwen2_5_vl(n, _qwen_text(3584, 18944, 28, 28, 4, 152064, 128000), tie=False)),
        Preset("qwen2-vl-tiny", "tiny Qwen2-VL: 2-block 32-wide ViT + 2-layer 64-wide LLM (tests)",
               "Qwen2VLForConditionalGeneration",
               _tiny_qwen2_vl,
               tiny=True, preprocessor=_tiny_qwen_vl_preprocessor),
        Preset("qwen2.5-vl-tiny", "tiny Qwen2.5-VL: 4-block windowed 32-wide ViT + 2-layer LLM (tests)",
               "Qwen2_5_VLForConditionalGeneration",
               _tiny_qwen2_5_vl,
               tiny=True, preprocessor=_tiny_qwen_vl_preprocessor),
        Preset("livecc-tiny", "qwen2-vl-tiny with LiveCC's protocol (tests)",
               "Qwen2VLForConditionalGeneration",
               _tiny_qwen2_vl,
               tiny=True, protocol="livecc", preprocessor=_tiny_qwen_vl_preprocessor),
        Preset("qwen3-vl-2b", "Qwen3-VL-2B-Instruct: 24-block ViT (1024 wide, DeepStack 5/11/17) + Qwen3-1.7B LLM",
               "Qwen3VLForConditionalGeneration",
               lambda n: _qwen3_vl(n, _qwen3_text(2048, 6144, 28, 16), True, _QWEN3_VL_TOWER_SMALL)),
        Preset("qwen3-vl-4b", "Qwen3-VL-4B-Instruct: 24-block ViT (1024 wide, DeepStack 5/11/17) + Qwen3-4B LLM",
               "Qwen3VLForConditionalGeneration",
               lambda n: _qwen3_vl(n, _qwen3_text(2560, 9728, 36, 32), True, _QWEN3_VL_TOWER_SMALL)),
        Preset("qwen3-vl-8b", "Qwen3-VL-8B-Instruct: 27-block ViT (1152 wide, DeepStack 8/16/24) + Qwen3-8B LLM",
               "Qwen3VLForConditionalGeneration",
               lambda n: _qwen3_vl(n, _qwen3_text(4096, 12288, 36, 32), False, _QWEN3_VL_TOWER_8B)),
        Preset("qwen3-vl-tiny", "tiny Qwen3-VL: 4-block 32-wide ViT (3 DeepStack taps) + 3-layer 64-wide LLM (tests)",
               "Qwen3VLForConditionalGeneration",
               _tiny_qwen3_vl,
               tiny=True, preprocessor=_tiny_qwen3_vl_preprocessor),
    ]
}


def get_preset(name: str) -> Preset:
    """Return the preset called `name`, or raise a ConfigError that lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}") from None


__all__ = ["PRESETS", "Preset", "get_preset"]
