"""`streamtc run`: watch a video with a VideoLLM and answer questions at their timestamps.

`run` checks every argument (times, sizes, the preset, the `--model` directory, the `--config`
file, the video) before it builds a model; torch, transformers and the models are imported only
once the arguments are sound.

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
is valid JSON at any moment), and once more with the final status and statistics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import STCConfig
from ..errors import ConfigError, StreamTCError, VideoSourceError
from .common import (
    MemoryOption, OffloadBudgetOption, OffloadDirOption, RetrieveFramesOption, WindowTokensOption, console,
    read_stc_config,
)

if TYPE_CHECKING:
    from ..factory import SessionSpec
    from ..session import Answer, StreamingSession
    from ..sources import Frame, VideoSource

# Exit codes of `run`, by the status written to --output (see the module docstring).
EXIT_CODES = {"completed": 0, "crashed": 1, "error": 2, "source_failed": 3, "ended_early": 4, "interrupted": 130}

DEMO_QUESTIONS = ["3:What is happening in the street?",
                  "8:How many people are riding bikes?|none|one|two|three or more"]

# -- arguments ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimedQuestion:
    """A question to ask when the stream reaches `seconds`; `options` make it multiple choice."""

    seconds: float
    text: str
    options: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> TimedQuestion:
        """'SECONDS:QUESTION' or 'SECONDS:QUESTION|OPTION|OPTION...'."""
        seconds, sep, rest = spec.partition(":")
        text, *options = (part.strip() for part in rest.split("|"))
        try:
            value = float(seconds)
        except ValueError:
            value = None
        if not sep or value is None or not text or not all(options):
            raise typer.BadParameter(f"--ask takes 'SECONDS:QUESTION' or 'SECONDS:QUESTION|OPTION|OPTION...' "
                                     f"(e.g. '12:What is he holding?'), got {spec!r}")
        if not math.isfinite(value) or value < 0:
            raise typer.BadParameter(f"the time of --ask {spec!r} must be a finite number of seconds >= 0, "
                                     f"got {seconds.strip()!r}")
        if len(options) == 1:
            raise typer.BadParameter(f"--ask {spec!r}: a multiple-choice question needs two options or more")
        return cls(value, text, tuple(options))

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "question": self.text, "options": list(self.options) or None}


def _parse_questions(specs: list[str] | None) -> list[TimedQuestion] | None:
    return None if specs is None else [TimedQuestion.parse(spec) for spec in specs]


def _positive_seconds(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {value}")
    return value


def _seconds(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"must be a finite number >= 0, got {value}")
    return value


def _check_preset(name: str) -> None:
    """Refuse a preset `run` cannot stream, listing the ones it can (those with a language model)."""
    from ..presets import PRESETS

    runnable = [name for name, preset in PRESETS.items() if preset.is_video_llm]
    if name not in runnable:
        kind = "is a vision tower only (for `bench vit`)" if name in PRESETS else "is not a preset"
        raise ConfigError(f"--preset {name!r} {kind}; `run` takes: {', '.join(runnable)}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds."""
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_model(model: str) -> None:
    """A --model directory must hold a saved model; a hub id must be downloadable or cached.

    Without a network, transformers retries the hub for half a minute before it fails; here a
    missing hub fails at once with what to do, and a cached copy is used offline."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--model {model}: is a file; give the directory written by save_pretrained")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {model}: no config.json in this directory; give a directory written by "
                              "save_pretrained (config.json, weights, tokenizer and processor files) or a hub id")
        return
    parts = model.split("/")
    if model.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts):
        raise ConfigError(f"--model {model}: no such directory (and not a hub id such as ORG/NAME)")
    if _hub_reachable():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        constants.HF_HUB_OFFLINE = True  # the hub is unreachable: read the cached copy without retrying
        console.print(f"[yellow]the Hugging Face hub cannot be reached: using the cached copy of {model}[/]")
        return
    raise ConfigError(f"--model {model}: not a local directory, and the Hugging Face hub ({constants.ENDPOINT}) "
                      "cannot be reached to download it. Download it where there is a network (`hf download "
                      f"{model} --local-dir DIR`) and pass --model DIR, or run a built-in --preset")


def _runnable_stc(stc: STCConfig | None, model_class: type) -> STCConfig | None:
    """`stc` without the Cacher when the model's vision tower has no Cacher support (a printed note):
    the demo command runs the Pruner alone there; the library raises instead."""
    from ..hosts import cacher_supports

    if stc is None or stc.cacher is None or cacher_supports(model_class):
        return stc
    console.print(f"[yellow]STC-Cacher does not support the vision tower of {model_class.__name__} yet: "
                  "running the STC-Pruner alone[/]")
    return dataclasses.replace(stc, cacher=None) if stc.pruner is not None else None


def _session(spec: SessionSpec, device: str) -> StreamingSession:
    try:
        return spec.build(device)
    except StreamTCError:
        raise
    except (OSError, ValueError) as error:  # transformers' loading errors: name the model, keep it to one line
        raise ConfigError(f"--model {spec.model}: cannot be loaded ({str(error).splitlines()[0]})") from None


VARIANT_FOLDERS = {"no STC": "no-stc", "STC": "stc"}  # --save DIR/<folder>, one save per variant


def _saved_variants(directory: Path) -> dict[str, STCConfig | None]:
    """The variants saved by `run --save` in `directory` and their STC settings (verified saves)."""
    from ..memory.persist import open_snapshot, read_json

    found = {}
    for name, folder in VARIANT_FOLDERS.items():
        if (directory / folder).is_dir():
            stc = read_json(open_snapshot(directory / folder) / "session.json")["settings"]["stc"]
            found[name] = None if stc is None else STCConfig.from_dict(stc)
    if not found:
        raise ConfigError(f"--resume {directory}: no stream saved by `run --save` there "
                          f"(no {' or '.join(VARIANT_FOLDERS.values())} folder)")
    return found


def _restored_session(path: Path, spec: SessionSpec, device: str) -> StreamingSession:
    """A session continuing the stream saved at `path`, on the same model built again."""
    from ..presets import build_model, load_pretrained
    from ..session import StreamingSession, load_tokenizer

    if spec.model is None:
        return StreamingSession.restore(path, build_model(spec.preset, num_layers=spec.num_layers).to(device))
    return StreamingSession.restore(path, load_pretrained(spec.model).to(device), load_tokenizer(spec.model))


def _after_resume(frames: Iterable[Frame], resumed_at: float, live: bool, interval: float) -> Iterator[Frame]:
    """A resumed stream's frames: a file's from after the saved time; a live source's (whose clock
    restarts at 0) shifted to run on after it."""
    for frame in frames:
        if live:
            yield dataclasses.replace(frame, timestamp=frame.timestamp + resumed_at + interval)
        elif frame.timestamp > resumed_at + 1e-9:
            yield frame

# -- the run: its record, its summary -----------------------------------------------------------


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


def _option_logprobs(session: StreamingSession, question: TimedQuestion) -> dict[str, float] | None:
    """Log-probabilities of the option letters as the first answer token (multiple choice only)."""
    if not question.options:
        return None
    import torch

    from ..prompts import option_letter_token_ids

    log_softmax = torch.log_softmax(session.next_token_logits(question.text, question.options), dim=-1)
    return {letter: round(float(log_softmax[i]), 4)
            for letter, i in option_letter_token_ids(session.tokenizer, len(question.options)).items()}


def _empty_answer_reason(session: StreamingSession, answer: Answer) -> str:
    """Why an answer's text is empty: a stop token first, or tokens that print as nothing."""
    if not answer.token_ids:
        return "the model's first token was its stop token"
    if session.tokenizer.decode(answer.token_ids, skip_special_tokens=True):
        return f"its {len(answer.token_ids)} tokens decode to whitespace only"
    return f"its {len(answer.token_ids)} tokens are special tokens, which are not printed"


def paired_ratio(base: list[float], fast: list[float], resamples: int = 400) -> dict[str, Any]:
    """Ratio sum(fast) / sum(base) over frames timed in pairs, with a 90% bootstrap interval over
    the frames; `noise` is True when the interval contains 1 (no difference shown by this run)."""
    if len(base) != len(fast):
        raise ValueError(f"paired timings need as many frames on both sides, got {len(base)} and {len(fast)}")
    if not base or sum(base) <= 0:
        return {"ratio": None, "low": None, "high": None, "noise": True, "frames": len(base)}
    ratio = sum(fast) / sum(base)
    rng = random.Random(0)
    count = len(base)
    draws = []
    for _ in range(resamples):
        picks = [rng.randrange(count) for _ in range(count)]
        denominator = sum(base[i] for i in picks)
        if denominator > 0:
            draws.append(sum(fast[i] for i in picks) / denominator)
    draws.sort()
    low, high = draws[int(0.05 * len(draws))], draws[int(0.95 * len(draws)) - 1]
    return {"ratio": ratio, "low": low, "high": high, "noise": count < 3 or low <= 1.0 <= high, "frames": count}


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


def run(
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
    if compare and no_stc:
        raise typer.BadParameter("--compare already runs the uncompressed model; drop --no-stc")
    if variant is not None and (no_stc or config is not None):
        raise typer.BadParameter("--variant chooses the compression; drop --no-stc and --config")
    if resume is not None and (compare or no_stc or config is not None or window_tokens is not None
                               or variant is not None):
        raise typer.BadParameter("--resume continues the saved variants with their saved STC and memory "
                                 "settings; drop --compare, --no-stc, --config, --variant and --window-tokens")
    questions = ask if ask is not None else (_parse_questions(DEMO_QUESTIONS) if video == "demo" else [])
    questions = sorted(questions, key=lambda q: q.seconds)
    try:
        stc = read_stc_config(config) if config is not None else STCConfig()
        if variant is not None:
            from ..variants import get_variant

            get_variant(variant)  # a typo fails before anything is loaded
        if model is not None:
            _check_model(model)
        else:
            _check_preset(preset)  # the preset table imports nothing: this is quick
        from ..factory import SessionSpec
        from ..sources import NETWORK_SCHEMES, open_source

        memory = memory or ("window" if window_tokens is not None else "full")
        base = SessionSpec(model=model, preset=preset, num_layers=num_layers, window_tokens=window_tokens,
                           memory=memory, retrieve_frames=retrieve_frames,
                           offload_dir=None if offload_dir is None else str(offload_dir), offload_budget=offload_budget)
        network = urlsplit(video).scheme.lower() in NETWORK_SCHEMES
        timeouts = {"open_timeout": timeout, "read_timeout": timeout} if network else {}
        if fps is None:  # the model's protocol sets the rate
            fps = base.host_class().default_fps

        def open_video() -> VideoSource:
            return open_source(video, fps=fps, max_seconds=max_seconds, **timeouts)

        # A file is opened now, so that a bad one is refused at once; a live stream or camera once
        # the models are built, so that its frames do not pile up meanwhile.
        source = None if network or video.isdigit() else open_video()
        try:
            stc = _runnable_stc(stc, base.model_class())
            saved = None if resume is None else _saved_variants(resume)
        except BaseException:
            if source is not None:
                source.close()
            raise
    except KeyboardInterrupt:
        console.print("[yellow]interrupted (Ctrl-C) before the stream started[/]")
        raise typer.Exit(EXIT_CODES["interrupted"]) from None
    compressed = ({variant: dataclasses.replace(base, variant=variant)} if variant is not None
                  else {"STC": dataclasses.replace(base, stc=stc)})
    specs = {"no STC": base, **compressed} if compare else ({"no STC": base} if no_stc else compressed)
    if saved is not None:
        specs = {name: dataclasses.replace(base, stc=cfg) for name, cfg in saved.items()}
    from ..measure import environment

    header = {"video": video, "model": model or preset, "fps": fps, "window_tokens": window_tokens,
              "memory": {"kind": memory, "window_tokens": window_tokens, "retrieve_frames": retrieve_frames,
                         "offload_dir": None if offload_dir is None else str(offload_dir),
                         "offload_budget": offload_budget},
              "questions": [q.to_dict() for q in questions], "variant": variant,
              "stc": {name: (None if spec.stc is None else spec.stc.to_dict()) for name, spec in specs.items()}}
    settings = {**header, "num_layers": num_layers, "device": device, "max_new_tokens": max_new_tokens}
    record = RunRecord(header={**header, "environment": environment(device, settings)}, path=output,
                       answers={name: [] for name in specs})
    status = _stream(source or open_video, video, specs, questions, record, device=device,
                     max_new_tokens=max_new_tokens, save=save, resume=resume, live=network or video.isdigit())
    raise typer.Exit(EXIT_CODES[status])


def _stream(video_source: VideoSource | Callable[[], VideoSource], video: str, specs: dict[str, SessionSpec],
            questions: list[TimedQuestion], record: RunRecord, *, device: str, max_new_tokens: int,
            save: Path | None = None, resume: Path | None = None, live: bool = False) -> str:
    """Build the sessions, stream the frames, ask the questions (`streamtc.loop`, inclusive: a
    question at t sees the frame at t); returns the final status. Every way out (end, source
    failure, stall, Ctrl-C, error) prints the summary and writes the record.
    video_source: the open source, or how to open it once the models are built (live streams).
    save / resume: `--save` / `--resume` directories; a resumed file skips the frames up to the
    saved time, a resumed live source keeps its clock running after it (live)."""
    from ..loop import TIME_TOLERANCE, StreamLoop

    source = None if callable(video_source) else video_source
    started = time.perf_counter()
    sessions: dict[str, StreamingSession] = {}
    costs: dict[str, dict[str, list[float]]] = {name: {"vit_ms": [], "prefill_ms": []} for name in specs}
    random_weights = next(iter(specs.values())).model is None
    explained_empty = False
    bar: tuple[Progress, Any] | None = None  # the progress bar and its task, once shown

    def push(frames: list[Frame]) -> None:
        (frame,) = frames
        ctrl_c.check()
        names = list(sessions) if loop.frames_pushed % 2 == 0 else list(reversed(sessions))  # alternate order
        for name in names:
            before = sessions[name].stats
            sessions[name].push(frame.image[None], [frame.timestamp])
            after = sessions[name].stats
            costs[name]["vit_ms"].append(after.vit_ms - before.vit_ms)
            costs[name]["prefill_ms"].append(after.prefill_ms - before.prefill_ms)
        if bar is not None:
            bar[0].update(bar[1], advance=1, clock=f"{frame.timestamp:.1f} s")

    loop = StreamLoop([q.seconds for q in questions], push, chunk_frames=1, inclusive=True)

    def ask_question(question: TimedQuestion, note: str | None = None) -> None:
        nonlocal explained_empty
        for name, session in sessions.items():
            ctrl_c.check()
            answer = session.ask(question.text, options=question.options or None, max_new_tokens=max_new_tokens)
            entry = {"seconds": question.seconds, **answer.to_dict(),
                     "option_logprobs": _option_logprobs(session, question), "note": note}
            record.answers[name].append(entry)
            console.print(f"[bold]{question.seconds:>7.1f}s[/] {escape(f'[{name}]')} Q: {escape(question.text)}\n"
                          f"          A: {answer.text!r} ({answer.total_ms:.0f} ms)")
            if entry["option_logprobs"]:
                console.print("          option log-probabilities: " + ", ".join(
                    f"{letter} {value:.3f}" for letter, value in entry["option_logprobs"].items()))
            if note:
                console.print(f"          [yellow]{escape(note)}[/]")
            if random_weights and not answer.text and not explained_empty:
                explained_empty = True
                console.print(f"          [dim](empty: {_empty_answer_reason(session, answer)}; a random-weight model "
                              "rarely says anything readable. Multiple-choice questions also record the option "
                              "log-probabilities, which show how STC changes the model's output.)[/]")
            record.write()

    status, failure = "completed", None
    ctrl_c = _CtrlC()
    try:
        ctrl_c.install()
        record.write()
        if random_weights:
            preset = next(iter(specs.values())).preset
            console.print(f"[yellow]preset {preset!r} has random weights: answers are meaningless (often empty). "
                          "Use --model PATH_OR_ID for real weights.[/]")
        if resume is None:
            sessions.update({name: _session(spec, device) for name, spec in specs.items()})
        else:
            sessions.update({name: _restored_session(resume / VARIANT_FOLDERS[name], spec, device)
                             for name, spec in specs.items()})
        resumed_at = max((s.last_timestamp for s in sessions.values() if s.last_timestamp is not None), default=None)
        source = source or video_source()
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                      TextColumn("{task.completed} frames · {task.fields[clock]}"), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task(f"streaming {video}", total=source.expected_frames, clock="0.0 s")
            bar = (progress, task)
            due = loop.play(source if resumed_at is None else
                            _after_resume(source, resumed_at, live, 1.0 / record.header["fps"]))
            while True:
                try:
                    index = next(due)
                except StopIteration:
                    break
                except VideoSourceError as error:
                    status, failure = "source_failed", str(error)
                    break
                ask_question(questions[index])
        frames_read, last_time = loop.frames_pushed, loop.last_time or 0.0
        if status == "completed" and source.ended_early:
            status, failure = "ended_early", source.error
        if failure is not None:
            record.notes.append(f"the video ended early after {frames_read} frames ({last_time:.1f} s): {failure}")
            console.print(f"[yellow]the video ended early: {escape(failure)}; answering with what was received[/]")
        for index in loop.reached(last_time):  # questions whose frames were all received, at their own moment
            ask_question(questions[index])
        end = _video_end(source, last_time, status)
        while loop.pending:
            question = questions[loop.pending.pop(0)]
            why = "the stream stopped" if failure is not None else "the video ends"
            note = None if question.seconds <= end + TIME_TOLERANCE else (
                f"asked at {last_time:.1f} s, the last frame received: {why} before {question.seconds:g} s")
            ask_question(question, note)
        for session in sessions.values():
            session.flush()  # the stream ended: pre-fill what is pending, so the summary counts every frame
        ctrl_c.check()
    except KeyboardInterrupt:
        status = "interrupted"
        frames_read, last_time = loop.frames_pushed, loop.last_time or 0.0
        record.notes.append(f"interrupted (Ctrl-C) after {frames_read} frames ({last_time:.1f} s)")
    except StreamTCError as error:
        status = "error"
        frames_read, last_time = loop.frames_pushed, loop.last_time or 0.0
        record.notes.append(f"stopped by an error after {frames_read} frames ({last_time:.1f} s): {error}")
        console.print(f"[red]error:[/] {escape(str(error))}")
    except BaseException:
        record.status = "crashed"
        record.unanswered = [{**questions[i].to_dict(), "reason": "the run crashed"} for i in loop.pending]
        record.write()
        raise
    finally:
        ctrl_c.uninstall()
        if source is not None:
            source.close()
    pending = [questions[i] for i in loop.pending]
    with _sigint_deferred():  # a Ctrl-C now would only lose the summary: finish it first
        _finish(record, status, pending, sessions, costs, source, frames_read, last_time, failure)
        if save is not None and sessions:
            _save_sessions(save, sessions, status, record)
            record.write()
        _print_summary(video, record, last_time, time.perf_counter() - started)
        for session in sessions.values():
            session.close()  # releases what a memory holds outside the cache (offloaded block files)
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


def _save_sessions(directory: Path, sessions: dict[str, StreamingSession], status: str, record: RunRecord) -> None:
    """`--save`: each variant's stream under directory/<variant>, unless the run stopped somewhere a
    frame may be half processed (Ctrl-C, an error): a torn stream is not worth resuming."""
    if status in ("interrupted", "error"):
        record.notes.append(f"not saved to {directory}: the run was {status} mid-way (use --max-seconds to stop cleanly)")
        return
    try:
        for name, session in sessions.items():
            session.save(directory / VARIANT_FOLDERS[name])
    except (StreamTCError, OSError) as error:
        record.notes.append(f"saving to {directory} failed: {error}")
        return
    record.notes.append(f"saved to {directory} (continue with --resume {directory})")


def _finish(record: RunRecord, status: str, pending: list[TimedQuestion], sessions: dict[str, StreamingSession],
            costs: dict[str, dict[str, list[float]]], source: VideoSource | None, frames_read: int, last_time: float,
            failure: str | None) -> None:
    """Final status, unasked questions, statistics and (with --compare) ratios, written to --output."""
    record.status = status
    record.unanswered = [{**q.to_dict(), "reason": record.notes[-1] if record.notes else status} for q in pending]
    record.stream = {"frames": frames_read, "last_time": last_time, "duration": source and source.duration,
                     "ended_early": status in ("ended_early", "source_failed"), "error": failure}
    record.stats = {name: s.stats.to_dict() for name, s in sessions.items()}
    if len(sessions) == 2 and frames_read:
        base, fast = costs.values()  # the uncompressed model first (--compare)
        paired = min(len(side[key]) for side in (base, fast) for key in side)  # Ctrl-C may split a frame
        record.ratios = {key: paired_ratio(base[key][:paired], fast[key][:paired]) for key in ("vit_ms", "prefill_ms")}
        record.ratios["visual_tokens"] = _token_ratio(record.stats)
    record.write()


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


def _video_end(source: VideoSource, last_time: float, status: str) -> float:
    """Seconds up to which a question is still "in" the video: its declared end (or --max-seconds)
    when it played to the end, the last frame received when it stopped early."""
    if status != "completed":
        return last_time
    bounds = [t for t in (source.duration, source.max_seconds) if t is not None]
    return max(last_time, min(bounds)) if bounds else last_time


def _token_ratio(stats: dict[str, Any]) -> dict[str, Any]:
    """Kept visual tokens, the compressed variant over the uncompressed one (counted, not timed: no noise)."""
    def kept(name: str) -> int:
        return stats[name]["visual_tokens"] + stats[name]["pending_tokens"]

    base, fast = stats
    ratio = kept(fast) / kept(base) if kept(base) else None
    return {"ratio": ratio, "low": ratio, "high": ratio, "noise": False, "frames": stats[fast]["frames"]}


__all__ = ["EXIT_CODES", "RunRecord", "TimedQuestion", "paired_ratio", "run"]
