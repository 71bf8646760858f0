"""STC-Cacher: reuse a reference frame's ViT features, recompute only the tokens that changed.

- `functional`: how tokens are chosen and recomputed (pure tensor functions);
- `state`: per-stream references and counters;
- `patch_vit`: the refresh and selective forwards of pre-LN q/k/v ViT layers (SigLIP, CLIP, ...);
- `patch_qwen_vl`: the same for Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision blocks;
- `cacher`: `STCCacher`, which attaches those forwards to a model and plans each chunk.
"""

from .cacher import STCCacher, attached_cacher, find_vision_tower
from .state import CacherState, CacherStats

__all__ = ["STCCacher", "CacherState", "CacherStats", "attached_cacher", "find_vision_tower"]
