"""Watching a stream: variants of one VideoLLM take the same frames, and questions are asked when the
stream reaches their times; what happens comes out as events for a front end to show.

    watch = StreamWatch({"STC": SessionSpec(stc=STCConfig())}, [TimedQuestion(3.0, "What is it?")])
    for event in watch.events(open_source("demo")):   # Started, Progress, Answered, Note
        print(event)
    watch.status, watch.pending, watch.stats(), watch.ratios()
    watch.close()

`streamtc run` prints these events and writes its record from them. The watch builds (or, with
`resume`, restores) one session per variant, pushes every frame to each variant in turn (the order
alternating per frame, so that neither always runs on a warmer cache) and times each push, asks
each question through `streamtc.loop` (inclusive: a question at t sees the frame at t), and at the
end asks the questions the stream never reached on the last frame received, with a note saying why.
A source that fails mid-way ends the watch with status "source_failed", a live source that stops
early with "ended_early"; other errors and Ctrl-C propagate from `events`, leaving the watch's
state (sessions, frames, pending questions) for the caller to report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import STCConfig
from .errors import ConfigError, InputError, StreamTCError, VideoSourceError
from .loop import TIME_TOLERANCE, StreamLoop
from .measure import paired_ratio

if TYPE_CHECKING:
    from .factory import SessionSpec
    from .session import Answer, StreamingSession
    from .sources import Frame, VideoSource

VARIANT_FOLDERS = {"no STC": "no-stc", "STC": "stc"}  # a save directory's folder per variant
MEMORY_NAMES = {"FullCache": "full", "SlidingWindowCache": "window", "RetrievalCache": "retrieval",
                "StreamingWindowCache": "streaming-vlm"}  # cache-policy class -> its `--memory` name

# -- questions and events ------------------------------------------------------------------------


@dataclass(frozen=True)
class TimedQuestion:
    """A question to ask when the stream reaches `seconds`; `options` make it multiple choice."""

    seconds: float
    text: str
    options: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> TimedQuestion:
        """'SECONDS:QUESTION' or 'SECONDS:QUESTION|OPTION|OPTION...'; InputError naming the form."""
        seconds, sep, rest = spec.partition(":")
        text, *options = (part.strip() for part in rest.split("|"))
        try:
            value = float(seconds)
        except ValueError:
            value = None
        if not sep or value is None or not text or not all(options):
            raise InputError(f"--ask takes 'SECONDS:QUESTION' or 'SECONDS:QUESTION|OPTION|OPTION...' "
                             f"(e.g. '12:What is he holding?'), got {spec!r}")
        if not math.isfinite(value) or value < 0:
            raise InputError(f"the time of --ask {spec!r} must be a finite number of seconds >= 0, "
                             f"got {seconds.strip()!r}")
        if len(options) == 1:
            raise InputError(f"--ask {spec!r}: a multiple-choice question needs two options or more")
        return cls(value, text, tuple(options))

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "question": self.text, "options": list(self.options) or None}


@dataclass(frozen=True)
class Started:
    """The sessions are built and the source is open; `expected_frames` when the source knows it."""

    expected_frames: int | None


@dataclass(frozen=True)
class Progress:
    """Frames were pushed to every variant: `frames` in all so far, the last at `timestamp`."""

    frames: int
    pushed: int
    timestamp: float


@dataclass(frozen=True)
class Answered:
    """One variant's answer to a question. option_logprobs: each option letter's log-probability
    as the first answer token (multiple choice). note: why it was asked away from its time.
    empty_reason: why the text is empty (None when it is not)."""

    variant: str
    question: TimedQuestion
    answer: Answer
    option_logprobs: dict[str, float] | None
    note: str | None
    empty_reason: str | None


@dataclass(frozen=True)
class Note:
    """Something the record keeps: the source ended early."""

    text: str


Event = Started | Progress | Answered | Note

# -- the watch -----------------------------------------------------------------------------------


class StreamWatch:
    """Variants (`specs`: name -> SessionSpec) of one model watching one stream, asking `questions`.

    device / max_new_tokens: where the sessions run and their answers' length limit. check: called
    before every frame and every answer (a Ctrl-C that library code swallowed is raised again
    there). resume: a directory `save` wrote; each variant continues its saved stream (a file's
    frames up to the saved time are skipped; a `live` source's clock, restarting at 0, is shifted
    to run on `interval` seconds after it)."""

    def __init__(self, specs: dict[str, SessionSpec], questions: list[TimedQuestion], *, device: str = "cpu",
                 max_new_tokens: int = 32, check: Callable[[], None] = lambda: None, resume: Path | None = None,
                 live: bool = False, interval: float = 1.0) -> None:
        self.specs, self.questions = specs, questions
        self.device, self.max_new_tokens, self.check = device, max_new_tokens, check
        self.resume, self.live, self.interval = resume, live, interval
        self.sessions: dict[str, StreamingSession] = {}
        self.costs: dict[str, dict[str, list[float]]] = {name: {"vit_ms": [], "prefill_ms": []} for name in specs}
        self.loop = StreamLoop([q.seconds for q in questions], self._push, chunk_frames=1, inclusive=True)
        self.source: VideoSource | None = None
        self.status = "completed"  # or "source_failed" / "ended_early" once the source stopped early
        self.failure: str | None = None

    @property
    def pending(self) -> list[TimedQuestion]:
        """The questions not asked (yet), in time order."""
        return [self.questions[i] for i in self.loop.pending]

    @property
    def last_time(self) -> float:
        """Timestamp of the last frame every variant took (0 before the first)."""
        return self.loop.last_time or 0.0

    def events(self, source: VideoSource | Callable[[], VideoSource]) -> Iterator[Event]:
        """Build the sessions, open `source` (given open, or how to open it once the models are
        built, for a live stream whose frames must not pile up meanwhile), stream it and ask every
        question; ends with every pending frame pre-filled, so that the statistics count it."""
        for name, spec in self.specs.items():
            self.check()
            self.sessions[name] = self._session(name, spec)
        self.source = source if not callable(source) else source()
        resumed_at = max((s.last_timestamp for s in self.sessions.values() if s.last_timestamp is not None),
                         default=None)
        yield Started(self.source.expected_frames)
        frames = self.source if resumed_at is None else _after_resume(self.source, resumed_at, self.live,
                                                                      self.interval)
        steps = self.loop.steps(frames)
        while True:
            try:
                step = next(steps)
            except StopIteration:
                break
            except VideoSourceError as error:
                self.status, self.failure = "source_failed", str(error)
                break
            if isinstance(step, int):
                yield from self._ask(self.questions[step])
            else:
                yield Progress(self.loop.frames_pushed, len(step), step[-1].timestamp)
        yield from self._end()

    def _end(self) -> Iterator[Event]:
        """After the last frame: the questions the stream reached, then the rest on the last frame
        received, each with a note saying why it came late."""
        if self.status == "completed" and self.source.ended_early:
            self.status, self.failure = "ended_early", self.source.error
        if self.failure is not None:
            yield Note(f"the video ended early after {self.where()}: {self.failure}")
        for index in self.loop.reached(self.last_time):  # every frame they see was received: their own moment
            yield from self._ask(self.questions[index])
        end = _video_end(self.source, self.last_time, self.status)
        while self.loop.pending:
            question = self.questions[self.loop.pending.pop(0)]
            note = None if question.seconds <= end + TIME_TOLERANCE else (
                f"asked at {self.last_time:.1f} s, the last frame received: {self._why_no_more()} before "
                f"{question.seconds:g} s")
            yield from self._ask(question, note)
        for session in self.sessions.values():
            session.flush()  # the stream ended: pre-fill what is pending
        self.check()

    def _why_no_more(self) -> str:
        if self.failure is not None:
            return "the stream stopped"
        cap = self.source.max_seconds
        if cap is not None and (self.source.duration is None or cap < self.source.duration):
            return f"--max-seconds {cap:g} ends the stream"
        return "the video ends"

    def _session(self, name: str, spec: SessionSpec) -> StreamingSession:
        """The variant's session: built from `spec`, or restored from its folder of `resume`."""
        try:
            if self.resume is None:
                return spec.build(self.device)
            return _restored_session(self.resume / VARIANT_FOLDERS[name], spec, self.device)
        except StreamTCError:
            raise
        except (OSError, ValueError) as error:  # transformers' loading errors: name the model, keep it to one line
            raise ConfigError(f"--model {spec.model}: cannot be loaded ({str(error).splitlines()[0]})") from None

    def _push(self, frames: list[Frame]) -> None:
        """One frame to every variant, timing each push; the order alternates per frame."""
        (frame,) = frames
        self.check()
        names = list(self.sessions) if self.loop.frames_pushed % 2 == 0 else list(reversed(self.sessions))
        for name in names:
            session = self.sessions[name]
            before = session.stats
            session.push(frame.image[None], [frame.timestamp], codec=[frame.codec])
            after = session.stats
            self.costs[name]["vit_ms"].append(after.vit_ms - before.vit_ms)
            self.costs[name]["prefill_ms"].append(after.prefill_ms - before.prefill_ms)

    def _ask(self, question: TimedQuestion, note: str | None = None) -> Iterator[Answered]:
        for name, session in self.sessions.items():
            self.check()
            answer = session.ask(question.text, options=question.options or None, max_new_tokens=self.max_new_tokens)
            logprobs = session.option_logprobs(question.text, question.options) if question.options else None
            yield Answered(name, question, answer, logprobs, note,
                           None if answer.text else _empty_answer_reason(session, answer))

    def frames(self) -> dict[str, int]:
        """Frames each variant has taken (they differ by one when a push was cut between them)."""
        return {name: session.stats.frames for name, session in self.sessions.items()}

    def where(self) -> str:
        """How far the stream got, as the summary counts it: 'N frames (T s)'."""
        counts = self.frames() or {"": self.loop.frames_pushed}
        if len(set(counts.values())) == 1:
            frames = f"{next(iter(counts.values()))} frames"
        else:
            frames = ", ".join(f"{count} frames ({name})" for name, count in counts.items())
        return f"{frames} ({self.last_time:.1f} s)"

    def stream_record(self, status: str) -> dict[str, Any]:
        """The stream as the watch saw it: frames, last time, declared duration, early end."""
        counts = self.frames()
        return {"frames": max(counts.values()) if counts else self.loop.frames_pushed, "last_time": self.last_time,
                "duration": self.source and self.source.duration,
                "ended_early": status in ("ended_early", "source_failed"), "error": self.failure}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each variant's session statistics."""
        return {name: session.stats.to_dict() for name, session in self.sessions.items()}

    def ratios(self) -> dict[str, Any]:
        """With two variants (the uncompressed one first): the second's time per frame over the
        first's (`measure.paired_ratio`) for the ViT and the pre-fill, and its kept visual tokens."""
        if len(self.sessions) != 2 or not self.loop.frames_pushed:
            return {}
        base, fast = self.costs.values()
        paired = min(len(side[key]) for side in (base, fast) for key in side)  # Ctrl-C may split a frame
        ratios = {key: paired_ratio(base[key][:paired], fast[key][:paired]) for key in ("vit_ms", "prefill_ms")}
        ratios["visual_tokens"] = _token_ratio(self.stats())
        return ratios

    def save(self, directory: Path, status: str) -> str:
        """Save each variant's stream under directory/<variant folder>, unless the watch stopped where
        a frame may be half processed (`status` interrupted or error); returns the note to record."""
        if status in ("interrupted", "error"):
            return f"not saved to {directory}: the run was {status} mid-way (use --max-seconds to stop cleanly)"
        try:
            for name, session in self.sessions.items():
                session.save(directory / VARIANT_FOLDERS[name])
        except (StreamTCError, OSError) as error:
            return f"saving to {directory} failed: {error}"
        return f"saved to {directory} (continue with --resume {directory})"

    def close(self) -> None:
        """Close the source and the sessions (a memory's offloaded block files are released)."""
        if self.source is not None:
            self.source.close()
        for session in self.sessions.values():
            session.close()

# -- saved streams -------------------------------------------------------------------------------


def saved_variants(directory: Path) -> dict[str, dict[str, Any]]:
    """The variants `StreamWatch.save` left in `directory`, each with the settings its stream was
    saved with (its verified snapshot's `settings`)."""
    from .memory.persist import open_snapshot, read_json

    found = {name: read_json(open_snapshot(directory / folder) / "session.json")["settings"]
             for name, folder in VARIANT_FOLDERS.items() if (directory / folder).is_dir()}
    if not found:
        raise ConfigError(f"--resume {directory}: no stream saved by `run --save` there "
                          f"(no {' or '.join(VARIANT_FOLDERS.values())} folder)")
    return found


def saved_stc(settings: dict[str, Any]) -> STCConfig | None:
    """The STC settings a saved stream runs with."""
    return None if settings["stc"] is None else STCConfig.from_dict(settings["stc"])


def saved_memory(settings: dict[str, Any]) -> dict[str, Any]:
    """The memory a saved stream runs with, as `run` records it: kind (its `--memory` name), window,
    retrieved frames, offload directory and budget (None where the kind has none)."""
    policy = settings["cache_policy"]
    kind = policy["class"].rsplit(".", 1)[-1]
    values = policy["settings"]
    return {"kind": MEMORY_NAMES.get(kind, kind),
            "window_tokens": values.get("window_tokens", values.get("max_visual_tokens")),
            "retrieve_frames": values.get("retrieve_frames"), "offload_dir": values.get("offload_dir"),
            "offload_budget": values.get("offload_budget")}


def _restored_session(path: Path, spec: SessionSpec, device: str) -> StreamingSession:
    """A session continuing the stream saved at `path`, on the same model built again."""
    from .presets import build_model, load_pretrained, load_tokenizer
    from .session import StreamingSession

    if spec.model is None:
        return StreamingSession.restore(path, build_model(spec.preset, num_layers=spec.num_layers).to(device))
    return StreamingSession.restore(path, load_pretrained(spec.model).to(device), load_tokenizer(spec.model))


def _after_resume(frames: Iterable[Frame], resumed_at: float, live: bool, interval: float) -> Iterator[Frame]:
    """A resumed stream's frames: a file's from after the saved time; a live source's (whose clock
    restarts at 0) shifted to run on after it."""
    for frame in frames:
        if live:
            yield dataclasses.replace(frame, timestamp=frame.timestamp + resumed_at + interval)
        elif frame.timestamp > resumed_at + TIME_TOLERANCE:
            yield frame

# -- helpers -------------------------------------------------------------------------------------


def _empty_answer_reason(session: StreamingSession, answer: Answer) -> str:
    """Why an answer's text is empty: a stop token first, or tokens that print as nothing."""
    if not answer.token_ids:
        return "the model's first token was its stop token"
    if session.tokenizer.decode(answer.token_ids, skip_special_tokens=True):
        return f"its {len(answer.token_ids)} tokens decode to whitespace only"
    return f"its {len(answer.token_ids)} tokens are special tokens, which are not printed"


def _video_end(source: VideoSource, last_time: float, status: str) -> float:
    """Seconds up to which a question is still "in" the video: its declared end (or max_seconds)
    when it played to the end, the last frame received when it stopped early."""
    if status != "completed":
        return last_time
    bounds = [t for t in (source.duration, source.max_seconds) if t is not None]
    return max(last_time, min(bounds)) if bounds else last_time


def _token_ratio(stats: dict[str, Any]) -> dict[str, Any]:
    """Kept visual tokens, the second variant over the first (counted, not timed: no noise)."""
    def kept(name: str) -> int:
        return stats[name]["visual_tokens"] + stats[name]["pending_tokens"]

    base, fast = stats
    ratio = kept(fast) / kept(base) if kept(base) else None
    return {"ratio": ratio, "low": ratio, "high": ratio, "noise": False, "frames": stats[fast]["frames"]}


__all__ = ["VARIANT_FOLDERS", "Answered", "Event", "Note", "Progress", "Started", "StreamWatch", "TimedQuestion",
           "saved_memory", "saved_stc", "saved_variants"]
