"""STC-Cacher: reuse a reference frame's ViT features, recompute only the tokens that changed.

- `functional`: how tokens are chosen and recomputed (pure tensor functions);
- `state`: per-stream references and counters;
- `patch_vit`: the refresh and selective forwards of pre-LN q/k/v ViT layers (SigLIP, CLIP, ...);
- `patch_qwen_vl`: the same for Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision blocks;
- `towers`: the supported towers and layers, found by class;
- `hints`: codec side data per chunk on the tower's grid (`ChunkHints`);
- `budget`: how a refresh="budget" Cacher spends its FLOP budget (pure decisions);
- `downscale`: the whole frame encoded at a lower resolution, where a stale reference cannot serve and the budget cannot refresh;
- `cacher`: `STCCacher`, which attaches those forwards to a model and plans each chunk.
"""

from .cacher import STCCacher, attached_cacher
from .hints import ChunkHints
from .state import CacherState, CacherStats
from .towers import find_vision_tower

__all__ = ["STCCacher", "CacherState", "CacherStats", "ChunkHints", "attached_cacher", "find_vision_tower"]
