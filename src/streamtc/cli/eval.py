"""`streamtc eval`: run a benchmark with a VideoLLM (with or without STC), report and compare runs.

    streamtc eval run ovobench ovo_bench_new.json --videos data/ovo --output runs/ovo_stc.jsonl
    streamtc eval run ovobench ovo_bench_new.json --videos data/ovo --output runs/ovo_base.jsonl --no-stc --ray
    streamtc eval run ovobench ovo_bench_new.json --videos data/ovo --output runs/ovo_tome.jsonl --variant "tome 25%"
    streamtc eval run mlvu MLVU/data --videos data/mlvu/video --output runs/mlvu_paper.jsonl --protocol paper
    streamtc eval report runs/ovo_base.jsonl runs/ovo_stc.jsonl
    streamtc eval benchmarks

`--protocol official` (default) evaluates as each benchmark's own code does; `--protocol paper` as
the STC paper's host did (docs/evaluation.md). Ctrl-C stops a run; the same command resumes it.

`--ray` takes an optional address: bare `--ray` starts a local cluster on 127.0.0.1, `--ray auto` /
`--ray HOST:PORT` joins one (write `--ray=ADDRESS`, or put `--ray` after the positional
arguments, so that a positional argument is not read as its address).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand

from ..eval.benchmarks import BENCHMARKS, PAPER_OFFLINE_AVERAGE, PROTOCOLS, limit_videos, load_benchmark
from ..eval.report import check_comparable, load_run, render_comparison, render_run, render_timing
from ..factory import SessionSpec
from ..presets import DTYPE_NAMES
from .common import (
    CacherProfileOption, MemoryOption, OffloadBudgetOption, OffloadDirOption, RetrieveFramesOption, WindowTokensOption,
    cacher_profile, console, stc_setting,
)

if TYPE_CHECKING:
    from ..config import STCConfig
    from ..eval.datasets import Benchmark
    from ..eval.runner import EvalRun

eval_app = typer.Typer(help="Benchmark accuracy: OVO-Bench, StreamingBench, MLVU, EgoSchema, Video-MME.",
                       no_args_is_help=True)


class _OptionalRayAddress(TyperCommand):
    """Lets `--ray` stand alone (meaning a local cluster) or take an address."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        args = [("--ray=local" if a == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")) else a)
                for i, a in enumerate(args)]
        return super().parse_args(ctx, args)


@eval_app.command("run", cls=_OptionalRayAddress)
def run(
    benchmark: Annotated[str, typer.Argument(help=f"{', '.join(BENCHMARKS)}, or 'auto' (detect from the file)")],
    annotations: Annotated[Path, typer.Argument(help="Annotation file (or directory) in the benchmark's published "
                                                     "format; see docs/evaluation.md")],
    videos: Annotated[Path, typer.Option(help="Directory holding the benchmark's videos")],
    output: Annotated[Path, typer.Option(help="Results file (JSON lines); an existing one is resumed")],
    protocol: Annotated[str, typer.Option(help="official: each benchmark's own prompt, reply rule, clip rule and "
                                               "metric; paper: what the STC paper's host did")] = "official",
    model: Annotated[str | None, typer.Option(help="Real weights: a local directory or hub id (LLaVA-OneVision, "
                                                   "Qwen2-VL, Qwen2.5-VL). "
                                                   "Overrides --preset.")] = None,
    preset: Annotated[str, typer.Option(help="Built-in architecture with random weights (answers are meaningless)")]
    = "tiny-llava-ov",
    num_layers: Annotated[int | None, typer.Option(help="Vision tower depth override for presets")] = None,
    memory: MemoryOption = None,
    window_tokens: WindowTokensOption = None,
    retrieve_frames: RetrieveFramesOption = 64,
    offload_dir: OffloadDirOption = None,
    offload_budget: OffloadBudgetOption = None,
    seed: Annotated[int, typer.Option(help="Weight seed for presets")] = 0,
    no_stc: Annotated[bool, typer.Option("--no-stc", help="Evaluate the uncompressed model")] = False,
    config: Annotated[Path | None, typer.Option(help="JSON file with an STCConfig ({'cacher': {...}, 'pruner': "
                                                     "{...}}); default: --cacher's profile with the paper's Pruner")]
    = None,
    cacher: CacherProfileOption = None,
    variant: Annotated[str | None, typer.Option(help="A named variant in place of STC: a baseline (e.g. 'tome 25%'), "
                                                     "half of STC, ... (see `streamtc variants`)")] = None,
    fps: Annotated[float | None, typer.Option(help="Frames sampled per second of video (default: the model's "
                                                   "protocol rate where it has one, 2 for Qwen-VL / LiveCC; else 1 "
                                                   "for the online benchmarks, 0.5 for the offline ones)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit (greedy decoding)")] = 16,
    max_videos: Annotated[int | None, typer.Option(help="Only the first N videos (smoke runs)")] = None,
    option_logprobs: Annotated[bool, typer.Option("--option-logprobs", help="Also record each option letter's "
                                                  "log-probability (one extra pre-fill per question)")] = False,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="On resume, ask again the questions recorded "
                                               "with an error (video missing or unreadable)")] = False,
    ray: Annotated[str | None, typer.Option("--ray", metavar="[ADDRESS]", help="Shard videos over Ray actors; bare "
                                            "--ray starts a local cluster on 127.0.0.1, or give 'auto' / "
                                            "HOST:PORT")] = None,
    actors: Annotated[int | None, typer.Option(help="Ray actors (default: one per GPU; on CPUs, one per 4 CPUs)")]
    = None,
    device: Annotated[str, typer.Option(help="torch device (single process; Ray actors use a GPU when the "
                                              "cluster has them)")] = "cpu",
    dtype: Annotated[str, typer.Option(help=f"Model dtype: {', '.join(DTYPE_NAMES)}")] = "float32",
) -> None:
    """Stream every video of a benchmark through the model, asking each question when the stream
    reaches it; append one JSON line per answer to --output; print the benchmark's scores."""
    stc = _stc_choice(no_stc, config, cacher, variant, protocol)
    spec = SessionSpec(model=model, preset=preset, num_layers=num_layers, seed=seed, stc=stc, variant=variant,
                       dtype=dtype, memory=memory, window_tokens=window_tokens, retrieve_frames=retrieve_frames,
                       offload_dir=str(offload_dir) if offload_dir else None, offload_budget=offload_budget)
    loaded = limit_videos(load_benchmark(benchmark, annotations, videos), max_videos)
    if fps is None:  # the model's protocol rate wins over the benchmark's default: its prompt is built on it
        fps = spec.protocol_fps() or loaded.spec.default_fps
    from ..eval.runner import EvalRun  # imports torch: only once the arguments and annotations are sound
    from ..eval.streaming import EvalSettings

    settings = EvalSettings(fps=fps, max_new_tokens=max_new_tokens, option_logprobs=option_logprobs)
    if model is None:
        console.print(f"[yellow]preset {preset!r} has random weights: its answers are meaningless. "
                      "Use --model PATH_OR_ID for real weights.[/]")
    evaluation = EvalRun(loaded, spec, output, settings, protocol=protocol, device=device, retry_errors=retry_errors)
    _announce(evaluation, loaded, output, f"{loaded.spec.title}, {protocol} protocol", stc)
    console.print(f"{len(evaluation.jobs)} video(s), {evaluation.pending_questions} question(s) to ask at "
                  f"{settings.fps:g} fps" + (f" on Ray ({ray})" if ray else ""))
    summary = _answer_all(evaluation, loaded, output, ray, actors)
    report = load_run(output)
    render_run(console, report)
    render_timing(console, [report])
    if "submission" in summary:
        console.print(f"EgoSchema submission: {', '.join(summary['submission'])}")
    console.print(f"results: {output}")


def _stc_choice(no_stc: bool, config: Path | None, cacher: str | None, variant: str | None,
                protocol: str) -> STCConfig | None:
    """The STC setting `eval run` streams with (None: uncompressed or a named variant); refuses
    options that contradict each other and an unknown protocol."""
    if no_stc and (config is not None or cacher is not None):
        raise typer.BadParameter("--config and --cacher set up STC; drop --no-stc")
    if variant is not None and (no_stc or config is not None or cacher is not None):
        raise typer.BadParameter("--variant chooses the compression; drop --no-stc, --config and --cacher")
    if protocol not in PROTOCOLS:
        raise typer.BadParameter(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    # the paper protocol reproduces the paper, so its Cacher is the paper's unless asked otherwise
    return None if no_stc or variant is not None else stc_setting(cacher, config,
                                                                  "paper" if protocol == "paper" else "robust")


def _announce(evaluation: EvalRun, loaded: Benchmark, output: Path, title: str, stc: STCConfig | None) -> None:
    """Print what a run starts from: unreadable annotation records, the resumed answers, the
    benchmark, protocol and Cacher profile."""
    if loaded.problems:
        console.print(f"[yellow]{len(loaded.problems)} record(s) of the annotations cannot be read; each gets an "
                      "error line (scored wrong):[/]")
        for problem in loaded.problems[:10]:
            console.print(f"  {problem.message}")
    if evaluation.resumed:
        done = loaded.questions - evaluation.pending_questions
        console.print(f"resuming {output}: {done} of {loaded.questions} questions already answered, none asked again"
                      + (f" except {evaluation.retried} recorded with an error (--retry-errors)"
                         if evaluation.retried else ""))
    profile = cacher_profile(stc)
    console.print(title + (f", STC-Cacher {profile}" if profile else ""))


def _answer_all(evaluation: EvalRun, loaded: Benchmark, output: Path, ray: str | None,
                actors: int | None) -> dict[str, Any]:
    """Ask every pending question under a progress bar and return the run's summary; Ctrl-C says
    how many answers are saved and exits 130 (the same command resumes)."""
    answered = 0
    try:
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[video]}"), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            bar = progress.add_task("answering", total=evaluation.pending_questions, video="")

            def advance(record: dict[str, Any]) -> None:
                nonlocal answered
                if record["type"] == "answer":
                    answered += 1
                    progress.update(bar, advance=1, video=record["video"])

            return evaluation.run(ray_address=ray, actors=actors, on_record=advance)
    except KeyboardInterrupt:
        done = loaded.questions - evaluation.pending_questions + answered
        console.print(f"\n[yellow]interrupted: {done} of {loaded.questions} questions answered and saved in "
                      f"{output}.[/] Run the same command again to resume; answered questions are not asked again.")
        raise typer.Exit(130) from None


@eval_app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Results files; the first is the reference for retention")],
    json_output: Annotated[Path | None, typer.Option("--json", help="Also write the scores and timings here")] = None,
    allow_mixed_protocols: Annotated[bool, typer.Option("--allow-mixed-protocols", help="Compare runs of different "
                                                        "protocols (official / paper) anyway")] = False,
) -> None:
    """Print each run's score tables, then compare the runs side by side: accuracy, retention
    against the first run, and the cost of each. An incomplete run is reported as such (answered /
    total), its numbers marked partial."""
    reports = [load_run(path) for path in runs]
    if len(reports) > 1:
        check_comparable(reports, allow_mixed_protocols=allow_mixed_protocols)
    for item in reports:
        render_run(console, item)
    if len(reports) > 1:
        render_comparison(console, reports, allow_mixed_protocols=allow_mixed_protocols)
    else:
        render_timing(console, reports)
    if json_output is not None:
        json_output.parent.mkdir(parents=True, exist_ok=True)
        json_output.write_text(json.dumps([item.to_dict() for item in reports], indent=2))
        console.print(f"wrote {json_output}")


@eval_app.command()
def benchmarks() -> None:
    """List the supported benchmarks, their protocols and the paper's numbers."""
    table = Table(title="benchmarks")
    for column in ("name", "benchmark", "asked", "default fps", "official headline", "paper headline",
                   "paper: uncompressed / STC"):
        table.add_column(column)
    for spec in BENCHMARKS.values():
        paper = spec.paper or (PAPER_OFFLINE_AVERAGE if not spec.online else None)
        numbers = "-" if paper is None else f"{paper['uncompressed']} / {paper['stc']}" + (
            "" if spec.paper else " (offline avg)")
        table.add_row(spec.name, spec.title, "at its time" if spec.online else "after the video",
                      f"{spec.default_fps:g}", spec.protocols["official"].headline,
                      spec.protocols["paper"].headline, numbers)
    console.print(table)


__all__ = ["eval_app"]
