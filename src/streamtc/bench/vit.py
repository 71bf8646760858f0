"""ViT encode benchmark: STC-Cacher variants against the unpatched tower, side by side in one run.

    streamtc bench vit --preset siglip-so400m-384 --num-layers 4 --frames 16   # random-init weights
    streamtc bench vit --weights dinov2-s --fps 0.5,1,2                        # real pretrained weights

Frames of real footage are streamed one per chunk through one model, every variant (each with its
own cacher and stream state) taking frame i before any takes frame i + 1, so each variant frame is
timed next to a full frame and machine drift cancels in the paired ratio. Numbers are medians over
repeats (and frames) after a warm-up; an unpatched "control" variant shows the noise floor. Beside
every time ratio the benchmark prints the FLOP model's ratio (the limit to approach) and the
fidelity: per-frame cosine of the final hidden states to the full forward (mean over patch tokens
of the token cosine; the class token's cosine separately).

With real weights (`--weights dinov2-s`: DINOv2-S/14 and its trained saliency head, see
`streamtc.weights`) frames are sampled at the given rates, the head's saliency maps from each
variant's features are compared with the full forward's (Pearson correlation and KL divergence per
frame), and two trivial baselines run at the FLOP cost of the Cacher settings: frame skipping and
uniform token dropping (`streamtc.baselines.vit`). A Cacher setting that loses to them at the same
cost has no reason to exist.

    streamtc bench vit --tower qwen2-vl --num-layers 4 --frames 32

With --tower (qwen2-vl, qwen2.5-vl, qwen3-vl) the tower is a Qwen-VL vision tower at its
checkpoint's width (random weights) and the unit of reuse is a temporal patch: frames are taken at
2 fps, two per tower forward (see `qwen_towers`); every "frame" of the report is then one temporal
patch.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..baselines.vit import CodecSkipping, FrameSkipping, UniformDownscaling, UniformTokenDropping, keep_ratio_for_flops
from ..cacher import STCCacher
from ..cacher import functional as F
from ..cacher.downscale import downscale_cost
from ..cacher.towers import encoder_layers, mlp_width, prefix_tokens
from ..cacher.hints import ChunkHints
from ..config import CacherConfig
from ..errors import InputError
from ..measure import environment, timed
from ..preprocess import FramePreprocessor
from ..presets import build_model
from ..sources import BUILTIN_CLIPS, Frame, PyAVSource, builtin_clip_path, open_source
from ..tokens import token_cosine
from . import qwen_towers


@dataclass(frozen=True)
class Variant:
    """A named cacher setting, or a baseline encoder; neither (config None) is the unpatched tower.

    baseline: a factory of a per-stream baseline encoder (`FrameSkipping`, `UniformTokenDropping`,
        `CodecSkipping`), called as encoder(tower, frame) -> last_hidden_state, or with hints=the
        frame's codec hints where the encoder has `uses_hints`.
    """

    name: str
    config: CacherConfig | None
    baseline: Callable[[], Any] | None = None
    hints: bool = True  # given the frames' codec hints where the run has them (False: as from a source without)


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
# Beside each fixed schedule, the same r selecting whole 2x2 merge blocks (granularity="merge_block"),
# and the robust profile (no codec hints here: the pixels decide, as for pushed frames).
QWEN_VARIANTS: tuple[Variant, ...] = tuple(
    v for v in DEFAULT_VARIANTS
    if v.name in ("full", "full (control)", "full, cacher kernels (N=1)", "stc N=2 r=0.25", "stc N=4 r=0.25")
    or v.config is not None and v.config.refresh == "adaptive"
) + tuple(
    Variant(f"stc N={n} r=0.25, merge blocks", CacherConfig(cache_interval=n, update_ratio=0.25, granularity="merge_block"))
    for n in (2, 4)
) + (Variant("robust (N=2 budget)", CacherConfig.robust(2)),)


def real_weights_variants(tokens: int, width: int, mlp_width: float, prefix: int) -> tuple[Variant, ...]:
    """The paper's schedules, the robust profile at their budgets, and the trivial baselines at their cost."""
    fixed2, fixed4 = (CacherConfig(cache_interval=n, update_ratio=0.25) for n in (2, 4))
    cost2, cost4 = (F.flop_ratio(tokens, width, mlp_width, 0.25, n) for n in (2, 4))
    keep2, keep4 = (keep_ratio_for_flops(cost, tokens, prefix, width, mlp_width) for cost in (cost2, cost4))
    return (
        Variant("full", None),
        Variant("full (control)", None),
        Variant("stc N=2 r=0.25", fixed2),
        Variant("stc N=4 r=0.25", fixed4),
        Variant("robust (N=2 budget)", CacherConfig.robust(2)),
        Variant("robust (N=4 budget)", CacherConfig.robust(4)),
        Variant("robust (N=2 budget), no hints", CacherConfig.robust(2), hints=False),
        Variant("robust (N=4 budget), no hints", CacherConfig.robust(4), hints=False),
        Variant("robust (N=2 budget), codec tokens", CacherConfig.robust(2, token_signal="codec")),
        Variant("robust (N=2 budget), codec+keys tokens", CacherConfig.robust(2, token_signal="codec+keys")),
        Variant("adaptive pixels budget 2, subsample over budget", CacherConfig(
            cache_interval=8, update_ratio=0.25, refresh="adaptive", refresh_budget=2, over_budget="subsample")),
        Variant(f"skip frames, rate {cost2:.3f} (= N=2)", None, functools.partial(FrameSkipping, cost2)),
        Variant("skip frames, every 2nd", None, functools.partial(FrameSkipping, 0.5)),
        Variant(f"skip frames, rate {cost4:.3f} (= N=4)", None, functools.partial(FrameSkipping, cost4)),
        Variant(f"drop tokens, keep {keep2:.2f} (= N=2)", None, functools.partial(UniformTokenDropping, keep2)),
        Variant(f"drop tokens, keep {keep4:.2f} (= N=4)", None, functools.partial(UniformTokenDropping, keep4)),
        Variant("codec skip, change > 0.25", None, functools.partial(CodecSkipping, 0.25)),
        Variant("codec skip, change > 0.5", None, functools.partial(CodecSkipping, 0.5)),
        *downscaling_variants(tokens, width, mlp_width, prefix, cost2),
    )


def downscaling_variants(tokens: int, width: int, mlp_width: float, prefix: int, most: float) -> tuple[Variant, ...]:
    """Every frame downscaled (`UniformDownscaling`), one row per square grid from 9/16 of the full
    side up to the largest costing at most `most` of a full frame: at the same cost, one grid can beat
    a larger one, so every grid below a policy's cost is a baseline for it."""
    side = math.isqrt(tokens - prefix)
    rows = []
    for small in range(math.ceil(side * 9 / 16), side):
        spend = downscale_cost((small, small), (side, side), prefix, width, mlp_width)
        if spend <= most:
            rows.append(Variant(f"downscale every frame, {small}x{small} ({spend:.2f})", None,
                                functools.partial(UniformDownscaling, spend)))
    return tuple(rows)


@dataclass
class VariantResult:
    name: str
    config: dict[str, Any] | None
    kind: str = "full"  # full, cacher, or the baseline's class name
    frame_ms: list[list[float]] = field(default_factory=list)  # [repeat][frame]
    refresh_frames: list[bool] = field(default_factory=list)
    token_cosine: list[float] = field(default_factory=list)  # per frame, mean over patch tokens
    flat_cosine: list[float] = field(default_factory=list)  # per frame, whole frame as one vector
    cls_cosine: list[float] = field(default_factory=list)  # per frame, class token (towers that have one)
    saliency_corr: list[float] = field(default_factory=list)  # per frame, with a saliency head
    saliency_kl: list[float] = field(default_factory=list)
    # per frame: R refresh (or a full frame), S subsampled, D downscaled, . reused; lower case: after a rejected reuse
    frame_kinds: str = ""
    flop_ratio: float | None = None  # cachers and baselines report their own cost


def saliency_agreement(maps: torch.Tensor, reference: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame: Pearson correlation of two saliency maps, and KL(reference || maps) of the maps as distributions."""
    a, b = maps.flatten(1).double(), reference.flatten(1).double()
    corr = torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1)
    p, q = b / b.sum(1, keepdim=True), a / a.sum(1, keepdim=True)
    kl = (p * ((p + eps) / (q + eps)).log()).sum(1)
    return corr.float(), kl.float()


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


def load_frames_at_rate(video: str, fps: float) -> np.ndarray:
    """Every frame of a video file ('demo', or a built-in clip name) sampled at `fps`, uint8 [F, H, W, 3]."""
    spec = str(builtin_clip_path(video)) if video in BUILTIN_CLIPS else video
    return np.stack([f.image for f in open_source(spec, fps=fps)])


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
    model: torch.nn.Module | None = None,
    head: torch.nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
    hints: Sequence[ChunkHints | None] | None = None,
) -> dict[str, Any]:
    """Stream `pixel_values` [F, 3, H, W] frame by frame through every variant at once; the report dict.

    model: a loaded tower (real weights) instead of the preset; head: a saliency head whose maps
    from each variant's features are compared with the full forward's. progress: called before
    each frame of each pass with a description ("repeat 2/3 · frame 5/16").

    Interleaved per frame: frame i of the stream goes through the unpatched tower and each
    variant's cacher (each with its own stream state, attached in turn to the one model) before
    frame i + 1, in an order rotated every frame. Each variant frame is timed against the full
    frame encoded moments before or after it, so machine drift (other tenants, memory bandwidth,
    clocks) cancels in the paired ratios instead of landing on whichever variant ran during it.

    tower: a Qwen-VL tower name instead of `preset` (`pixel_values` then pairs of frames, one temporal
    patch each). hints: per frame, the codec hints a session would hand the Cacher, given to every
    cacher (settings that do not use them ignore them) and to baselines that take them.
    """
    if variants[0].config is not None or variants[0].baseline is not None:
        raise ValueError("the first variant must be the unpatched baseline (no config, no baseline)")
    if tower is not None and (model is not None or head is not None or any(v.baseline for v in variants)):
        raise ValueError("tower= runs Cacher variants on a random-init Qwen tower: no model, head or baselines")
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    model, inputs, encode = _tower_inputs(pixel_values, preset, num_layers, tower, model, device, dtype)
    streams = _Streams(model, encode, {v.name: STCCacher(v.config) for v in variants if v.config is not None},
                       {v.name: v.baseline() for v in variants if v.baseline is not None}, hints, device)
    results = {v.name: VariantResult(v.name, None if v.config is None else v.config.to_dict(), streams.kind(v.name))
               for v in variants}
    prefix = 0 if tower is not None else prefix_tokens(model)
    with torch.inference_mode():
        reference = torch.cat([encode(x) for x in inputs])
        reference_maps = None if head is None else head(reference.float())
        for repeat in range(warmup + repeats):
            label = f"warm-up {repeat + 1}/{warmup}" if repeat < warmup else f"repeat {repeat - warmup + 1}/{repeats}"
            ms, outputs, kinds = streams.run_pass(variants, inputs, None if progress is None else (
                lambda i: progress(f"{label} · frame {i + 1}/{len(inputs)}")))
            if repeat < warmup:
                continue
            for variant in variants:
                result = results[variant.name]
                result.frame_ms.append(ms[variant.name])
                result.frame_kinds = "".join(kinds[variant.name])
                result.refresh_frames = [kind in "Rr" for kind in result.frame_kinds]
                _record_fidelity(result, torch.cat(outputs[variant.name]), reference, reference_maps, head, prefix)
                result.flop_ratio = streams.flop_ratio(variant.name)
    config, tokens = model.config, reference.shape[1]
    fixed = None if tower is None else qwen_towers.fixed_share(
        config, tuple(side // config.patch_size for side in pixel_values.shape[-2:]))
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
        "environment": environment(device, {
            "preset": preset, "tower": tower, "num_layers": num_layers, "frames": len(inputs), "repeats": repeats,
            "warmup": warmup, "dtype": str(dtype).removeprefix("torch."), "variants": [v.name for v in variants],
            "saliency_head": head is not None,
        }),
        "variants": [summarise(results[v.name], results[variants[0].name], fixed)
                     for v in variants],
    }


def _tower_inputs(pixel_values: torch.Tensor, preset: str, num_layers: int | None, tower: str | None,
                  model: torch.nn.Module | None, device: str, dtype: torch.dtype
                  ) -> tuple[torch.nn.Module, list[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """The tower, the stream's inputs (frames, or Qwen temporal patches) and how one is encoded
    into [1, T, C]."""
    if tower is None:
        model = (model if model is not None else build_model(preset, num_layers=num_layers, dtype=dtype)).to(
            device=device, dtype=dtype)
        return model, list(pixel_values), lambda frame: model(pixel_values=frame[None]).last_hidden_state
    model = qwen_towers.build_qwen_tower(tower, num_layers, dtype).to(device)
    inputs, grid_thw = qwen_towers.temporal_patches(pixel_values, model.config)
    return model, inputs, lambda patch: model(patch, grid_thw=grid_thw).last_hidden_state[None]


@dataclass
class _Streams:
    """Every variant's own stream on one tower: a cacher (attached for its frame) or a baseline encoder."""

    model: torch.nn.Module
    encode: Callable[[torch.Tensor], torch.Tensor]
    cachers: dict[str, STCCacher]
    encoders: dict[str, Any]
    hints: Sequence[ChunkHints | None] | None
    device: str

    def kind(self, name: str) -> str:
        """"cacher", the baseline's class name, or "full"."""
        return "cacher" if name in self.cachers else type(self.encoders[name]).__name__ if name in self.encoders else "full"

    def run_pass(self, variants: tuple[Variant, ...], inputs: list[torch.Tensor],
                 progress: Callable[[int], None] | None) -> tuple[dict, dict, dict]:
        """One pass over the stream, every variant taking frame i (in an order rotated per frame)
        before any takes frame i + 1; per variant: ms, outputs and frame kinds per frame."""
        for stream in (*self.cachers.values(), *self.encoders.values()):
            stream.reset()
        ms, outputs, kinds = ({v.name: [] for v in variants} for _ in range(3))
        for i, frame in enumerate(inputs):
            if progress is not None:
                progress(i)
            shift = i % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                hint = None if self.hints is None or not variant.hints else self.hints[i]
                out, elapsed, kind = self.encode_frame(variant.name, frame, hint)
                ms[variant.name].append(elapsed)
                outputs[variant.name].append(out)
                kinds[variant.name].append(kind)
        return ms, outputs, kinds

    def encode_frame(self, name: str, frame: torch.Tensor, hint: ChunkHints | None) -> tuple[torch.Tensor, float, str]:
        """One variant's frame: its output, milliseconds, and kind (R refresh or a full frame, S
        subsampled, D downscaled, . reused; in lower case when the reuse check rejected a reuse of the
        frame first: its time includes that pass, so the per-kind time medians leave it out)."""
        cacher, encoder = self.cachers.get(name), self.encoders.get(name)
        if encoder is not None:
            computes = not isinstance(encoder, FrameSkipping) or encoder.encodes_next()
            extra = {"hints": hint} if getattr(encoder, "uses_hints", False) else {}
            out, elapsed = timed(lambda: encoder(self.model, frame[None], **extra), self.device)
            return out, elapsed, "D" if isinstance(encoder, UniformDownscaling) else "R" if computes else "."
        if cacher is None:
            out, elapsed = timed(lambda: self.encode(frame), self.device)
            return out, elapsed, "R"
        cacher.attach(self.model)
        cacher.hint(hint)
        before = _chunk_counts(cacher)
        out, elapsed = timed(lambda: self.encode(frame), self.device)
        cacher.detach()
        after = _chunk_counts(cacher)
        kind = next((kind for kind, b, a in zip("RSD", before, after) if a > b), ".")
        return out, elapsed, kind.lower() if after[3] > before[3] else kind

    def flop_ratio(self, name: str) -> float | None:
        """The variant's own cost count (cachers and baselines), None for the unpatched tower."""
        if name in self.cachers:
            return self.cachers[name].stats.flop_ratio
        return self.encoders[name].flop_ratio() if name in self.encoders else None


def _record_fidelity(result: VariantResult, got: torch.Tensor, reference: torch.Tensor,
                     reference_maps: torch.Tensor | None, head: torch.nn.Module | None, prefix: int) -> None:
    """Per-frame cosines (patch tokens, whole frame, class token) and saliency agreement against the full forward."""
    result.token_cosine = token_cosine(got[:, prefix:], reference[:, prefix:]).tolist()
    result.flat_cosine = flat_cosine(got, reference).tolist()
    if prefix:
        result.cls_cosine = token_cosine(got[:, :1], reference[:, :1]).tolist()
    if head is not None:
        corr, kl = saliency_agreement(head(got.float()), reference_maps)
        result.saliency_corr, result.saliency_kl = corr.tolist(), kl.tolist()


def bench_random_tower(name: str, num_layers: int | None, video: str, frames: int, rates: list[float] | None,
                       suite: str, repeats: int, warmup: int, device: str, output: Any, console: Any,
                       can_plot: Callable[[], bool], qwen: bool = False) -> list[dict[str, Any]]:
    """`streamtc bench vit` on a random-init tower: a preset (`name`; frames spread over `video`, or one
    stream per rate) or, with qwen, a Qwen-VL tower; prints a table per stream, writes JSON and plots."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..preprocess import FramePreprocessor
    from ..presets import build_config

    if qwen:
        runs = [(f"{frames} frames of {video} at 2 fps", None, load_qwen_frames(video, name, frames))]
        model, variants = None, QWEN_VARIANTS
    else:
        model, size = build_model(name, num_layers=num_layers), build_config(name).image_size
        runs = [(f"{video} at {rate:g} fps", rate, FramePreprocessor(size=size)(load_frames_at_rate(video, rate)))
                for rate in rates] if rates else [(f"{frames} frames spread over {video}", None,
                                                   load_benchmark_frames(video, frames, size))]
    reports = []
    for label, rate, pixel_values in runs:
        if not qwen:
            variants = DEFAULT_VARIANTS if suite == "speed" else real_weights_variants(
                model.embeddings(pixel_values[:1]).shape[1], model.config.hidden_size,
                mlp_width(encoder_layers(model)[0]), prefix_tokens(model))
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(label, total=(warmup + repeats) * len(pixel_values) // (2 if qwen else 1))
            report = run_vit_benchmark(
                pixel_values, preset=name, num_layers=num_layers, model=model, variants=variants, repeats=repeats,
                warmup=warmup, device=device, tower=name if qwen else None,
                progress=lambda step: bar.update(task, description=f"{label}: {step}", advance=1))
        report.update(video=video, fps=rate, title=None if qwen else (
            f"{name} random weights, {report['num_layers']} layers, {label}, {len(pixel_values)} frames"))
        print_report(report)
        reports.append(report)
    if output is not None:
        console.print(f"wrote {write_report(reports[0] if len(reports) == 1 else {'benchmark': 'vit', 'runs': reports}, output)}")
        for path in [p for report in reports for p in write_plots(report, output)] if can_plot() else []:
            console.print(f"wrote {path}")
    return reports


def _chunk_counts(cacher: STCCacher | None) -> tuple[int, int, int, int]:
    """Refresh, subsampled and downscaled chunks and rejected reuses so far (zeros for a baseline)."""
    if cacher is None:
        return 0, 0, 0, 0
    stats = cacher.stats
    return stats.refresh_chunks, stats.subsampled_chunks, stats.downscaled_chunks, stats.failed_reuses


def summarise(result: VariantResult, full: VariantResult, fixed_share: float | None = None) -> dict[str, Any]:
    """Paired ratios against the unpatched run (medians over repeats and frames), the FLOP model, fidelity.

    fixed_share: the share of a full frame's FLOPs outside the layers the cacher patches (Qwen towers:
        the patch embedding and the mergers, run in full whatever the cacher does), added to the
        cacher's own count; None: the cacher's or the baseline's count as it is.
    """
    totals = [sum(run) for run in result.frame_ms]
    time_ratios = [sum(run) / sum(base) for run, base in zip(result.frame_ms, full.frame_ms)]
    kinds = result.frame_kinds or "".join("R" if r else "." for r in result.refresh_frames)
    paired = [(ms / base_ms, kind) for run, base in zip(result.frame_ms, full.frame_ms)
              for ms, base_ms, kind in zip(run, base, kinds)]
    by_kind = {kind: [ratio for ratio, k in paired if k == kind] for kind in "R.D"}  # refresh, reuse, downscale
    n_refresh = sum(result.refresh_frames)
    flop = 1.0 if result.flop_ratio is None else result.flop_ratio
    if fixed_share is not None:
        flop = fixed_share + (1.0 - fixed_share) * flop
    return {
        "name": result.name,
        "kind": result.kind,
        "config": result.config,
        "total_ms": statistics.median(totals),
        "time_ratio": statistics.median(time_ratios),
        "time_ratio_per_repeat": time_ratios,
        "flop_ratio": flop,
        "refresh_frames": n_refresh,
        "refresh_frame_ratio": statistics.median(by_kind["R"]) if by_kind["R"] else math.nan,
        "selective_frame_ratio": statistics.median(by_kind["."]) if by_kind["."] else math.nan,
        "downscale_frame_ratio": statistics.median(by_kind["D"]) if by_kind["D"] else math.nan,
        "token_cosine_mean": statistics.fmean(result.token_cosine),
        "token_cosine_p10": float(np.percentile(result.token_cosine, 10)),
        "token_cosine_min": min(result.token_cosine),
        "flat_cosine_mean": statistics.fmean(result.flat_cosine),
        "flat_cosine_min": min(result.flat_cosine),
        "cls_cosine_mean": statistics.fmean(result.cls_cosine) if result.cls_cosine else None,
        "saliency_corr_mean": statistics.fmean(result.saliency_corr) if result.saliency_corr else None,
        "saliency_corr_min": min(result.saliency_corr) if result.saliency_corr else None,
        "saliency_kl_mean": statistics.fmean(result.saliency_kl) if result.saliency_kl else None,
        "saliency_kl_max": max(result.saliency_kl) if result.saliency_kl else None,
        "per_frame_ms": [statistics.median(run[i] for run in result.frame_ms) for i in range(len(result.refresh_frames))],
        "per_frame_token_cosine": result.token_cosine,
        "per_frame_saliency_corr": result.saliency_corr,
        "refresh_pattern": result.frame_kinds,
        "per_frame_refresh": list(result.refresh_frames),
    }


def _cell(value: float | None, digits: int) -> str:
    """A number for the table; "-" where the variant has no such frames (NaN) or no such measure (None)."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def print_report(report: dict[str, Any]) -> None:
    """The report as one table, as wide as it needs: variant names are never cut (a console
    narrower than the table, such as a pipe's 80 columns, is widened)."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    title = report.get("title") or (
        f"ViT encode, {report['preset']} ({report['num_layers']} layers, {report['tokens_per_frame']} tokens), "
        f"{report['frames']} {report.get('unit', 'frame')}s, one per chunk, interleaved per frame, median of {report['repeats']}"
    )
    table = Table(title=title)
    columns = ["variant", "total ms", "time ratio", "FLOP ratio", "refresh frame", "non-refresh frame",
               "downscaled frame", "cos mean", "cos p10", "cos min"]
    real = report["variants"][0]["saliency_corr_mean"] is not None
    if real:
        columns += ["CLS cos", "saliency r mean", "saliency r min", "saliency KL mean"]
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=column == "variant")
    for v in report["variants"]:
        row = [v["name"], f"{v['total_ms']:.0f}", _cell(v["time_ratio"], 3), _cell(v["flop_ratio"], 3),
               _cell(v["refresh_frame_ratio"], 3), _cell(v["selective_frame_ratio"], 3),
               _cell(v.get("downscale_frame_ratio", math.nan), 3),
               _cell(v["token_cosine_mean"], 4), _cell(v.get("token_cosine_p10"), 4), _cell(v["token_cosine_min"], 4)]
        if real:
            row += [_cell(v["cls_cosine_mean"], 4), _cell(v["saliency_corr_mean"], 3), _cell(v["saliency_corr_min"], 3),
                    _cell(v["saliency_kl_mean"], 4)]
        table.add_row(*row)
    console = Console()
    needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
    if needed > console.width:
        console = Console(width=needed)
    console.print(table)
    env = report["environment"]
    m = {**env["versions"], **env["machine"], "torch_threads": env["torch_threads"], "date": env["date"]}
    console.print(f"{m['cpu']} · {m['torch_threads']} threads · torch {m['torch']} · transformers "
                  f"{m['transformers']} · {m['date']}; ratios are medians of paired ratios to the full frame "
                  "encoded alongside; 'full (control)' is the unpatched tower again: its distance from 1 "
                  "is the measurement's noise; cos = patch tokens' cosine to the full forward")


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


def write_plots(report: dict[str, Any], path: str | Path) -> list[Path]:
    """Two PNG plots beside the JSON report `path` (same stem): per-frame encode time of every
    variant, refresh frames marked; and the time ratio against fidelity, one point per variant.
    Needs matplotlib (the `plots` extra); without it, none (the JSON carries every number)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    title = (f"{report['preset']} ({report['num_layers']} layers, {report['tokens_per_frame']} tokens), "
             f"{report['frames']} frames, median of {report['repeats']}; {report['environment']['machine']['cpu']}")
    figure, axis = plt.subplots(figsize=(10, 4.5))
    for variant in report["variants"]:
        frames = range(1, len(variant["per_frame_ms"]) + 1)
        line, = axis.plot(frames, variant["per_frame_ms"], marker=".", label=variant["name"])
        if variant["config"] is not None:  # hollow markers: the frames this variant refreshed
            refreshed = [i for i, r in zip(frames, variant["per_frame_refresh"]) if r]
            axis.scatter(refreshed, [variant["per_frame_ms"][i - 1] for i in refreshed], facecolors="none",
                         edgecolors=line.get_color(), s=60)
    axis.set(xlabel="frame", ylabel="encode ms", title="ViT encode time per frame (circles: refresh frames)")
    axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=8)
    per_frame = path.with_name(f"{path.stem}_per_frame.png")
    figure.tight_layout()
    figure.savefig(per_frame, dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 5))
    for variant in report["variants"]:
        axis.scatter(variant["time_ratio"], variant["token_cosine_mean"])
        axis.annotate(variant["name"], (variant["time_ratio"], variant["token_cosine_mean"]), fontsize=7)
    axis.set(xlabel="time ratio to the unpatched tower (paired, median)", ylabel="token cosine to full (mean)",
             title="fidelity vs time")
    figure.suptitle(title, fontsize=7)
    fidelity = path.with_name(f"{path.stem}_fidelity.png")
    figure.tight_layout()
    figure.savefig(fidelity, dpi=120)
    plt.close(figure)
    return [per_frame, fidelity]



__all__ = ["bench_random_tower", "real_weights_variants", "Variant", "DEFAULT_VARIANTS", "QWEN_VARIANTS", "load_frames_at_rate", "load_qwen_frames",
           "saliency_agreement", "load_benchmark_frames", "run_vit_benchmark", "print_report", "write_plots",
           "write_report", "flat_cosine"]
