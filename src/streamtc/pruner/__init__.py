"""STC-Pruner (docs/algorithms.md, section 3): keep each frame's novel visual tokens between projector and LLM.

`functional` holds the pure scoring functions, `pruner` the per-stream wrapper, `layouts` the
mapping between kept per-frame indices and positions in a model's visual sequence.
"""

from . import functional
from .functional import KeptTokens
from .layouts import FlatLayout, LlavaOnevisionVideoLayout, LlavaVideoLayout, QwenVLLayout, TokenLayout
from .pruner import Budget, PrunerState, STCPruner, TokenSelector

__all__ = [
    "functional",
    "KeptTokens",
    "Budget",
    "PrunerState",
    "STCPruner",
    "TokenSelector",
    "FlatLayout",
    "LlavaOnevisionVideoLayout",
    "LlavaVideoLayout",
    "QwenVLLayout",
    "TokenLayout",
]
