"""End-to-end streaming benchmark: every stage of every variant, side by side, with its fidelity.

    streamtc bench pipeline --preset llava-ov-0.5b --vit-layers 4 --text-layers 4 --frames 16,32,64

Each variant streams the same real-footage frames through a `StreamingSession`, one frame per
push. At every checkpoint (16, 32 and 64 frames by default) of one stream the harness reads the
cumulative stage times, pre-fills what is pending, and asks a fixed question set: so a 64-frame
stream also measures 16 and 32 frames, exactly as a live stream passes through them.

Stages: ViT (the vision tower's forwards, timed by hooks), projector + pooling (the rest of the
video path), pruning (Pruner or baseline selector), LLM pre-fill of the visual tokens, time to
first answer token, decode ms/token, peak memory (CUDA max allocated, or the process's peak RSS,
reset per stream through /proc/self/clear_refs where Linux allows it), KV-cache size; end-to-end
frames/s counts every push (preprocessing included), questions excluded.

Protocol: variants run interleaved (A B C ... A B C ...), each after an untimed warm-up stream,
and every number is the median over the timed repeats, so machine drift cancels; every clock read
follows a device synchronisation (`StreamingSession` and `timing.synchronize`).

Fidelity, beside every speed number, against the uncompressed variant (which always runs first):
per-frame cosine of the vision tower's output tokens (mean over tokens; not defined for ToMe,
whose tokens are merged), next-token KL divergence KL(uncompressed || variant) and greedy-answer
agreement on the question set. With random weights these are proxies for accuracy; the report
says so.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..baselines import RandomPruner, ToMe, UniformPruner, VidCom2Pruner, VisionZipPruner, tome_video_features
from ..baselines.tome import min_keep_tokens
from ..cacher import STCCacher
from ..config import CacherConfig, PrunerConfig, STCConfig
from ..errors import ConfigError
from ..hosts import VideoHost, host_for
from ..presets import build_model, get_preset, torch_dtype
from ..pruner import STCPruner
from ..session import StreamingSession
from ..tokenizer import tokenizer_for_config
from .timing import machine_info, peak_memory_bytes, reset_peak_memory, synchronize

Baseline = Literal["uniform", "random", "vidcom2", "visionzip", "tome"]
BASELINES: tuple[str, ...] = ("uniform", "random", "vidcom2", "visionzip", "tome")
GPU_ONLY_PRESETS = ("llava-ov-7b",)  # a 7B fp32 model streaming 64 frames is days of CPU time
PROXY_NOTE = ("random-weight presets: KL, answer agreement and ViT cosine are proxies for accuracy, "
              "not accuracy; run the evaluation with real weights for that")


@dataclass(frozen=True)
class PipelineVariant:
    """One compression setting of the streaming pipeline.

    stc: STC levels to enable (None: neither). baseline: a comparison method in place of the
    Pruner (uniform, random, vidcom2, visionzip) or of the video path (tome), keeping
    `keep_ratio` of the pooled tokens per frame. delay_ms: a sleep injected into every vision
    forward, the harness's own check that it times what runs.
    """

    name: str
    stc: STCConfig | None = None
    baseline: Baseline | None = None
    keep_ratio: float = 0.25
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ConfigError(f"unknown baseline {self.baseline!r}; choose from {', '.join(BASELINES)}")
        if self.baseline is not None and self.stc is not None:
            raise ConfigError(f"variant {self.name!r}: a baseline runs without STC")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"keep_ratio must lie in (0, 1], got {self.keep_ratio!r}")

    @property
    def uncompressed(self) -> bool:
        return self.stc is None and self.baseline is None

    def describe(self) -> str:
        """One line: what the variant runs."""
        if self.baseline is not None:
            return f"{self.baseline}, keeping {self.keep_ratio:.0%} of the pooled tokens"
        if self.stc is None:
            return "no compression" + (f", {self.delay_ms:g} ms sleep per vision forward" if self.delay_ms else "")
        parts = []
        if (c := self.stc.cacher) is not None:
            options = [c.selection, f"{c.refresh} refresh"]
            if c.refresh == "adaptive":
                options.append(f"threshold {c.refresh_threshold}, budget {c.refresh_budget}")
            if c.compile_mode:
                options.append(f"compiled ({c.compile_mode})")
            parts.append(f"Cacher N={c.cache_interval} r={c.update_ratio} ({', '.join(options)})")
        if (pr := self.stc.pruner) is not None:
            budget = f"{pr.tokens_per_frame} tokens" if pr.tokens_per_frame else f"{pr.keep_ratio:.0%}"
            parts.append(f"Pruner {pr.scoring} {budget}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.describe(),
                "stc": None if self.stc is None else self.stc.to_dict(),
                "baseline": self.baseline, "keep_ratio": self.keep_ratio if self.baseline else None,
                "delay_ms": self.delay_ms}


def _cacher_only(interval: int, **options: Any) -> STCConfig:
    return STCConfig(cacher=CacherConfig(cache_interval=interval, update_ratio=0.25, **options), pruner=None)


def _pruner_only(scoring: str, ratio: float) -> STCConfig:
    return STCConfig(cacher=None, pruner=PrunerConfig(scoring=scoring, keep_ratio=ratio))


def _stc(**cacher_options: Any) -> STCConfig:
    return STCConfig(cacher=CacherConfig(cache_interval=2, update_ratio=0.25, **cacher_options),
                     pruner=PrunerConfig(keep_ratio=0.3))


DEFAULT_PIPELINE_VARIANTS: tuple[PipelineVariant, ...] = (
    PipelineVariant("none"),
    PipelineVariant("cacher N=2", _cacher_only(2)),
    PipelineVariant("cacher N=4", _cacher_only(4)),
    PipelineVariant("pruner gaussian 25%", _pruner_only("gaussian", 0.25)),
    PipelineVariant("pruner gaussian 30%", _pruner_only("gaussian", 0.3)),
    PipelineVariant("pruner dual_anchor 25%", _pruner_only("dual_anchor", 0.25)),
    PipelineVariant("pruner dual_anchor 30%", _pruner_only("dual_anchor", 0.3)),
    PipelineVariant("stc", _stc()),
    PipelineVariant("stc shared", _stc(selection="shared")),
    PipelineVariant("stc adaptive", STCConfig(
        cacher=CacherConfig(cache_interval=8, update_ratio=0.25, refresh="adaptive", refresh_signal="keys", refresh_threshold=0.92,
                            refresh_budget=2),
        pruner=PrunerConfig(keep_ratio=0.3))),
    PipelineVariant("stc compiled", _stc(compile_mode="default")),
    *(PipelineVariant(f"{name} 25%", baseline=name) for name in BASELINES),
)
VARIANTS_BY_NAME = {v.name: v for v in DEFAULT_PIPELINE_VARIANTS}

DEFAULT_QUESTIONS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("What is happening in the video?", None),
    ("What is the person in front doing?", ("riding a bike", "walking", "driving a car", "standing still")),
)


@dataclass(frozen=True)
class PipelineSettings:
    """Everything a run depends on besides the variants; written into every report."""

    preset: str = "tiny-llava-ov"
    model: str | None = None  # real weights (a directory or hub id) in place of the preset
    vit_layers: int | None = None
    text_layers: int | None = None
    frames: tuple[int, ...] = (16, 32, 64)
    repeats: int = 2
    warmup_frames: int = 2
    max_new_tokens: int = 8
    prefill_min_tokens: int | None = None
    video: str = "demo"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.frames or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.frames):
            raise ConfigError(f"frames must be frame counts >= 1, got {self.frames!r}")
        if self.repeats < 1 or self.warmup_frames < 0 or self.max_new_tokens < 1:
            raise ConfigError("repeats and max_new_tokens must be >= 1, warmup_frames >= 0")
        torch_dtype(self.dtype)  # validates
        if self.model is not None and (self.vit_layers is not None or self.text_layers is not None):
            raise ConfigError("depth overrides apply to presets; real weights (model=...) run at their own depth")
        if self.model is None and self.preset in GPU_ONLY_PRESETS and not self.device.startswith("cuda"):
            raise ConfigError(f"preset {self.preset!r} is benchmarked on a GPU only (--device cuda); on a CPU use "
                              "llava-ov-0.5b with depth overrides")


# -- one stream ----------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Cumulative measurements of one stream when it reached `frames` frames."""

    frames: int
    vit_ms: float
    projector_pooling_ms: float
    prune_ms: float
    prefill_ms: float
    push_ms: float
    ttft_ms: float
    decode_ms_per_token: float
    peak_memory_bytes: int
    kv_cache_bytes: int
    visual_tokens: int
    first_token_logits: list[torch.Tensor] = field(repr=False, default_factory=list)
    answers: list[list[int]] = field(default_factory=list)


@dataclass
class StreamRun:
    checkpoints: list[Checkpoint]
    vit_ms_per_frame: list[float]  # the tower's time on each frame
    vit_outputs: list[torch.Tensor] = field(repr=False, default_factory=list)  # per frame [T, C], float32


class _TowerTimer:
    """Times every forward of the host's vision tower (pre/post hooks, synchronised) and keeps its
    output tokens, the input of the projector (or patch merger), one [T, C] per pruner frame."""

    def __init__(self, host: VideoHost, device: torch.device, keep_outputs: bool) -> None:
        self.host, self.device, self.keep_outputs = host, device, keep_outputs
        self.frame_ms: list[float] = []
        self.outputs: list[torch.Tensor] = []
        self._start = 0.0
        self._tower_kwargs: dict[str, Any] = {}
        self._hooks = [
            host.vision_tower.register_forward_pre_hook(self._begin, with_kwargs=True),
            host.vision_tower.register_forward_hook(self._end, with_kwargs=True),
            host.projector.register_forward_pre_hook(self._keep),
        ]

    def _begin(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        synchronize(self.device)
        self._tower_kwargs = kwargs
        self._start = time.perf_counter()

    def _end(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        synchronize(self.device)
        frames = self.host.tower_frames(args, kwargs)
        elapsed = (time.perf_counter() - self._start) * 1e3
        self.frame_ms.extend([elapsed / frames] * frames)

    def _keep(self, module: torch.nn.Module, args: tuple) -> None:
        if self.keep_outputs:
            self.outputs.extend(self.host.split_tower_tokens(args[0].detach().float().cpu(), self._tower_kwargs))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class VariantRunner:
    """Builds one variant's sessions on a shared model; its STC objects persist across streams
    (a compiled Cacher compiles once), patches are applied per stream and removed after it."""

    def __init__(self, variant: PipelineVariant, host: VideoHost, settings: PipelineSettings,
                 preprocessor: Callable[[Any], Any] | None = None) -> None:
        self.variant, self.host, self.settings, self.preprocessor = variant, host, settings, preprocessor
        self.model, self.tokenizer = host.model, host.tokenizer
        stc = variant.stc
        self.cacher = STCCacher(stc.cacher) if stc is not None and stc.cacher is not None else None
        self.pruner = STCPruner(stc.pruner) if stc is not None and stc.pruner is not None else None
        self.pooled_side = getattr(host, "pooled_side", None)  # LLaVA-OneVision's pooled grid (ToMe, VisionZip)

    @contextmanager
    def session(self) -> Iterator[StreamingSession]:
        variant, model = self.variant, self.model
        undo: list[Callable[[], None]] = []
        selector, encoder = None, None
        tower = self.host.vision_tower
        if variant.baseline == "tome":
            config = tower.config
            tokens, layers = (config.image_size // config.patch_size) ** 2, config.num_hidden_layers
            keep = max(1, round(variant.keep_ratio * self.pooled_side**2))
            tome = ToMe(keep_tokens=max(keep, min_keep_tokens(tokens, layers))).apply(tower)
            undo.append(tome.remove)
            encoder = tome_video_features
        elif variant.baseline == "visionzip":
            selector = VisionZipPruner(keep_ratio=variant.keep_ratio).attach(
                model, pooled_size=self.pooled_side)
            undo.append(selector.detach)
        elif variant.baseline is not None:
            selector = {"uniform": UniformPruner, "random": RandomPruner, "vidcom2": VidCom2Pruner}[variant.baseline](
                keep_ratio=variant.keep_ratio)
        if self.cacher is not None:
            self.cacher.attach(model)
            undo.append(self.cacher.detach)
        if variant.delay_ms > 0:
            # a post-hook registered before the timer's: the sleep ends inside the timed tower forward
            handle = tower.register_forward_hook(lambda module, args, output: time.sleep(variant.delay_ms / 1e3))
            undo.append(handle.remove)
        try:
            session = StreamingSession(
                model, self.tokenizer, variant.stc, selector=selector, encoder=encoder, host=self.host,
                preprocessor=self.preprocessor,
                prefill_min_tokens=self.settings.prefill_min_tokens,
                _shared_stc=(self.cacher, self.pruner) if variant.stc is not None else None,
            )
            yield session
        finally:
            for step in reversed(undo):
                step()

    def stream(self, frames: np.ndarray, timestamps: Sequence[float], checkpoints: Sequence[int],
               questions: Sequence[tuple[str, tuple[str, ...] | None]], keep_outputs: bool) -> StreamRun:
        """Push `frames` one at a time; measure at every checkpoint."""
        device = next(self.model.parameters()).device
        with self.session() as session:
            timer = _TowerTimer(self.host, device, keep_outputs)
            try:
                reset_peak_memory(device)
                results: list[Checkpoint] = []
                push_ms = 0.0
                for index in range(len(frames)):
                    synchronize(device)
                    start = time.perf_counter()
                    session.push(frames[index : index + 1], timestamps[index : index + 1])
                    synchronize(device)
                    push_ms += (time.perf_counter() - start) * 1e3
                    if index + 1 in checkpoints:
                        start = time.perf_counter()
                        session.flush()
                        synchronize(device)
                        push_ms += (time.perf_counter() - start) * 1e3
                        results.append(self._checkpoint(session, timer, push_ms, questions))
            finally:
                timer.remove()
        return StreamRun(results, timer.frame_ms, timer.outputs)

    def _checkpoint(self, session: StreamingSession, timer: _TowerTimer, push_ms: float,
                    questions: Sequence[tuple[str, tuple[str, ...] | None]]) -> Checkpoint:
        stats = session.stats
        vit_ms = sum(timer.frame_ms)
        point = Checkpoint(
            frames=stats.frames, vit_ms=vit_ms, projector_pooling_ms=max(stats.vit_ms - vit_ms, 0.0),
            prune_ms=stats.prune_ms, prefill_ms=stats.prefill_ms, push_ms=push_ms, ttft_ms=0.0,
            decode_ms_per_token=0.0, peak_memory_bytes=0, kv_cache_bytes=stats.kv_cache_bytes,
            visual_tokens=stats.visual_tokens,
        )
        ttft, decode = [], []
        for question, options in questions:
            point.first_token_logits.append(session.next_token_logits(question, options))
            answer = session.ask(question, options, max_new_tokens=self.settings.max_new_tokens)
            point.answers.append(answer.token_ids)
            ttft.append(answer.ttft_ms)
            decode.append(answer.decode_ms_per_token)
        point.ttft_ms, point.decode_ms_per_token = statistics.mean(ttft), statistics.mean(decode)
        point.peak_memory_bytes = peak_memory_bytes(next(self.model.parameters()).device)
        return point


# -- the benchmark -------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _token_cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean over tokens of the cosine between two frames' tokens [T, C]; None if counts differ."""
    if a.shape != b.shape:
        return None
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(softmax(reference) || softmax(other)) of two logit vectors, in nats."""
    log_p, log_q = reference.float().log_softmax(-1), other.float().log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum())


def _summarise(variant: PipelineVariant, runs: list[StreamRun], reference: StreamRun | None,
               baseline_rows: dict[int, dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One row per checkpoint: medians over the timed runs, ratios against the uncompressed
    variant's rows, fidelity of the last run against the reference run."""
    rows = []
    last = runs[-1]
    for position, point in enumerate(last.checkpoints):
        frames = point.frames
        points = [run.checkpoints[position] for run in runs]
        med = {key: _median([getattr(p, key) for p in points]) for key in (
            "vit_ms", "projector_pooling_ms", "prune_ms", "prefill_ms", "push_ms", "ttft_ms", "decode_ms_per_token")}
        row: dict[str, Any] = {
            "variant": variant.name, "frames": frames, **med,
            "vit_ms_per_frame": med["vit_ms"] / frames,
            "prefill_ms_per_frame": med["prefill_ms"] / frames,
            "fps": frames / (med["push_ms"] / 1e3) if med["push_ms"] > 0 else float("inf"),
            "peak_memory_bytes": max(p.peak_memory_bytes for p in points),
            "kv_cache_bytes": point.kv_cache_bytes,
            "visual_tokens": point.visual_tokens,
            "tokens_per_frame": point.visual_tokens / frames,
            "vit_frame_ms": [_median([run.vit_ms_per_frame[i] for run in runs]) for i in range(frames)],
        }
        if reference is not None:
            ref_point = reference.checkpoints[position]
            cosines = [_token_cosine(a, b) for a, b in zip(last.vit_outputs[:frames], reference.vit_outputs[:frames])]
            valid = [c for c in cosines if c is not None]
            row["vit_cosine"] = cosines if len(valid) == len(cosines) else None
            row["vit_cosine_mean"] = statistics.mean(valid) if row["vit_cosine"] else None
            row["vit_cosine_min"] = min(valid) if row["vit_cosine"] else None
            row["next_token_kl"] = statistics.mean(
                _kl(r, o) for r, o in zip(ref_point.first_token_logits, point.first_token_logits))
            row["answer_agreement"] = statistics.mean(
                float(r == o) for r, o in zip(ref_point.answers, point.answers))
        if baseline_rows is not None:
            base = baseline_rows[frames]
            row["vit_ratio"] = med["vit_ms"] / base["vit_ms"]
            row["prefill_ratio"] = med["prefill_ms"] / base["prefill_ms"]
            row["e2e_speedup"] = base["push_ms"] / med["push_ms"]
        rows.append(row)
    return rows


def load_video_frames(video: str, count: int) -> tuple[np.ndarray, list[float]]:
    """`count` uint8 frames [N, H, W, 3] spread evenly over a video file ('demo': the built-in
    street clip), with their timestamps."""
    from .vit import sample_clip

    frames = sample_clip(video, count)
    return np.stack([f.image for f in frames]), [f.timestamp for f in frames]


def unsupported_reason(variant: PipelineVariant, host: VideoHost) -> str | None:
    """Why `host` cannot run `variant` (None: it can). The Cacher needs a supported vision tower;
    ToMe and VisionZip work on LLaVA-OneVision's fixed SigLIP grid."""
    if variant.stc is not None and variant.stc.cacher is not None and not host.supports_cacher:
        return f"STC-Cacher does not support {type(host.vision_tower).__name__}"
    if variant.baseline in ("tome", "visionzip") and getattr(host, "pooled_side", None) is None:
        return f"{variant.baseline} needs a LLaVA-OneVision host"
    return None


def run_pipeline_benchmark(
    settings: PipelineSettings,
    variants: Sequence[PipelineVariant] = DEFAULT_PIPELINE_VARIANTS,
    questions: Sequence[tuple[str, tuple[str, ...] | None]] = DEFAULT_QUESTIONS,
    frames: tuple[np.ndarray, list[float]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every variant the model supports interleaved (see the module docstring); return the
    report dict (variants the host cannot run are listed under "skipped" with the reason)."""
    if not variants or not variants[0].uncompressed:
        raise ConfigError("the first variant must be the uncompressed one ('none'): ratios and fidelity refer to it")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must be unique, got {names}")
    if settings.model is not None:  # real weights with their tokenizer, template and processor config
        loaded = StreamingSession.from_pretrained(settings.model, stc=None, device=settings.device,
                                                  dtype=torch_dtype(settings.dtype))
        host, preprocessor = loaded.host, loaded.preprocessor
        model = loaded.model
    else:
        preset = get_preset(settings.preset)
        model = build_model(settings.preset, num_layers=settings.vit_layers, text_layers=settings.text_layers,
                            seed=settings.seed, dtype=torch_dtype(settings.dtype)).to(settings.device)
        host = host_for(model, tokenizer_for_config(model.config), preset.protocol)
        preprocessor = preset.preprocessor() if preset.preprocessor is not None else None
    skipped = {v.name: reason for v in variants if (reason := unsupported_reason(v, host)) is not None}
    variants = [v for v in variants if v.name not in skipped]
    checkpoints = sorted(set(settings.frames))
    images, stamps = frames if frames is not None else load_video_frames(settings.video, checkpoints[-1])
    if len(images) < checkpoints[-1]:
        raise ConfigError(f"{checkpoints[-1]} frames requested but only {len(images)} given")
    runners = [VariantRunner(v, host, settings, preprocessor) for v in variants]
    runs: dict[str, list[StreamRun]] = {v.name: [] for v in variants}
    warm = min(settings.warmup_frames, checkpoints[-1])
    for runner in runners:
        if warm:
            if progress:
                progress(f"warm-up {runner.variant.name}")
            runner.stream(images[:warm], stamps[:warm], [warm], questions[:1], keep_outputs=False)
    for repeat in range(settings.repeats):
        for runner in runners:
            if progress:
                progress(f"repeat {repeat + 1}/{settings.repeats}: {runner.variant.name}")
            keep = repeat == settings.repeats - 1
            runs[runner.variant.name].append(
                runner.stream(images, stamps, checkpoints, questions, keep_outputs=keep))
    reference = runs[variants[0].name][-1]
    baseline_rows = {row["frames"]: row for row in _summarise(variants[0], runs[variants[0].name], None, None)}
    rows = [row for v in variants for row in _summarise(v, runs[v.name], reference, baseline_rows)]
    return {
        "benchmark": "pipeline",
        "machine": machine_info(settings.device),
        "settings": {**asdict(settings), "frames": checkpoints},
        "model": {"preset": settings.model or settings.preset, "vision_layers": model.config.vision_config.num_hidden_layers,
                  "text_layers": model.config.text_config.num_hidden_layers,
                  "depth_override": settings.vit_layers is not None or settings.text_layers is not None},
        "questions": [{"question": q, "options": list(o) if o else None} for q, o in questions],
        "variants": [v.to_dict() for v in variants],
        "skipped": skipped,
        "note": PROXY_NOTE,
        "rows": rows,
    }


# -- output --------------------------------------------------------------------------------------

CSV_FIELDS = (
    "variant", "frames", "tokens_per_frame", "vit_ms_per_frame", "projector_pooling_ms", "prune_ms",
    "prefill_ms", "prefill_ms_per_frame", "ttft_ms", "decode_ms_per_token", "peak_memory_bytes", "kv_cache_bytes",
    "fps", "vit_ratio", "prefill_ratio", "e2e_speedup", "vit_cosine_mean", "vit_cosine_min", "next_token_kl",
    "answer_agreement",
)


def write_outputs(report: dict[str, Any], directory: Path) -> list[Path]:
    """report.json, report.csv (one row per variant and frame count) and, with matplotlib, two PNG plots."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "report.json", directory / "report.csv"]
    paths[0].write_text(json.dumps(report, indent=2))
    with paths[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report["rows"])
    try:
        paths.extend(_plots(report, directory))
    except ImportError:
        pass  # plots need the `plots` extra; JSON and CSV carry every number
    return paths


def _plots(report: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, names = report["rows"], [v["name"] for v in report["variants"]]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        frames = [r["frames"] for r in mine]
        axes[0].plot(frames, [r["push_ms"] / r["frames"] for r in mine], marker="o", label=name)
        axes[1].plot(frames, [r["prefill_ms"] for r in mine], marker="o", label=name)
    axes[0].set(xlabel="frames", ylabel="ms per frame (push, end to end)", title="latency vs frames")
    axes[1].set(xlabel="frames", ylabel="total pre-fill ms", title="LLM pre-fill vs frames")
    axes[1].legend(fontsize=7)
    figure.suptitle(_subtitle(report), fontsize=8)
    latency = directory / "latency_vs_frames.png"
    figure.tight_layout()
    figure.savefig(latency, dpi=120)
    plt.close(figure)

    last = max(r["frames"] for r in rows)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in (r for r in rows if r["frames"] == last):
        axes[0].scatter(row["e2e_speedup"], row["answer_agreement"])
        axes[0].annotate(row["variant"], (row["e2e_speedup"], row["answer_agreement"]), fontsize=7)
        axes[1].scatter(row["e2e_speedup"], row["next_token_kl"])
        axes[1].annotate(row["variant"], (row["e2e_speedup"], row["next_token_kl"]), fontsize=7)
    axes[0].set(xlabel=f"end-to-end speed-up at {last} frames", ylabel="greedy answer agreement",
                title="fidelity vs speed-up")
    axes[1].set(xlabel=f"end-to-end speed-up at {last} frames", ylabel="next-token KL (nats)",
                title="divergence vs speed-up")
    figure.suptitle(_subtitle(report) + " — " + PROXY_NOTE, fontsize=7)
    fidelity = directory / "fidelity_vs_speedup.png"
    figure.tight_layout()
    figure.savefig(fidelity, dpi=120)
    plt.close(figure)
    return [latency, fidelity]


def _subtitle(report: dict[str, Any]) -> str:
    model, machine = report["model"], report["machine"]
    return (f"{model['preset']} (vision {model['vision_layers']} layers, text {model['text_layers']} layers"
            f"{', depth override' if model['depth_override'] else ''}) on {machine.get('gpu') or machine['cpu']}, "
            f"{machine['torch_threads']} threads")


def print_report(report: dict[str, Any], console: Any) -> None:
    """One rich table per frame count (at least 150 columns wide when the output is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal and console.width < 150:
        console = Console(width=150)

    console.print(_subtitle(report))
    for frames in report["settings"]["frames"]:
        rows = [r for r in report["rows"] if r["frames"] == frames]
        stages = Table(title=f"{frames} frames: stages (totals over the stream unless per frame)")
        for column in ("variant", "tokens/frame", "ViT ms/frame", "proj+pool ms", "prune ms", "pre-fill ms",
                       "TTFT ms", "decode ms/token", "peak MB", "KV-cache MB", "frames/s"):
            stages.add_column(column, justify="left" if column == "variant" else "right")
        for row in rows:
            stages.add_row(
                row["variant"], f"{row['tokens_per_frame']:.0f}", f"{row['vit_ms_per_frame']:.1f}",
                f"{row['projector_pooling_ms']:.1f}", f"{row['prune_ms']:.1f}", f"{row['prefill_ms']:.1f}",
                f"{row['ttft_ms']:.1f}", f"{row['decode_ms_per_token']:.1f}", f"{row['peak_memory_bytes'] / 2**20:.0f}",
                f"{row['kv_cache_bytes'] / 2**20:.1f}", f"{row['fps']:.2f}",
            )
        console.print(stages)
        versus = Table(title=f"{frames} frames: against no compression")
        for column in ("variant", "ViT time ×", "pre-fill time ×", "end-to-end speed-up", "ViT cosine mean",
                       "ViT cosine min", "next-token KL", "answer agreement"):
            versus.add_column(column, justify="left" if column == "variant" else "right")
        for row in rows:
            cosine = ((f"{row['vit_cosine_mean']:.3f}", f"{row['vit_cosine_min']:.3f}")
                      if row.get("vit_cosine_mean") is not None else ("n/a", "n/a"))
            versus.add_row(row["variant"], f"{row['vit_ratio']:.3f}", f"{row['prefill_ratio']:.3f}",
                           f"{row['e2e_speedup']:.2f}", *cosine, f"{row['next_token_kl']:.4f}",
                           f"{row['answer_agreement']:.2f}")
        console.print(versus)
    for name, reason in report.get("skipped", {}).items():
        console.print(f"[yellow]skipped {name}: {reason}[/]")
    console.print(f"[dim]{report['note']}[/]")


__all__ = [
    "BASELINES", "DEFAULT_PIPELINE_VARIANTS", "DEFAULT_QUESTIONS", "VARIANTS_BY_NAME", "Checkpoint",
    "PipelineSettings", "PipelineVariant", "StreamRun", "VariantRunner", "load_video_frames", "print_report",
    "run_pipeline_benchmark", "unsupported_reason", "write_outputs",
]
