"""ViT encode benchmark: STC-Cacher variants against the unpatched tower, side by side in one run.

    streamtc bench vit --preset siglip-so400m-384 --num-layers 4 --frames 16

Frames of real footage are streamed one per chunk through one model, every variant (each with its
own cacher and stream state) taking frame i before any takes frame i + 1, so each variant frame is
timed next to a full frame and machine drift cancels in the paired ratio. Numbers are medians over
repeats (and frames) after a warm-up; an unpatched "control" variant shows the noise floor. Beside
every time ratio the benchmark prints the FLOP model's ratio (the limit to approach) and the
fidelity: per-frame cosine of the final hidden states to the full forward (mean over tokens of
the token cosine).

    streamtc bench vit --tower qwen2-vl --num-layers 4 --frames 32

With --tower (qwen2-vl, qwen2.5-vl, qwen3-vl) the tower is a Qwen-VL vision tower at its
checkpoint's width and the unit of reuse is a temporal patch: frames are taken at 2 fps, two per
tower forward (see `qwen_towers`); every "frame" of the report is then one temporal patch.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cacher import STCCacher
from ..cacher import functional as F
from ..config import CacherConfig
from ..errors import InputError
from ..preprocess import FramePreprocessor
from ..presets import build_model
from ..sources import Frame, PyAVSource, open_source
from . import qwen_towers
from .timing import machine_info, timed


@dataclass(frozen=True)
class Variant:
    """A named cacher setting; config None is the unpatched tower."""

    name: str
    config: CacherConfig | None


DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant("full", None),
    Variant("full (control)", None),
    # Every frame a refresh: the exact layers through the cacher's CPU kernels (kernels.py), so the
    # kernel choice's own effect on a full frame shows, apart from STC's.
    Variant("full, cacher kernels (N=1)", CacherConfig(cache_interval=1)),
    Variant("stc N=2 r=0.25", CacherConfig(cache_interval=2, update_ratio=0.25)),
    Variant("stc N=2 r=0.25, torch kernels", CacherConfig(cache_interval=2, update_ratio=0.25, cpu_kernels="torch")),
    Variant("stc N=4 r=0.25", CacherConfig(cache_interval=4, update_ratio=0.25)),
    Variant("shared N=2 r=0.25", CacherConfig(cache_interval=2, update_ratio=0.25, selection="shared")),
    Variant("compiled N=2 r=0.25", CacherConfig(cache_interval=2, update_ratio=0.25, compile_mode="default")),
    Variant("adaptive N=8 budget 2 r=0.25", CacherConfig(cache_interval=8, update_ratio=0.25, refresh="adaptive",
                                                         refresh_threshold=0.92, refresh_budget=2)),
)

# The Qwen towers' variants (a temporal patch at checkpoint width is several seconds on a 2-core
# CPU, so the paper's settings, the kernel-neutral row and the adaptive row; no compiled path:
# the windowed blocks split attention on the host).
QWEN_VARIANTS: tuple[Variant, ...] = tuple(
    v for v in DEFAULT_VARIANTS
    if v.name in ("full", "full (control)", "full, cacher kernels (N=1)", "stc N=2 r=0.25", "stc N=4 r=0.25")
    or v.config is not None and v.config.refresh == "adaptive"
)


@dataclass
class VariantResult:
    name: str
    config: dict[str, Any] | None
    frame_ms: list[list[float]] = field(default_factory=list)  # [repeat][frame]
    refresh_frames: list[bool] = field(default_factory=list)
    token_cosine: list[float] = field(default_factory=list)  # per frame, mean over tokens
    flat_cosine: list[float] = field(default_factory=list)  # per frame, whole frame as one vector


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the cosine between matching tokens; a, b [F, T, C] -> [F]."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean(dim=-1)


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between whole frames flattened to vectors; a, b [F, T, C] -> [F]."""
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)


def sample_clip(video: str, count: int) -> list[Frame]:
    """`count` frames spread evenly over a video file ('demo': the built-in street clip)."""
    source = open_source(video, fps=1.0)
    if not isinstance(source, PyAVSource) or source.duration is None:
        raise InputError(f"{video}: the benchmarks need a video file of known duration")
    return list(open_source(video, fps=count / source.duration, max_frames=count))


def load_benchmark_frames(video: str, count: int, image_size: int) -> torch.Tensor:
    """`count` frames spread evenly over a video file ('demo': the built-in street clip) as pixel values."""
    return FramePreprocessor(size=image_size)(np.stack([f.image for f in sample_clip(video, count)]))


def load_qwen_frames(video: str, tower: str, count: int, image_size: int = 448, fps: float = 2.0) -> torch.Tensor:
    """`count` frames of a video at `fps` as `tower`'s pixel values [F, 3, S, S]; a clip shorter than
    count / fps plays on backwards from its end (no cut is added), and so on."""
    frames = [f.image for f in open_source(video, fps=fps)]
    if not frames:
        raise InputError(f"{video}: no frames")
    loop = frames + frames[-2:0:-1] if len(frames) > 1 else frames
    mean, std = qwen_towers.normalisation(tower)
    chosen = np.stack([loop[i % len(loop)] for i in range(count)])
    return FramePreprocessor(size=image_size, image_mean=mean, image_std=std)(chosen)


def run_vit_benchmark(
    pixel_values: torch.Tensor,
    preset: str = "siglip-so400m-384",
    num_layers: int | None = 4,
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS,
    repeats: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tower: str | None = None,
) -> dict[str, Any]:
    """Stream `pixel_values` [F, 3, H, W] frame by frame through every variant at once; the report dict.

    Interleaved per frame: frame i of the stream goes through the unpatched tower and each
    variant's cacher (each with its own stream state, attached in turn to the one model) before
    frame i + 1, in an order rotated every frame. Each variant frame is timed against the full
    frame encoded moments before or after it, so machine drift (other tenants, memory bandwidth,
    clocks) cancels in the paired ratios instead of landing on whichever variant ran during it.

    tower: a Qwen-VL tower name instead of `preset`; `pixel_values` then holds pairs of frames, each
    pair one temporal patch and one tower forward.
    """
    if variants[0].config is not None:
        raise ValueError("the first variant must be the unpatched baseline (config None)")
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    if tower is None:
        model = build_model(preset, num_layers=num_layers, dtype=dtype).to(device)
        inputs = list(pixel_values)

        def encode(frame: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=frame[None]).last_hidden_state
    else:
        model = qwen_towers.build_qwen_tower(tower, num_layers, dtype).to(device)
        inputs, grid_thw = qwen_towers.temporal_patches(pixel_values, model.config)

        def encode(patch: torch.Tensor) -> torch.Tensor:
            return model(patch, grid_thw=grid_thw).last_hidden_state[None]
    results = {v.name: VariantResult(v.name, None if v.config is None else v.config.to_dict()) for v in variants}
    cachers = {v.name: STCCacher(v.config) for v in variants if v.config is not None}
    baseline = variants[0].name
    with torch.inference_mode():
        reference = torch.cat([encode(x) for x in inputs])
        for repeat in range(warmup + repeats):
            for cacher in cachers.values():
                cacher.reset()
            ms = {v.name: [] for v in variants}
            outputs = {v.name: [] for v in variants}
            refreshed = {v.name: [] for v in variants}
            for i, frame in enumerate(inputs):
                shift = i % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    cacher = cachers.get(variant.name)
                    if cacher is not None:
                        cacher.attach(model)
                    before = cacher.stats.refresh_chunks if cacher else 0
                    out, elapsed = timed(lambda: encode(frame), device)
                    if cacher is not None:
                        cacher.detach()
                    ms[variant.name].append(elapsed)
                    outputs[variant.name].append(out)
                    refreshed[variant.name].append(cacher is None or cacher.stats.refresh_chunks > before)
            if repeat < warmup:
                continue
            for variant in variants:
                result = results[variant.name]
                result.frame_ms.append(ms[variant.name])
                result.refresh_frames = refreshed[variant.name]
                got = torch.cat(outputs[variant.name])
                result.token_cosine = token_cosine(got, reference).tolist()
                result.flat_cosine = flat_cosine(got, reference).tolist()
    config = model.config
    tokens = reference.shape[1]
    frame_flops = None if tower is None else functools.partial(qwen_towers.tower_flops, config, tokens)
    return {
        "benchmark": "vit",
        "preset": preset if tower is None else tower,
        "unit": "frame" if tower is None else "temporal patch (2 frames)",
        "num_layers": config.num_hidden_layers if tower is None else config.depth,
        "frames": len(inputs),
        "image_size": int(pixel_values.shape[-1]),
        "tokens_per_frame": tokens,
        "repeats": repeats,
        "warmup": warmup,
        "dtype": str(dtype).removeprefix("torch."),
        "machine": machine_info(device),
        "variants": [summarise(results[v.name], results[baseline], tokens, config, frame_flops) for v in variants],
    }


def summarise(
    result: VariantResult, full: VariantResult, tokens: int, config: Any, frame_flops: Any = None
) -> dict[str, Any]:
    """Paired ratios against the unpatched run (medians over repeats and frames), the FLOP model, fidelity.

    frame_flops: recomputed tokens (None: all) -> FLOPs of one frame; default the pre-LN layer model.
    """
    totals = [sum(run) for run in result.frame_ms]
    time_ratios = [sum(run) / sum(base) for run, base in zip(result.frame_ms, full.frame_ms)]
    paired = [
        (ms / base_ms, is_refresh)
        for run, base in zip(result.frame_ms, full.frame_ms)
        for ms, base_ms, is_refresh in zip(run, base, result.refresh_frames)
    ]
    refresh = [ratio for ratio, is_refresh in paired if is_refresh]
    selective = [ratio for ratio, is_refresh in paired if not is_refresh]
    if frame_flops is None:
        frame_flops = functools.partial(F.layer_flops, tokens, config.hidden_size, config.intermediate_size)
    n_refresh = sum(result.refresh_frames)
    if result.config is None:
        flop = 1.0
    else:
        k = F.num_recomputed_tokens(tokens, result.config["update_ratio"])
        full_flops, selective_flops = frame_flops(None), frame_flops(k)
        n = len(result.refresh_frames)
        flop = (n_refresh * full_flops + (n - n_refresh) * selective_flops) / (n * full_flops)
    return {
        "name": result.name,
        "config": result.config,
        "total_ms": statistics.median(totals),
        "time_ratio": statistics.median(time_ratios),
        "time_ratio_per_repeat": time_ratios,
        "flop_ratio": flop,
        "refresh_frames": n_refresh,
        "refresh_frame_ratio": statistics.median(refresh) if refresh else math.nan,
        "selective_frame_ratio": statistics.median(selective) if selective else math.nan,
        "token_cosine_mean": statistics.fmean(result.token_cosine),
        "token_cosine_min": min(result.token_cosine),
        "flat_cosine_mean": statistics.fmean(result.flat_cosine),
        "flat_cosine_min": min(result.flat_cosine),
        "per_frame_ms": [statistics.median(run[i] for run in result.frame_ms) for i in range(len(result.refresh_frames))],
        "per_frame_token_cosine": result.token_cosine,
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=(
        f"ViT encode, {report['preset']} ({report['num_layers']} layers, {report['tokens_per_frame']} tokens), "
        f"{report['frames']} {report.get('unit', 'frame')}s, one per chunk, interleaved per frame, median of {report['repeats']}"
    ))
    for column in ("variant", "total ms", "time ratio", "FLOP ratio", "refresh frame", "non-refresh frame",
                   "cos mean", "cos min"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for v in report["variants"]:
        table.add_row(
            v["name"], f"{v['total_ms']:.0f}", f"{v['time_ratio']:.3f}", f"{v['flop_ratio']:.3f}",
            f"{v['refresh_frame_ratio']:.3f}", f"{v['selective_frame_ratio']:.3f}",
            f"{v['token_cosine_mean']:.4f}", f"{v['token_cosine_min']:.4f}",
        )
    console = Console()
    console.print(table)
    m = report["machine"]
    console.print(f"{m['cpu']} · {m['torch_threads']} threads · torch {m['torch']} · transformers "
                  f"{m['transformers']} · {m['date']}; ratios are medians of paired ratios to the full frame "
                  "encoded alongside; 'full (control)' is the unpatched tower again: its distance from 1 "
                  "is the measurement's noise")


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


__all__ = ["Variant", "DEFAULT_VARIANTS", "QWEN_VARIANTS", "load_benchmark_frames", "load_qwen_frames", "run_vit_benchmark", "print_report", "write_report", "token_cosine",
           "flat_cosine"]
