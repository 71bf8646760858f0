"""`streamtc run`: watch a video with a VideoLLM and answer questions at their timestamps.

The watching itself is `streamtc.watch` (sessions, frames, questions, the end of the stream); this
module checks the arguments, prints the watch's events and writes the `--output` record. Every
argument (times, sizes, the preset, the `--model` directory, the `--config` file, the video, that
`--output` can be written) is checked before a model is built; torch, transformers and the models
are imported only once the arguments are sound, so a refusal and `--help` answer at once.

`run` exit codes (also written as `status` / `exit_code` in the `--output` JSON):

    0    completed: every question was asked
    1    crashed: an unexpected error (traceback printed; the answers so far are in --output)
    2    bad arguments or input (nothing was streamed), or a streamtc error mid-stream
    3    source_failed: the video failed mid-way (decoding error, cut file); questions up to the
         failure were asked at their times, later ones at the last frame received, with a note
    4    ended_early: a live source stopped early (no data within --timeout, connection error);
         the remaining questions were asked on what was received, with a note
    130  interrupted: Ctrl-C (SIGINT); questions not yet asked are listed as unanswered

Every answer is written to `--output` as soon as it is given (the file is replaced atomically, so it
is valid JSON at any moment), and once more with the final status and statistics; a run refused
for its arguments or input (exit code 2 once the command line parsed) or stopped by Ctrl-C before
the stream started writes its record too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import STCConfig
from ..errors import ConfigError, InputError, StreamTCError
from ..watch import Answered, Note, Started, StreamWatch, TimedQuestion
from .common import (
    CacherProfileOption, MemoryOption, OffloadBudgetOption, OffloadDirOption, RetrieveFramesOption, WindowTokensOption,
    cacher_profile, check_model, check_preset, console, stc_setting,
)

if TYPE_CHECKING:
    from ..factory import SessionSpec
    from ..sources import VideoSource
    from ..watch import Event

# Exit codes of `run`, by the status written to --output (see the module docstring).
EXIT_CODES = {"completed": 0, "crashed": 1, "error": 2, "source_failed": 3, "ended_early": 4, "interrupted": 130}

DEMO_QUESTIONS = ["3:What is happening in the street?",
                  "8:How many people are riding bikes?|none|one|two|three or more"]
RESUMED_OPTIONS = ("compare", "no_stc", "config", "cacher", "variant", "memory", "window_tokens", "retrieve_frames",
                   "offload_dir", "offload_budget")  # settings a --resume takes from the save

# -- arguments ----------------------------------------------------------------------------------


def _parse_questions(specs: list[str] | None) -> list[TimedQuestion] | None:
    try:
        return None if specs is None else [TimedQuestion.parse(spec) for spec in specs]
    except InputError as error:
        raise typer.BadParameter(str(error)) from None


def _positive_seconds(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {value}")
    return value


def _seconds(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"must be a finite number >= 0, got {value}")
    return value


def _runnable_stc(stc: STCConfig | None, model_class: type) -> STCConfig | None:
    """`stc` without the Cacher when the model's vision tower has no Cacher support (a printed note):
    the demo command runs the Pruner alone there; the library raises instead."""
    from ..hosts import cacher_supports

    if stc is None or stc.cacher is None or cacher_supports(model_class):
        return stc
    console.print(f"[yellow]STC-Cacher does not support the vision tower of {model_class.__name__} yet: "
                  "running the STC-Pruner alone[/]")
    return dataclasses.replace(stc, cacher=None) if stc.pruner is not None else None


# -- the record ----------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What `run` has done so far; written to --output after every answer and at the end."""

    header: dict[str, Any]
    path: Path | None
    answers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    unanswered: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stream: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)
    status: str = "running"

    def write(self) -> None:
        """Replace the --output file atomically (a reader never sees half a file)."""
        if self.path is None:
            return
        record = {"status": self.status, "exit_code": EXIT_CODES.get(self.status), **self.header,
                  "stream": self.stream, "notes": self.notes, "answers": self.answers,
                  "unanswered": self.unanswered, "stats": self.stats, "ratios": self.ratios}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(json.dumps(record, indent=2))
        os.replace(partial, self.path)

    def start(self) -> None:
        """The first write: an --output that cannot be written is refused before anything is built."""
        try:
            self.write()
        except OSError as error:
            path, self.path = self.path, None  # nothing more is written there
            raise ConfigError(f"--output {path}: cannot be written ({error.strerror or error})") from None

    def stop(self, status: str, note: str, questions: list[TimedQuestion]) -> None:
        """End before the stream started (refused, or Ctrl-C): the reason, every question unasked."""
        self.status = status
        self.notes.append(note)
        self.unanswered = [{**q.to_dict(), "reason": note} for q in questions]
        self.write()

    def answer(self, event: Answered) -> dict[str, Any]:
        """Keep an answer (log-probabilities to 4 decimals) and write the record; returns its entry."""
        logprobs = event.option_logprobs and {letter: round(v, 4) for letter, v in event.option_logprobs.items()}
        entry = {"seconds": event.question.seconds, **event.answer.to_dict(), "option_logprobs": logprobs,
                 "note": event.note}
        self.answers[event.variant].append(entry)
        self.write()
        return entry

    def finish(self, watch: StreamWatch, status: str) -> None:
        """Final status, unasked questions, statistics and (with --compare) ratios, written to --output."""
        self.status = status
        reason = self.notes[-1] if self.notes else status
        self.unanswered = [{**q.to_dict(), "reason": reason} for q in watch.pending]
        self.stream = watch.stream_record(status)
        self.stats = watch.stats()
        self.ratios = watch.ratios()
        self.write()


# -- printing ------------------------------------------------------------------------------------


class _Screen:
    """Prints the watch's events as they come, keeping each in the record; the progress bar lives
    from the sessions' start to the end of the stream (in `stack`)."""

    def __init__(self, record: RunRecord, video: str, random_weights: bool, stack: ExitStack) -> None:
        self.record, self.video, self.random_weights, self.stack = record, video, random_weights, stack
        self.explained_empty = False
        self.bar: tuple[Progress, Any] | None = None

    def show(self, event: Event) -> None:
        if isinstance(event, Answered):
            self.answered(event)
        elif isinstance(event, Note):
            self.record.notes.append(event.text)
            console.print(f"[yellow]{escape(event.text)}; answering with what was received[/]")
        elif isinstance(event, Started):
            progress = self.stack.enter_context(Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(),
                TextColumn("{task.completed} frames · {task.fields[clock]}"), TimeElapsedColumn(), console=console,
                transient=True))
            self.bar = (progress, progress.add_task(f"streaming {self.video}", total=event.expected_frames,
                                                    clock="0.0 s"))
        elif self.bar is not None:  # Progress
            self.bar[0].update(self.bar[1], advance=event.pushed, clock=f"{event.timestamp:.1f} s")

    def answered(self, event: Answered) -> None:
        entry = self.record.answer(event)
        console.print(f"[bold]{event.question.seconds:>7.1f}s[/] {escape(f'[{event.variant}]')} "
                      f"Q: {escape(event.question.text)}\n          A: {event.answer.text!r} "
                      f"({event.answer.total_ms:.0f} ms)")
        if entry["option_logprobs"]:
            console.print("          option log-probabilities: " + ", ".join(
                f"{letter} {value:.3f}" for letter, value in entry["option_logprobs"].items()))
        if event.note:
            console.print(f"          [yellow]{escape(event.note)}[/]")
        if self.random_weights and event.empty_reason and not self.explained_empty:
            self.explained_empty = True
            console.print(f"          [dim](empty: {event.empty_reason}; a random-weight model rarely says anything "
                          "readable. Multiple-choice questions also record the option log-probabilities, which "
                          "show how STC changes the model's output.)[/]")


def _ratio_cell(ratio: dict[str, Any]) -> str:
    if ratio["ratio"] is None:
        return "-"
    if ratio["low"] == ratio["high"]:
        return f"{ratio['ratio']:.2f}×"
    text = f"{ratio['ratio']:.2f}× ({ratio['low']:.2f}–{ratio['high']:.2f})"
    return f"[dim]{text} within noise[/]" if ratio["noise"] else text


def _summary_row(stats: dict[str, Any], answers: list[dict[str, Any]]) -> list[str]:
    latency = [a["total_ms"] for a in answers]
    return [
        str(stats["frames"]),
        f"{stats['visual_tokens'] + stats['pending_tokens']} / {stats['visual_tokens_encoded']}",
        f"{stats['vit_ms_per_frame']:.1f}",
        f"{stats['prefill_ms_per_frame']:.1f}",
        f"{sum(latency) / len(latency):.0f}" if latency else "-",
    ]


def _print_summary(video: str, record: RunRecord, last_time: float, elapsed: float) -> None:
    if not record.stats:  # stopped before the models were built: an error was printed, or the note says why
        if record.status != "error":
            console.print(f"[yellow]{escape(record.notes[-1])}[/]")
        console.print(f"status: {record.status} (exit code {EXIT_CODES[record.status]})")
        return
    table = Table(title=f"{video}: {last_time:.1f} s of video in {elapsed:.1f} s")
    for column in ("variant", "frames", "visual tokens kept / encoded", "ViT ms/frame", "pre-fill ms/frame",
                   "answer ms"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, stats in record.stats.items():
        table.add_row(name, *_summary_row(stats, record.answers[name]))
    if record.ratios:
        base, fast = record.stats
        table.add_row(f"{fast} / {base}", "", _ratio_cell(record.ratios["visual_tokens"]),
                      _ratio_cell(record.ratios["vit_ms"]), _ratio_cell(record.ratios["prefill_ms"]), "")
    console.print(table)
    _print_vit_flops(record)
    profiles = {name: p for name, p in record.header.get("cacher_profile", {}).items() if p is not None}
    if profiles:
        console.print("[dim]STC-Cacher setting: " + ", ".join(f"{escape(name)} {p}" for name, p in profiles.items())
                      + " (robust: a FLOP budget spent where the video changes; paper: fixed N=2)[/]")
    if record.ratios:
        console.print("[dim]time ratios: frames timed in pairs (variants alternate per frame), 90% interval over "
                      "frames in brackets; 'within noise' when it contains 1×[/]")
    for name, stats in record.stats.items():
        console.print(f"memory {escape(f'[{name}]')}: {_memory_line(record.header['memory']['kind'], stats)}")
    for note in record.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    for item in record.unanswered:
        console.print(f"[yellow]not asked:[/] {item['seconds']:.1f}s {escape(item['question'])} ({item['reason']})")
    style = "green" if record.status == "completed" else "yellow"
    where = f"; answers in {record.path}" if record.path is not None else ""
    console.print(f"[{style}]status: {record.status} (exit code {EXIT_CODES[record.status]})[/]{where}")


def _print_vit_flops(record: RunRecord) -> None:
    """The encoder FLOPs of each variant with a Cacher, as a share of a full encode of the same frames;
    with --compare, why its frames took no less time when that happens: fixed per-frame work (token
    selection, gathers, the budget's checks) that a small tower's few milliseconds a frame cannot hide.
    On real-size towers the time ratio follows the FLOP ratio."""
    for name, stats in record.stats.items():
        if stats.get("cacher"):
            console.print(f"[dim]ViT FLOPs {escape(f'[{name}]')}: {stats['cacher']['flop_ratio']:.2f} of a full "
                          f"encode of the same frames ({_chunk_kinds(stats['cacher'])})[/]")
    if not record.ratios:
        return
    (base, base_stats), (fast, fast_stats) = record.stats.items()
    time = record.ratios["vit_ms"]["ratio"]
    if fast_stats.get("cacher") and fast_stats["cacher"]["flop_ratio"] < 1.0 and time is not None and time >= 1.0:
        console.print(f"[yellow]note:[/] {escape(fast)}'s ViT did fewer FLOPs than {escape(base)}'s but took "
                      f"{time:.2f}× its time: at {base_stats['vit_ms_per_frame']:.1f} ms a frame, the Cacher's "
                      "fixed per-frame work outweighs the FLOPs it saves; with real-size towers the time ratio "
                      "follows the FLOP ratio (docs/benchmarks.md)")


def _chunk_kinds(cacher: dict[str, Any]) -> str:
    """How the Cacher encoded a variant's chunks: refreshed, reused, downscaled or subsampled, and
    how many reuses its check rejected (those chunks were encoded again)."""
    encoded = {"refreshed": cacher["refresh_chunks"], "downscaled": cacher["downscaled_chunks"],
               "subsampled": cacher["subsampled_chunks"]}
    kinds = {"refreshed": encoded["refreshed"], "reused": cacher["chunks"] - sum(encoded.values()), **encoded}
    text = ", ".join(f"{count} {kind}" for kind, count in kinds.items() if count or kind != "subsampled")
    rejected = cacher.get("failed_reuses", 0)
    plural = "s" if rejected != 1 else ""
    return f"chunks: {text}" + (f"; {rejected} reuse{plural} rejected by the check and encoded again" if rejected else "")


def _memory_line(kind: str, stats: dict[str, Any]) -> str:
    """One line on a variant's memory: tokens and KV bytes held, and for retrieval memory the window,
    the offloaded blocks, their bytes in host memory and on disk, and the retrieval time per question."""
    line = f"{kind}, {stats['cache_tokens']} tokens in the cache ({stats['kv_cache_bytes'] / 2**20:.2f} MiB of KV)"
    memory = stats.get("memory")
    if memory:
        line += (f"; window {memory['window_tokens']} tokens ({memory['window_frames']} frames), "
                 f"{memory['offloaded_blocks']} blocks offloaded ({memory['host_bytes'] / 2**20:.2f} MiB in host "
                 f"memory, {memory['disk_bytes'] / 2**20:.2f} MiB on disk"
                 + (f", {memory['deleted_blocks']} deleted by the budget" if memory["deleted_blocks"] else "")
                 + (f", {memory['lost_blocks']} lost to disk faults" if memory["lost_blocks"] else "")
                 + f"), retrieval {memory['retrieval_ms_per_question']:.1f} ms per question")
    return line


# -- run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """The parsed command line of `run` (its parameters by name) and which of them were given."""

    video: str
    model: str | None
    preset: str
    ask: list[TimedQuestion] | None
    no_stc: bool
    compare: bool
    variant: str | None
    fps: float | None
    max_seconds: float | None
    num_layers: int | None
    max_new_tokens: int
    config: Path | None
    cacher: str | None
    device: str
    memory: str | None
    window_tokens: int | None
    retrieve_frames: int
    offload_dir: Path | None
    offload_budget: int | None
    timeout: float
    output: Path | None
    save: Path | None
    resume: Path | None
    given: frozenset[str] = frozenset()

    @property
    def live(self) -> bool:
        """A network stream or a camera (opened once the models are built), not a file."""
        from ..sources import NETWORK_SCHEMES

        return urlsplit(self.video).scheme.lower() in NETWORK_SCHEMES or self.video.isdigit()


@dataclass
class RunPlan:
    """What the checked arguments resolve to: the variants' specs, the sampling rate and the source
    (open, or how to open it once the models are built)."""

    specs: dict[str, SessionSpec]
    fps: float
    source: VideoSource | Callable[[], VideoSource]


def run(
    ctx: typer.Context,
    video: Annotated[str, typer.Argument(help="Video file, stream URL (rtsp/tcp/udp/http), webcam index, or 'demo' "
                                              "for the built-in street clip")] = "demo",
    model: Annotated[str | None, typer.Option(help="Real weights: a local directory or hub id "
                                                   "(LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL). Overrides --preset.")] = None,
    preset: Annotated[str, typer.Option(help="Built-in architecture with random weights (see `streamtc presets`)")]
    = "tiny-llava-ov",
    ask: Annotated[list[str] | None, typer.Option(
        help="'SECONDS:QUESTION' (or 'SECONDS:QUESTION|OPTION|OPTION...' for multiple choice), asked when the "
             "stream reaches SECONDS; repeatable", callback=_parse_questions)] = None,
    no_stc: Annotated[bool, typer.Option("--no-stc", help="Run the uncompressed model only")] = False,
    compare: Annotated[bool, typer.Option(help="Run the uncompressed model and STC (or --variant) on the same "
                                               "frames")] = False,
    variant: Annotated[str | None, typer.Option(help="A named variant in place of STC: a baseline (e.g. 'tome 25%'), "
                                                     "half of STC, ... (see `streamtc variants`)")] = None,
    fps: Annotated[float | None, typer.Option(
        help="Frames sampled per second of video (default: the model's protocol: 1 for LLaVA-OneVision, 2 for "
             "Qwen-VL / LiveCC)", callback=_positive_seconds)] = None,
    max_seconds: Annotated[float | None, typer.Option(help="Stop after this much video time", callback=_seconds)]
    = None,
    num_layers: Annotated[int | None, typer.Option(help="Vision tower depth override for presets", min=1)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit", min=1)] = 32,
    config: Annotated[Path | None, typer.Option(help="JSON file with an STCConfig ({'cacher': {...}, 'pruner': "
                                                     "{...}})")] = None,
    cacher: CacherProfileOption = None,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    memory: MemoryOption = None,
    window_tokens: WindowTokensOption = None,
    retrieve_frames: RetrieveFramesOption = 64,
    offload_dir: OffloadDirOption = None,
    offload_budget: OffloadBudgetOption = None,
    timeout: Annotated[float, typer.Option(help="Network streams: seconds to wait for the stream to open and "
                                                "for each read before it counts as stalled",
                                           callback=_positive_seconds)] = 10.0,
    output: Annotated[Path | None, typer.Option(help="Write answers, stats and the config as JSON here (after "
                                                     "every answer, and at the end with the exit status)")] = None,
    save: Annotated[Path | None, typer.Option(help="Save each variant's stream (its whole memory) under this "
                                                   "directory when the run stops, for --resume")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the streams a `--save` run saved here (same "
                                                     "--model / --preset; STC and memory settings as saved): a "
                                                     "file's frames up to the saved time are skipped, a live "
                                                     "stream's clock continues after it")] = None,
) -> None:
    """Stream a video through a VideoLLM with STC and answer questions at their timestamps.

    Exit codes: 0 completed, 1 crashed, 2 bad input or error, 3 the video failed mid-way,
    4 a live stream ended early, 130 interrupted (Ctrl-C); answers given so far are kept in
    --output in every case."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    given = frozenset(name for name, source in sources.items() if source is not None and source.name == "COMMANDLINE")
    options = RunOptions(**ctx.params, given=given)
    questions = ask if ask is not None else (_parse_questions(DEMO_QUESTIONS) if video == "demo" else [])
    questions = sorted(questions, key=lambda q: q.seconds)
    record = RunRecord(header=_header(options, questions), path=output)
    try:
        record.start()
        plan = _plan(options, record)
    except (StreamTCError, typer.BadParameter) as error:
        record.stop("error", f"refused before the stream started: {error}", questions)
        raise
    except KeyboardInterrupt:
        record.stop("interrupted", "interrupted (Ctrl-C) before the stream started", questions)
        console.print("[yellow]interrupted (Ctrl-C) before the stream started[/]")
        console.print(f"status: interrupted (exit code {EXIT_CODES['interrupted']})")
        raise typer.Exit(EXIT_CODES["interrupted"]) from None
    raise typer.Exit(EXIT_CODES[_watch(plan, options, questions, record)])


def _header(options: RunOptions, questions: list[TimedQuestion]) -> dict[str, Any]:
    """The record's settings as given; `_plan` fills in what they resolve to (rate, STC, a save's memory)."""
    return {"video": options.video, "model": options.model or options.preset, "fps": options.fps,
            "window_tokens": options.window_tokens,
            "memory": {"kind": options.memory, "window_tokens": options.window_tokens,
                       "retrieve_frames": options.retrieve_frames,
                       "offload_dir": None if options.offload_dir is None else str(options.offload_dir),
                       "offload_budget": options.offload_budget},
            "questions": [q.to_dict() for q in questions], "variant": options.variant, "stc": {}}


def _plan(o: RunOptions, record: RunRecord) -> RunPlan:
    """Check every argument, cheapest first (nothing heavy is imported before the video is checked),
    and resolve them into the variants to run; completes the record's header."""
    if o.compare and o.no_stc:
        raise typer.BadParameter("--compare already runs the uncompressed model; drop --no-stc")
    if o.variant is not None and (o.no_stc or o.config is not None):
        raise typer.BadParameter("--variant chooses the compression; drop --no-stc and --config")
    if o.resume is not None and (refused := [name for name in RESUMED_OPTIONS if name in o.given]):
        raise typer.BadParameter("--resume continues the saved variants with their saved STC and memory settings; "
                                 f"drop {', '.join('--' + name.replace('_', '-') for name in refused)}")
    stc = stc_setting(o.cacher, o.config)
    if o.variant is not None:
        from ..variants import get_variant

        get_variant(o.variant)  # a typo fails before anything is loaded
    if o.model is not None:
        check_model(o.model)
    else:
        check_preset(o.preset)  # the preset table imports nothing: this is quick
    from ..sources import open_source

    if not o.live:  # a missing file, a directory, a bad URL, not a video: refused before transformers is
        open_source(o.video).close()  # imported for the default rate (opened again at the rate below)
    from ..factory import SessionSpec

    base = SessionSpec(model=o.model, preset=o.preset, num_layers=o.num_layers, window_tokens=o.window_tokens,
                       memory=o.memory or ("window" if o.window_tokens is not None else "full"),
                       retrieve_frames=o.retrieve_frames,
                       offload_dir=None if o.offload_dir is None else str(o.offload_dir),
                       offload_budget=o.offload_budget)
    fps = o.fps or base.host_class().default_fps  # default: the model's protocol sets the rate
    specs = _specs(o, base, _runnable_stc(stc, base.model_class()), record)
    from ..measure import environment

    def open_video() -> VideoSource:
        timeouts = {"open_timeout": o.timeout, "read_timeout": o.timeout} if o.live and not o.video.isdigit() else {}
        return open_source(o.video, fps=fps, max_seconds=o.max_seconds, **timeouts)

    header = record.header
    header.update(fps=fps, stc={name: (None if s.stc is None else s.stc.to_dict()) for name, s in specs.items()},
                  cacher_profile={name: cacher_profile(s.stc) for name, s in specs.items()})
    settings = {**header, "num_layers": o.num_layers, "device": o.device, "max_new_tokens": o.max_new_tokens}
    header["environment"] = environment(o.device, settings)
    record.answers = {name: [] for name in specs}
    record.write()
    # a file is opened now, a live stream or camera once the models are built (its frames would pile up)
    return RunPlan(specs, fps, open_video if o.live else open_video())


def _specs(o: RunOptions, base: SessionSpec, stc: STCConfig | None, record: RunRecord) -> dict[str, SessionSpec]:
    """The variants to run: the uncompressed model and/or STC (or --variant), or a save's variants
    with the STC and memory settings they were saved with (recorded as such)."""
    if o.resume is not None:
        from ..watch import saved_memory, saved_stc, saved_variants

        saved = saved_variants(o.resume)
        memory = saved_memory(next(iter(saved.values())))
        record.header.update(window_tokens=memory["window_tokens"], memory=memory)
        return {name: dataclasses.replace(base, stc=saved_stc(settings)) for name, settings in saved.items()}
    record.header["memory"]["kind"] = base.memory
    compressed = ({o.variant: dataclasses.replace(base, variant=o.variant)} if o.variant is not None
                  else {"STC": dataclasses.replace(base, stc=stc)})
    return {"no STC": base, **compressed} if o.compare else ({"no STC": base} if o.no_stc else compressed)


def _watch(plan: RunPlan, o: RunOptions, questions: list[TimedQuestion], record: RunRecord) -> str:
    """Watch the stream, printing the events; returns the final status. Every way out (end, source
    failure, stall, Ctrl-C, error) prints the summary and writes the record."""
    started = time.perf_counter()
    random_weights = o.model is None
    status = "completed"
    ctrl_c = _CtrlC()
    watch = StreamWatch(plan.specs, questions, device=o.device, max_new_tokens=o.max_new_tokens,
                        check=ctrl_c.check, resume=o.resume, live=o.live, interval=1.0 / plan.fps)
    try:
        ctrl_c.install()
        if random_weights:
            console.print(f"[yellow]preset {o.preset!r} has random weights: answers are meaningless (often empty). "
                          "Use --model PATH_OR_ID for real weights.[/]")
        with ExitStack() as stack:
            screen = _Screen(record, o.video, random_weights, stack)
            for event in watch.events(plan.source):
                screen.show(event)
        status = watch.status
    except KeyboardInterrupt:
        status = "interrupted"
        record.notes.append(f"interrupted (Ctrl-C) after {watch.where()}")
    except StreamTCError as error:
        status = "error"
        record.notes.append(f"stopped by an error after {watch.where()}: {error}")
        console.print(f"[red]error:[/] {escape(str(error))}")
    except BaseException:
        record.status = "crashed"
        record.unanswered = [{**q.to_dict(), "reason": "the run crashed"} for q in watch.pending]
        record.write()
        watch.close()
        raise
    finally:
        ctrl_c.uninstall()
    with _sigint_deferred():  # a Ctrl-C now would only lose the summary: finish it first
        record.finish(watch, status)
        if o.save is not None and watch.sessions:
            record.notes.append(watch.save(o.save, status))
            record.write()
        _print_summary(o.video, record, watch.last_time, time.perf_counter() - started)
        watch.close()
    return status


class _CtrlC:
    """Ctrl-C (SIGINT) that cannot be lost: it raises KeyboardInterrupt where it lands, as usual,
    and is also remembered, so that `check()` raises again if library code swallowed it (some
    optional imports catch everything). Main thread only; elsewhere a no-op."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Run the block to its end even if Ctrl-C comes meanwhile (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["EXIT_CODES", "RunRecord", "run"]
