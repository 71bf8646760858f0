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

from ..baselines.vit import FrameSkipping
from ..cacher import STCCacher
from ..cacher import functional as F
from ..cacher.towers import prefix_tokens
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
# Beside each fixed schedule, the same r selecting whole 2x2 merge blocks (granularity="merge_block").
QWEN_VARIANTS: tuple[Variant, ...] = tuple(
    v for v in DEFAULT_VARIANTS
    if v.name in ("full", "full (control)", "full, cacher kernels (N=1)", "stc N=2 r=0.25", "stc N=4 r=0.25")
    or v.config is not None and v.config.refresh == "adaptive"
) + tuple(
    Variant(f"stc N={n} r=0.25, merge blocks", CacherConfig(cache_interval=n, update_ratio=0.25, granularity="merge_block"))
    for n in (2, 4)
)


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
    frame_kinds: str = ""  # per frame: R refresh (or a full frame), S subsampled, D downscaled, . reused
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
    each frame of each pass with a description ("repeat 2/3 · frame 5/16"), (warmup + repeats) *
    frames times in all.

    Interleaved per frame: frame i of the stream goes through the unpatched tower and each
    variant's cacher (each with its own stream state, attached in turn to the one model) before
    frame i + 1, in an order rotated every frame. Each variant frame is timed against the full
    frame encoded moments before or after it, so machine drift (other tenants, memory bandwidth,
    clocks) cancels in the paired ratios instead of landing on whichever variant ran during it.

    tower: a Qwen-VL tower name instead of `preset`; `pixel_values` then holds pairs of frames, each
    pair one temporal patch and one tower forward.
    hints: per frame, the codec hints a session would hand the Cacher (`ChunkHints.from_side_data`),
    given to every cacher (settings that do not use them ignore them) and to baselines that take them.
    """
    if variants[0].config is not None:
        raise ValueError("the first variant must be the unpatched baseline (config None)")
    if variants[0].config is not None or variants[0].baseline is not None:
        raise ValueError("the first variant must be the unpatched baseline (no config, no baseline)")
    if tower is not None and (model is not None or head is not None or any(v.baseline for v in variants)):
        raise ValueError("tower= runs Cacher variants on a random-init Qwen tower: no model, head or baselines")
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    if tower is None:
        if model is None:
            model = build_model(preset, num_layers=num_layers, dtype=dtype)
        model = model.to(device=device, dtype=dtype)
        inputs = list(pixel_values)

        def encode(frame: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=frame[None]).last_hidden_state
    else:
        model = qwen_towers.build_qwen_tower(tower, num_layers, dtype).to(device)
        inputs, grid_thw = qwen_towers.temporal_patches(pixel_values, model.config)

        def encode(patch: torch.Tensor) -> torch.Tensor:
            return model(patch, grid_thw=grid_thw).last_hidden_state[None]
    cachers = {v.name: STCCacher(v.config) for v in variants if v.config is not None}
    encoders = {v.name: v.baseline() for v in variants if v.baseline is not None}
    results = {
        v.name: VariantResult(
            v.name, None if v.config is None else v.config.to_dict(),
            "cacher" if v.config is not None else type(encoders[v.name]).__name__ if v.name in encoders else "full",
        )
        for v in variants
    }
    baseline = variants[0].name
    prefix = 0 if tower is not None else prefix_tokens(model)
    with torch.inference_mode():
        reference = torch.cat([encode(x) for x in inputs])
        reference_maps = None if head is None else head(reference.float())
        for repeat in range(warmup + repeats):
            for stream in (*cachers.values(), *encoders.values()):
                stream.reset()
            ms = {v.name: [] for v in variants}
            outputs = {v.name: [] for v in variants}
            refreshed = {v.name: [] for v in variants}
            for i, frame in enumerate(inputs):
                if progress is not None:
                    label = f"warm-up {repeat + 1}/{warmup}" if repeat < warmup else f"repeat {repeat - warmup + 1}/{repeats}"
                    progress(f"{label} · frame {i + 1}/{len(inputs)}")
                shift = i % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    cacher, encoder = cachers.get(variant.name), encoders.get(variant.name)
                    if cacher is not None:
                        cacher.attach(model)
                    hint = None if hints is None or not variant.hints else hints[i]
                    if cacher is not None:
                        cacher.hint(hint)
                    before = _chunk_counts(cacher)
                    computes = not isinstance(encoder, FrameSkipping) or encoder.encodes_next()
                    if encoder is not None:
                        extra = {"hints": hint} if getattr(encoder, "uses_hints", False) else {}
                        out, elapsed = timed(lambda: encoder(model, frame[None], **extra), device)
                    else:
                        out, elapsed = timed(lambda: encode(frame), device)
                    if cacher is not None:
                        cacher.detach()
                    ms[variant.name].append(elapsed)
                    outputs[variant.name].append(out)
                    if cacher is not None:  # R: refresh, S: subsample, D: downscale, .: non-refresh
                        after = _chunk_counts(cacher)
                        refreshed[variant.name].append(next((kind for kind, b, a in zip("RSD", before, after) if a > b), "."))
                    else:
                        refreshed[variant.name].append("R" if computes else ".")
            if repeat < warmup:
                continue
            for variant in variants:
                result = results[variant.name]
                result.frame_ms.append(ms[variant.name])
                result.refresh_frames = [kind == "R" for kind in refreshed[variant.name]]
                result.frame_kinds = "".join(refreshed[variant.name])
                got = torch.cat(outputs[variant.name])
                result.token_cosine = token_cosine(got[:, prefix:], reference[:, prefix:]).tolist()
                result.flat_cosine = flat_cosine(got, reference).tolist()
                if prefix:
                    result.cls_cosine = token_cosine(got[:, :1], reference[:, :1]).tolist()
                if head is not None:
                    corr, kl = saliency_agreement(head(got.float()), reference_maps)
                    result.saliency_corr, result.saliency_kl = corr.tolist(), kl.tolist()
                encoder, cacher = encoders.get(variant.name), cachers.get(variant.name)
                if cacher is not None:
                    result.flop_ratio = cacher.stats.flop_ratio
                if encoder is not None:
                    result.flop_ratio = encoder.flop_ratio()
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
        "environment": environment(device, {
            "preset": preset, "tower": tower, "num_layers": num_layers, "frames": len(inputs), "repeats": repeats,
            "warmup": warmup, "dtype": str(dtype).removeprefix("torch."), "variants": [v.name for v in variants],
            "saliency_head": head is not None,
        }),
        "variants": [summarise(results[v.name], results[baseline], tokens, config, frame_flops) for v in variants],
    }


def _chunk_counts(cacher: STCCacher | None) -> tuple[int, int, int]:
    """Refresh, subsampled and downscaled chunks so far (zeros for a baseline)."""
    if cacher is None:
        return 0, 0, 0
    return cacher.stats.refresh_chunks, cacher.stats.subsampled_chunks, cacher.stats.downscaled_chunks


def summarise(
    result: VariantResult, full: VariantResult, tokens: int, config: Any, frame_flops: Any = None
) -> dict[str, Any]:
    """Paired ratios against the unpatched run (medians over repeats and frames), the FLOP model, fidelity.

    frame_flops: recomputed tokens (None: all) -> FLOPs of one frame, for towers whose fixed costs
        (patch embedding, mergers) the cacher's own layer count leaves out; None: the cacher's count.
    """
    totals = [sum(run) for run in result.frame_ms]
    time_ratios = [sum(run) / sum(base) for run, base in zip(result.frame_ms, full.frame_ms)]
    kinds = result.frame_kinds or "".join("R" if r else "." for r in result.refresh_frames)
    paired = [(ms / base_ms, kind) for run, base in zip(result.frame_ms, full.frame_ms)
              for ms, base_ms, kind in zip(run, base, kinds)]
    refresh = [ratio for ratio, kind in paired if kind == "R"]
    selective = [ratio for ratio, kind in paired if kind == "."]  # the non-refresh (reuse) frames only
    n_refresh = sum(result.refresh_frames)
    if frame_flops is not None and result.config is not None:  # a tower model beyond the layers (Qwen towers)
        k = F.num_recomputed_tokens(tokens, result.config["update_ratio"])
        if result.config.get("granularity") == "merge_block":
            k = F.grouped_count(k, config.spatial_merge_size**2)
        full_flops, selective_flops = frame_flops(None), frame_flops(k)
        n = len(result.refresh_frames)
        flop = (n_refresh * full_flops + (n - n_refresh) * selective_flops) / (n * full_flops)
    else:  # the cacher's own count (its stats) or the baseline's
        flop = 1.0 if result.flop_ratio is None else result.flop_ratio
    return {
        "name": result.name,
        "kind": result.kind,
        "config": result.config,
        "total_ms": statistics.median(totals),
        "time_ratio": statistics.median(time_ratios),
        "time_ratio_per_repeat": time_ratios,
        "flop_ratio": flop,
        "refresh_frames": n_refresh,
        "refresh_frame_ratio": statistics.median(refresh) if refresh else math.nan,
        "selective_frame_ratio": statistics.median(selective) if selective else math.nan,
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
    columns = ["variant", "total ms", "time ratio", "FLOP ratio", "refresh frame", "non-refresh frame", "cos mean",
               "cos p10", "cos min"]
    real = report["variants"][0]["saliency_corr_mean"] is not None
    if real:
        columns += ["CLS cos", "saliency r mean", "saliency r min", "saliency KL mean"]
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=column == "variant")
    for v in report["variants"]:
        row = [v["name"], f"{v['total_ms']:.0f}", _cell(v["time_ratio"], 3), _cell(v["flop_ratio"], 3),
               _cell(v["refresh_frame_ratio"], 3), _cell(v["selective_frame_ratio"], 3),
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



__all__ = ["Variant", "DEFAULT_VARIANTS", "QWEN_VARIANTS", "load_frames_at_rate", "load_qwen_frames",
           "saliency_agreement", "load_benchmark_frames", "run_vit_benchmark", "print_report", "write_plots",
           "write_report", "flat_cosine"]
