"""Pruning cost per frame of STC-Pruner's scorers and the token-selection baselines.

    streamtc bench pruner                            # LLaVA-OV-0.5B width: D = 896, 196 -> 59
    streamtc bench pruner --device cuda --frames 1,16 --json out.json
    streamtc bench pruner --threads 1                # steadier on a busy CPU

Each method prunes the same drifting random stream, one call of F frames at a time (F = 1 is
live streaming, F = 16 the paper's latency setting); a call's wall time (device synchronised) is
divided by F, and the number reported is the median over repeats after warm-up calls. ToMe is
not here: it works inside the ViT and is measured by the ViT benchmark.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..baselines import RandomPruner, UniformPruner, VidCom2Pruner, VisionZipPruner
from ..config import PrunerConfig
from ..pruner import KeptTokens, STCPruner
from .timing import timed

METHODS: dict[str, Callable[[int], object]] = {
    "stc gaussian": lambda k: STCPruner(PrunerConfig(scoring="gaussian", tokens_per_frame=k)),
    "stc dual_anchor": lambda k: STCPruner(PrunerConfig(scoring="dual_anchor", tokens_per_frame=k)),
    "stc dual_anchor W=16": lambda k: STCPruner(PrunerConfig(scoring="dual_anchor", tokens_per_frame=k, history=16)),
    "uniform": lambda k: UniformPruner(tokens_per_frame=k),
    "random": lambda k: RandomPruner(tokens_per_frame=k),
    "visionzip": lambda k: VisionZipPruner(tokens_per_frame=k),
    "vidcom2": lambda k: VidCom2Pruner(tokens_per_frame=k),
}


@dataclass(frozen=True)
class CostRow:
    """Median pruning time per frame of one method at one call size."""

    method: str
    frames_per_call: int
    ms_per_frame: float
    repeats: int


def measure_pruner_cost(
    frames_per_call: tuple[int, ...] = (1, 16),
    tokens: int = 196,
    width: int = 896,
    keep: int = 59,
    repeats: int = 30,
    warmup: int = 5,
    device: str = "cpu",
    seed: int = 0,
) -> list[CostRow]:
    """Time every method in METHODS on [F, tokens, width] features keeping `keep` tokens per frame."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(1, tokens, width, generator=generator).to(device)
    rows = []
    for frames in frames_per_call:
        attention = torch.rand(frames, tokens, generator=generator).to(device)
        for name, build in METHODS.items():
            selector = build(keep)
            run: Callable[[Tensor], KeptTokens] = selector.prune
            if isinstance(selector, VisionZipPruner):
                run = lambda x, s=selector: s.prune(x, attention)  # noqa: E731
            times = []
            for _ in range(warmup + repeats):
                # Frames near a shared base, like neighbouring video frames; made outside the clock.
                chunk = base + 0.3 * torch.randn(frames, tokens, width, generator=generator).to(device)
                times.append(timed(lambda: run(chunk), device)[1] / frames)
            rows.append(CostRow(name, frames, statistics.median(times[warmup:]), repeats))
    return rows


def format_table(rows: list[CostRow]) -> str:
    """Methods down, call sizes across, ms per frame in the cells."""
    sizes = sorted({r.frames_per_call for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    cell = {(r.method, r.frames_per_call): r.ms_per_frame for r in rows}
    header = f"{'method':<22}" + "".join(f"{f'F={f} ms/frame':>16}" for f in sizes)
    lines = [header, "-" * len(header)]
    lines += [f"{m:<22}" + "".join(f"{cell[(m, f)]:>16.3f}" for f in sizes) for m in methods]
    return "\n".join(lines)


__all__ = ["METHODS", "CostRow", "format_table", "measure_pruner_cost"]
