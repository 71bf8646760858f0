"""Built-in model presets: randomly initialised configs of real architectures, built locally.

No weights can be downloaded for tests or the default demo, so every preset here is a config that
mirrors a public checkpoint's architecture (sizes taken from the checkpoint's public config.json),
instantiated with a fixed seed (`table.py`). Real weights go through `load_pretrained(path_or_id)`,
which is plain `from_pretrained` on the matching transformers class, and `load_checkpoint` adds the
checkpoint's tokenizer, chat template and frame preprocessing (`models.py`).

The table itself is light: torch, transformers and the model classes are imported when a config or
a model is built, so that naming or listing presets (`streamtc run --preset NAME` checks the name
before anything else) costs no import.

Presets:
    siglip-so400m-384   SigLIP-so400m/14 at 384 px as in LLaVA-OneVision (26 of its 27 layers)
    siglip-b16-224      SigLIP-B/16 at 224 px (google/siglip-base-patch16-224)
    clip-l14-336        CLIP-L/14 at 336 px (openai/clip-vit-large-patch14-336)
    tiny-siglip         2-layer, 64-wide SigLIP for tests
    tiny-clip           2-layer, 64-wide CLIP for tests
    llava-ov-0.5b       LLaVA-OneVision-0.5B (llava-hf/llava-onevision-qwen2-0.5b-ov-hf)
    llava-ov-7b         LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf)
    tiny-llava-ov       tiny LLaVA-OneVision (tiny SigLIP + 2-layer Qwen2) for tests and the demo
    qwen2-vl-2b         Qwen2-VL-2B-Instruct (Qwen/Qwen2-VL-2B-Instruct)
    qwen2-vl-7b         Qwen2-VL-7B-Instruct (Qwen/Qwen2-VL-7B-Instruct)
    livecc-7b           LiveCC-7B (chenjoya/LiveCC-7B-Instruct: a Qwen2-VL-7B), LiveCC's prompt protocol
    qwen2.5-vl-3b       Qwen2.5-VL-3B-Instruct (Qwen/Qwen2.5-VL-3B-Instruct)
    qwen2.5-vl-7b       Qwen2.5-VL-7B-Instruct (Qwen/Qwen2.5-VL-7B-Instruct)
    qwen2-vl-tiny       tiny Qwen2-VL (2-layer tower, 2-layer LLM) for tests
    qwen2.5-vl-tiny     tiny Qwen2.5-VL (4-layer windowed tower, 2-layer LLM) for tests
    livecc-tiny         qwen2-vl-tiny with LiveCC's prompt protocol
    qwen3-vl-2b         Qwen3-VL-2B-Instruct (Qwen/Qwen3-VL-2B-Instruct)
    qwen3-vl-4b         Qwen3-VL-4B-Instruct (Qwen/Qwen3-VL-4B-Instruct)
    qwen3-vl-8b         Qwen3-VL-8B-Instruct (Qwen/Qwen3-VL-8B-Instruct)
    qwen3-vl-tiny       tiny Qwen3-VL (4-block tower with 3 DeepStack taps, 3-layer LLM) for tests

The Qwen-VL presets mirror the checkpoints' config.json: Qwen2-VL towers are 32 blocks of width
1280 (16 heads, MLP ratio 4, QuickGELU, LayerNorm) with a merger to the LLM width; Qwen2.5-VL towers
are 32 blocks of width 1280 (RMSNorm, gated SiLU MLP 3420, window attention of 112 px with full
attention in blocks 7, 15, 23, 31, 2 tokens per second); patch 14, merge 2x2, temporal patch 2;
M-RoPE sections (16, 24, 24), RoPE theta 1e6. A vision depth override keeps the full-attention
blocks that still exist (or makes the last block one).

Qwen3-VL (config.json of the Instruct checkpoints): patch 16, merge 2x2, temporal patch 2, a
learned 48x48 position grid (2304 entries), GELU-tanh MLPs; DeepStack mergers after vision blocks
5, 11, 17 (2B, 4B: 24 blocks of width 1024, MLP 4096) or 8, 16, 24 (8B: 27 blocks of width 1152,
MLP 4304); Qwen3 LLMs with head_dim 128, 8 KV heads, interleaved M-RoPE sections (24, 20, 20),
RoPE theta 5e6, 262,144 positions: 2B 2048 wide, MLP 6144, 28 layers, 16 heads, tied embeddings;
4B 2560, 9728, 36 layers, 32 heads, tied; 8B 4096, 12288, 36 layers, 32 heads, untied. A vision
depth override keeps the DeepStack taps that still exist.
"""

from .models import (
    DTYPE_NAMES, build_config, build_model, load_chat_template, load_checkpoint, load_pretrained, load_preset,
    load_tokenizer, pretrained_model_class, torch_dtype,
)
from .table import PRESETS, Preset, get_preset

__all__ = ["DTYPE_NAMES", "PRESETS", "Preset", "build_config", "build_model", "get_preset", "load_chat_template",
           "load_checkpoint", "load_pretrained", "load_preset", "load_tokenizer", "pretrained_model_class",
           "torch_dtype"]
