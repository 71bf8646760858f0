"""The real-footage fidelity suite: STC-Cacher settings against the trivial baselines on real weights.

    streamtc bench vit --weights dinov2-s --streams demo@0.5,demo@1,demo@2,carphone@2,bigbuckbunny@2,vtest@0.5,box@1,cup@2,megamind@1,tree@1

Each stream is a clip sampled at a rate, streamed one frame per chunk through DINOv2-S/14 (real
weights, `streamtc.weights`) by every variant side by side (`vit.run_vit_benchmark`), each frame with
the codec hints a session would get from the file (`ChunkHints.from_side_data` on the tower's grid).
Four kinds of footage: a moving camera with cuts (the street clip), steady footage (carphone,
bigbuckbunny), static cameras and an edited film scene (OpenCV's sample clips, `streamtc.clips`; the
tree clip's codec exports no motion vectors, so it runs on pixel signals alone). The budget policy's
thresholds were chosen on the first two kinds; OpenCV's clips were held out.

Rows: the paper's fixed schedules, the robust profile (`CacherConfig.robust()`) at N=2's and N=4's
budgets (with hints, without them, and with the two codec token signals), frame skipping and
uniform token dropping at those costs, and codec-guided patch skipping (`CodecSkipping`). The
report keeps, per stream, every frame's source index and time and every variant's per-frame
cosine, and pools all streams' frames per variant (mean, 10th percentile, worst).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cacher import STCCacher
from ..cacher import functional as F
from ..cacher.towers import encoder_layers, mlp_width, prefix_tokens
from ..cacher.hints import ChunkHints
from ..clips import OPENCV_CLIPS, opencv_clip_path
from ..config import CacherConfig
from ..errors import InputError
from ..measure import environment
from ..sources import BUILTIN_CLIPS, builtin_clip_path, open_source
from ..tokens import token_cosine
from .vit import real_weights_variants, run_vit_benchmark

DEFAULT_STREAMS = "demo@0.5,demo@1,demo@2,carphone@2,bigbuckbunny@2,vtest@0.5,box@1,cup@2,megamind@1,tree@1"
# What kind of footage each named clip is, and whether the budget policy was tuned on it.
CLIP_KINDS = {"demo": "moving camera, cuts", "bikes": "moving camera, cuts", "carphone": "steady",
              "bigbuckbunny": "steady"} | {name: clip.kind for name, clip in OPENCV_CLIPS.items()}
TUNED_ON = frozenset({"demo", "bikes", "carphone", "bigbuckbunny"})


@dataclass(frozen=True)
class StreamSpec:
    """A clip (a built-in or static clip name, or a video file) sampled at `fps`."""

    clip: str
    fps: float

    @property
    def label(self) -> str:
        return f"{self.clip} at {self.fps:g} fps"

    def path(self) -> str:
        if self.clip == "demo" or self.clip in BUILTIN_CLIPS:
            return str(builtin_clip_path("bikes" if self.clip == "demo" else self.clip))
        if self.clip in OPENCV_CLIPS:
            return str(opencv_clip_path(self.clip))
        return self.clip


def parse_streams(text: str) -> list[StreamSpec]:
    """"clip@fps,clip@fps,..." -> specs; a clip is demo, a built-in or static clip name, or a file."""
    specs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        clip, _, rate = item.rpartition("@")
        try:
            fps = float(rate)
        except ValueError:
            fps = math.nan
        if not clip or not math.isfinite(fps) or fps <= 0:
            raise InputError(f"a stream is CLIP@FPS (e.g. demo@1, vtest@0.5), got {item!r}")
        specs.append(StreamSpec(clip, fps))
    if not specs:
        raise InputError("no streams given")
    return specs


def load_stream(spec: StreamSpec, grid: tuple[int, int]) -> tuple[np.ndarray, list[ChunkHints | None], list[dict[str, Any]]]:
    """The stream's frames (uint8 [F, H, W, 3]), each frame's codec hints on `grid` (None where the
    decoder gave none) and a record per frame: sampled index, source frame index and time, codec facts."""
    source = open_source(spec.path(), fps=spec.fps)
    frames = list(source)
    if not frames:
        raise InputError(f"{spec.label}: no frames")
    hints, records, decoded = [], [], -1
    for frame in frames:
        codec = frame.codec
        decoded = decoded + codec.decoded_frames if codec is not None else round(frame.timestamp * (source.native_fps or 0))
        hints.append(None if codec is None else ChunkHints.from_side_data([[codec]], grid))
        records.append({"index": frame.index, "time_s": frame.timestamp, "source_frame": decoded,
                        "codec": None if codec is None else {"cut": codec.cut, "intra_share": codec.intra_share,
                                                             "decoded_frames": codec.decoded_frames}})
    return np.stack([f.image for f in frames]), hints, records


def tower_grid(tower: torch.nn.Module, normalize: Callable) -> tuple[int, int]:
    """The tower's patch grid: the size `normalize` resizes every frame to, over the patch size."""
    size = normalize(torch.zeros(1, 8, 8, 3, dtype=torch.uint8)).shape[-2:]
    return size[0] // tower.config.patch_size, size[1] // tower.config.patch_size


def run_real_footage(
    streams: list[StreamSpec], tower: torch.nn.Module, head: torch.nn.Module | None, normalize: Callable,
    repeats: int = 3, warmup: int = 1, device: str = "cpu", progress: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Every stream through every variant; the per-stream reports and the pooled summary."""
    reports, grid = [], tower_grid(tower, normalize)
    for spec in streams:
        images, hints, records = load_stream(spec, grid)
        pixel_values = normalize(torch.from_numpy(images))
        tokens = prefix_tokens(tower) + grid[0] * grid[1]
        variants = real_weights_variants(tokens, tower.config.hidden_size, mlp_width(encoder_layers(tower)[0]),
                                         prefix_tokens(tower))
        report = run_vit_benchmark(
            pixel_values, preset=type(tower).__name__, model=tower, head=head, variants=variants, repeats=repeats,
            warmup=warmup, device=device, hints=hints,
            progress=None if progress is None else functools.partial(progress, spec.label),
        )
        report.update(video=spec.clip, fps=spec.fps, kind=CLIP_KINDS.get(spec.clip, "user clip"),
                      tuned_on=spec.clip in TUNED_ON, frames_record=records, title=f"{spec.label}, {len(images)} frames")
        reports.append(report)
    return {"benchmark": "vit real footage", "streams": [s.label for s in streams], "runs": reports,
            "pooled": pooled_summary(reports), "environment": environment(device, {
                "streams": [s.label for s in streams], "repeats": repeats, "warmup": warmup,
                "robust_profile": CacherConfig.robust().to_dict()})}


def bench_real_footage(streams: list[StreamSpec], repeats: int, warmup: int, device: str, output: Path | None,
                       console: Any, can_plot: Callable[[], bool]) -> dict[str, Any]:
    """`streamtc bench vit --weights dinov2-s`: run the suite with a progress bar, print a table per stream,
    the pooled table and the refresh-signal study, write the JSON (and plots where matplotlib is there)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..weights import load_dinov2_small, normalize_frames
    from .vit import print_report, write_plots, write_report

    tower, head = load_dinov2_small()
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("real footage", total=None)
        result = run_real_footage(streams, tower, head, normalize_frames, repeats, warmup, device,
                                  progress=lambda label, step: bar.update(task, description=f"{label}: {step}"))
    studies = []
    for report in result["runs"]:
        report["title"] = f"DINOv2-S real weights, {report['title']} ({report['kind']})"
        report["refresh_signal_study"] = refresh_signal_study(tower, normalize_frames(
            torch.from_numpy(load_stream(StreamSpec(report["video"], report["fps"]), (1, 1))[0])))
        studies.append(report["refresh_signal_study"]["values"])
        print_report(report)
    print_pooled(result["pooled"], console)
    print_signal_study(summarise_signal_study({key: sum((v[key] for v in studies), []) for key in studies[0]}, 3), console)
    if output is not None:
        console.print(f"wrote {write_report(result, output)}")
        if can_plot():
            plots = [plot_fidelity(result["runs"], Path(output).with_suffix(".fidelity.png"))]
            for path in plots + [p for report in result["runs"] for p in write_plots(report, stream_path(output, report))]:
                console.print(f"wrote {path}")
    return result


def stream_path(output: Path, report: dict[str, Any]) -> Path:
    """The report path with the stream in its stem (real.json -> real.demo@1.json), so that each stream's
    plots get their own files."""
    output = Path(output)
    return output.with_name(f"{output.stem}.{Path(report['video']).stem}@{report['fps']:g}{output.suffix}")


def pooled_summary(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant, over every frame of every stream: cosine mean, 10th percentile and worst, saliency
    mean and worst, and the FLOP and time ratios (frame-weighted mean; median of streams)."""
    rows = []
    for name in [v["name"] for v in reports[0]["variants"]]:
        runs = [next(v for v in r["variants"] if v["name"] == name) for r in reports]
        cos = np.concatenate([run["per_frame_token_cosine"] for run in runs])
        sal = np.concatenate([run["per_frame_saliency_corr"] or [math.nan] for run in runs])
        frames = [len(run["per_frame_token_cosine"]) for run in runs]
        rows.append({
            "name": name, "frames": int(sum(frames)),
            "flop_ratio": float(np.average([run["flop_ratio"] for run in runs], weights=frames)),
            "time_ratio": statistics.median(run["time_ratio"] for run in runs),
            "token_cosine_mean": float(cos.mean()), "token_cosine_p10": float(np.percentile(cos, 10)),
            "token_cosine_min": float(cos.min()),
            "saliency_corr_mean": float(np.nanmean(sal)), "saliency_corr_min": float(np.nanmin(sal)),
        })
    return rows


def print_pooled(pooled: list[dict[str, Any]], console: Any) -> None:
    """The pooled table: one row per variant over all streams' frames."""
    from rich.table import Table

    table = Table(title="all streams pooled (every frame of every stream)")
    for column in ("variant", "frames", "FLOP ratio", "time ratio", "cos mean", "cos p10", "cos worst",
                   "saliency r mean", "saliency r worst"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=column == "variant")
    for row in pooled:
        table.add_row(row["name"], str(row["frames"]), f"{row['flop_ratio']:.3f}", f"{row['time_ratio']:.3f}",
                      f"{row['token_cosine_mean']:.4f}", f"{row['token_cosine_p10']:.4f}", f"{row['token_cosine_min']:.4f}",
                      f"{row['saliency_corr_mean']:.3f}", f"{row['saliency_corr_min']:.3f}")
    console.print(table)


def refresh_signal_study(tower: torch.nn.Module, pixel_values: torch.Tensor, max_gap: int = 3) -> dict[str, Any]:
    """How well each adaptive refresh signal predicts a reused frame's error, over frame pairs.

    For every pair (reference r, target r + d), d = 1..max_gap: the patch-token cosine to the full
    forward of frame r + d encoded as a non-refresh chunk against frame r's reference (N = 2,
    r = 0.25), and both signals the adaptive cacher can watch (the relative pixel change; the
    median first-layer key cosine of the reused tokens). Returns Pearson and Spearman
    correlations of each signal with that cosine, signed so that higher means "more similar".
    """
    from ..cacher.patch_vit import layer_parts
    from ..cacher.towers import encoder_layers

    prefix = prefix_tokens(tower)
    first = layer_parts(encoder_layers(tower)[0])
    cosines, pixels, keys = [], [], []
    with torch.inference_mode():
        full = torch.cat([tower(pixel_values=f[None]).last_hidden_state for f in pixel_values])
        embedded = tower.embeddings(pixel_values)
        first_keys = first.k_proj(first.norm1(embedded))
        for r in range(len(pixel_values)):
            for c in range(r + 1, min(len(pixel_values), r + max_gap + 1)):
                cacher = STCCacher(CacherConfig(cache_interval=100, update_ratio=0.25)).attach(tower)
                tower(pixel_values=pixel_values[r][None])
                out = tower(pixel_values=pixel_values[c][None]).last_hidden_state
                cacher.detach()
                cosines.append(float(token_cosine(out[:, prefix:], full[c:c + 1, prefix:])))
                pixels.append(-float(F.relative_pixel_change(pixel_values[c][None], pixel_values[r])))
                similarity = F.key_similarity(first_keys[c][None], F.unit_rows(first_keys[r]))
                k = F.num_recomputed_tokens(similarity.shape[-1], 0.25)
                keys.append(float(F.reused_similarity(similarity, k)))

    return summarise_signal_study({"cosine": cosines, "pixels": pixels, "keys": keys}, max_gap)


def summarise_signal_study(values: dict[str, list[float]], max_gap: int) -> dict[str, Any]:
    """Correlations of each signal with the reused cosine; `values` may pool the pairs of several runs."""
    cosines = np.array(values["cosine"])

    def correlations(signal: list[float]) -> dict[str, float]:
        x = np.array(signal)
        rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        return {"pearson": float(np.corrcoef(x, cosines)[0, 1]), "spearman": float(np.corrcoef(rank(x), rank(cosines))[0, 1])}

    return {
        "pairs": len(cosines),
        "max_gap": max_gap,
        "signals": {"pixels (minus relative change)": correlations(values["pixels"]),
                    "keys (reused median)": correlations(values["keys"])},
        "keys_range": [min(values["keys"]), max(values["keys"])],
        "cosine_range": [float(cosines.min()), float(cosines.max())],
        "values": values,
    }


def print_signal_study(study: dict[str, Any] | None, console: Any) -> None:
    """One line: how well each adaptive refresh signal tracks a reused frame's cosine."""
    if not study:
        return
    parts = ", ".join(f"{name}: Pearson {c['pearson']:.2f}, Spearman {c['spearman']:.2f}" for name, c in study["signals"].items())
    console.print(f"adaptive refresh signals against a reused frame's cosine over {study['pairs']} frame pairs "
                  f"(gaps 1-{study['max_gap']}): {parts}; key medians span {study['keys_range'][0]:.3f}-"
                  f"{study['keys_range'][1]:.3f} while the cosine spans {study['cosine_range'][0]:.3f}-"
                  f"{study['cosine_range'][1]:.3f}")


def plot_fidelity(reports: list[dict[str, Any]], path: str | Path) -> Path:
    """Fidelity (patch-token cosine mean and worst frame; saliency r where measured) against FLOP ratio, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("token_cosine_mean", "cos mean"), ("token_cosine_min", "cos worst frame")]
    if reports[0]["variants"][0]["saliency_corr_mean"] is not None:
        metrics += [("saliency_corr_mean", "saliency r mean"), ("saliency_corr_min", "saliency r worst frame")]
    figure, axes = plt.subplots(len(metrics), len(reports), figsize=(max(10.0, 4.5 * len(reports)), 3.2 * len(metrics) + 1.5), squeeze=False)
    markers = {"cacher": "o", "FrameSkipping": "s", "UniformTokenDropping": "^", "full": "*"}
    for col, report in enumerate(reports):
        for row, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for v in report["variants"]:
                if v["name"] == "full (control)":
                    continue
                ax.scatter(v["flop_ratio"], v[key], marker=markers.get(v["kind"], "o"), label=v["name"])
            ax.set_xlabel("FLOP ratio to the full tower")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(report.get("title", report["preset"]), fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    figure.tight_layout(rect=(0, 1.5 / (3.2 * len(metrics) + 1.5), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path



__all__ = ["bench_real_footage", "CLIP_KINDS", "stream_path", "DEFAULT_STREAMS", "StreamSpec", "TUNED_ON", "load_stream", "parse_streams", "plot_fidelity",
           "pooled_summary", "print_pooled", "print_signal_study", "real_weights_variants", "refresh_signal_study",
           "run_real_footage", "summarise_signal_study", "tower_grid"]
