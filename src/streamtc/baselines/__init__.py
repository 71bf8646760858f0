"""Comparison baselines for STC-Pruner (the rows of the published table, docs/algorithms.md, section 5).

Token selectors share STC-Pruner's interface, `prune(features [F, P, D]) -> KeptTokens` and
`reset()`: UniformPruner, RandomPruner, VidCom2Pruner, and VisionZipPruner (which also takes the
ViT attention each token receives: `prune(features, attention)`, or `attach(model)` to record it).
ToMe works inside the ViT instead: `ToMe(...).apply(vision_tower)` / `.remove()`, and
`tome_video_features` is the LLaVA-OneVision video path for its unpooled tokens; on Qwen-VL hosts,
whose towers cannot merge tokens, `ToMeTokenMerger` runs ToMe's matching on the merged LLM tokens.
"""

from .simple import RandomPruner, UniformPruner
from .tome import ToMe, ToMeTokenMerger, tome_schedule, tome_video_features
from .vidcom2 import VidCom2Pruner
from .visionzip import VisionZipPruner, attention_received, pool_scores

__all__ = [
    "UniformPruner",
    "RandomPruner",
    "VisionZipPruner",
    "attention_received",
    "pool_scores",
    "VidCom2Pruner",
    "ToMe",
    "ToMeTokenMerger",
    "tome_schedule",
    "tome_video_features",
]
