"""STC-Pruner (docs/algorithms.md, section 3): keep each frame's novel visual tokens between projector and LLM.

`functional` holds the pure scoring functions, `pruner` the per-stream wrapper. Where a frame's
tokens sit in a model's sequence is the host's business (`streamtc.hosts`).
"""

from . import functional
from .functional import KeptTokens
from .pruner import Budget, PrunerState, STCPruner, TokenSelector

__all__ = [
    "functional",
    "KeptTokens",
    "Budget",
    "PrunerState",
    "STCPruner",
    "TokenSelector",
]
