"""The common model every benchmark loader produces: videos, each with the questions to ask while it
plays, and the records that could not be read.

    loaded = load_benchmark("ovobench", "ovo_bench_new.json", videos="data/ovo/videos")
    for task in loaded.tasks:               # one `VideoTask` per video, questions in time order
        task.path, [(q.key, q.time, q.kind) for q in task.questions]
    loaded.problems                         # malformed records: one `Problem` (and error line) each

A `Question` is one thing to ask: its text, options (multiple choice) or none (OVO-Bench's count
and Yes/No prompts), the label as the annotation gives it, its task and category, and `time`, the
second of the stream at which it is asked (None: after the whole video, the offline benchmarks).
OVO-Bench's forward-active items become one `Question` per trigger point (`trigger` = 0, 1, ...).
A question's `key` = (video id, question id, trigger) is unique within a benchmark and is what a
results file is resumed by.

A record that cannot be read (a missing field, a NaN or negative time, an id used twice) does not
stop the load: it becomes a `Problem` with one clear message, which the run records as an error
line and the report counts. Each benchmark's formats are read in its own module under
`streamtc.eval.benchmarks`; this module holds what they share.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError

QuestionKind = Literal["choice", "yes_no", "count"]
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


class AnnotationError(InputError):
    """An annotation file (or one record of it) cannot be read as the benchmark it was given as."""


@dataclass(frozen=True)
class Question:
    """One prompt to the model at one moment of one video.

    qid: the question's id (unique within the video); trigger: index of the trigger point for
    OVO-Bench forward-active items, else None. time: seconds into the stream at which it is asked
    (None: after the whole video). text: the question (a benchmark's prompt is built around it by
    its protocol); options: the options as published (None for free-form kinds). answer: the label
    as the annotation gives it (an option letter, "Yes"/"No", a count, or for MLVU the option's
    text, which each protocol resolves its own way); None when the benchmark withholds labels.
    task / category: the groups the benchmark scores by. extra: fields a submission needs or the
    benchmark attaches (EgoSchema's q_uid, Video-MME's domain). For OVO-Bench's forward-active
    items, `text` is what its prompt template takes (REC's activity, SSR's step, CRR's question).
    """

    video: str
    qid: str
    text: str
    kind: QuestionKind
    answer: str | int | None
    task: str
    time: float | None = None
    options: tuple[str, ...] | None = None
    trigger: int | None = None
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, int | None]:
        """(video, qid, trigger): identifies the question in a results file."""
        return (self.video, self.qid, self.trigger)


@dataclass(frozen=True)
class Problem:
    """A record that could not be read: where it is (as a question key) and why."""

    video: str
    qid: str
    message: str
    task: str = "unreadable"
    trigger: int | None = None

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.video, self.qid, self.trigger)


@dataclass(frozen=True)
class VideoTask:
    """One video and every question asked on it, in the order they are asked (time, then file
    order; end-of-video questions last). path: the resolved file (may not exist)."""

    video: str
    path: Path
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class Loaded:
    """What a loader returns: the video tasks and the records it could not read."""

    tasks: list[VideoTask]
    problems: list[Problem] = field(default_factory=list)


# -- helpers shared by the loaders ------------------------------------------------------------


def read_json_records(path: Path) -> Any:
    """A JSON document, or a JSON-lines file as a list."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AnnotationError(f"{path}: not a UTF-8 text file (JSON, JSON lines or CSV expected)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            return [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            raise AnnotationError(f"{path}: neither JSON nor JSON lines ({error})") from None


def require(item: Any, keys: Sequence[str], where: str) -> None:
    """Raise AnnotationError naming the missing fields of `item` (or that it is no object)."""
    if not isinstance(item, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(item).__name__}")
    missing = [k for k in keys if k not in item]
    if missing:
        raise AnnotationError(f"{where}: missing field(s) {missing}; it has {sorted(item)}")


def resolve_video(videos: Path, reference: str) -> Path:
    """The file a benchmark's video reference names, looked up under `videos`.

    Tried in order: the reference as an absolute path; `videos/reference`; `videos/<its file
    name>`; each of those with a video suffix added when the reference has none. The first that
    exists wins; when none does, `videos/reference` is returned (and reported missing at run time).
    """
    ref = Path(reference)
    candidates: list[Path] = []
    if ref.is_absolute():
        candidates.append(ref)
    candidates += [videos / ref, videos / ref.name]
    if ref.suffix.lower() not in VIDEO_SUFFIXES:
        candidates += [c.with_name(c.name + s) for c in list(candidates) for s in VIDEO_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return ref if ref.is_absolute() else videos / ref


def parse_timestamp(value: Any) -> float:
    """Seconds from "HH:MM:SS", "MM:SS", "SS(.f)" or a number; a NaN, infinite or negative time
    is an AnnotationError (it would otherwise move the question to after the video)."""
    if isinstance(value, bool) or value is None:
        raise AnnotationError(f"cannot read {value!r} as a time stamp (HH:MM:SS or seconds)")
    if isinstance(value, (int, float)):
        parts = [float(value)]
    else:
        try:
            parts = [float(p) for p in str(value).strip().split(":")]
        except ValueError:
            raise AnnotationError(f"cannot read {value!r} as a time stamp (HH:MM:SS or seconds)") from None
    if not 1 <= len(parts) <= 3 or any(not math.isfinite(p) or math.copysign(1.0, p) < 0 for p in parts):
        raise AnnotationError(f"time stamp {value!r} is not a finite, non-negative time (HH:MM:SS or seconds)")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds


def option_letter(index: int) -> str:
    """"A", "B", ... for option index 0, 1, ..."""
    return chr(ord("A") + index)


def sorted_questions(questions: Iterable[Question]) -> tuple[Question, ...]:
    """Timed questions by time (stable: file order within a time), end-of-video ones last."""
    questions = list(questions)
    timed = sorted((q for q in questions if q.time is not None), key=lambda q: q.time)
    return tuple(timed + [q for q in questions if q.time is None])


def group(questions: Iterable[Question], paths: dict[str, Path], problems: list[Problem]) -> Loaded:
    """VideoTasks in order of each video's first appearance; a question whose key was already used
    becomes a Problem (the first one is kept)."""
    by_video: dict[str, list[Question]] = {}
    seen: set[tuple[str, str, int | None]] = {p.key for p in problems}
    for question in questions:
        if question.key in seen:
            problems.append(Problem(question.video, f"{question.qid}#dup{len(problems)}",
                                    f"question id {question.qid!r} of video {question.video!r} is used twice; "
                                    "the later record is not asked", question.task, question.trigger))
            continue
        seen.add(question.key)
        by_video.setdefault(question.video, []).append(question)
    tasks = [VideoTask(video, paths[video], sorted_questions(qs)) for video, qs in by_video.items()]
    return Loaded(tasks, problems)


# -- the loaded benchmark ---------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its spec (`benchmarks.BenchmarkSpec`), the annotation file, the video
    tasks and the records that could not be read."""

    spec: Any
    annotations: Path
    videos: Path
    tasks: tuple[VideoTask, ...]
    problems: tuple[Problem, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def questions(self) -> int:
        """Questions to answer, the unreadable records included (each gets one line)."""
        return sum(len(t.questions) for t in self.tasks) + len(self.problems)

    def keys(self) -> set[tuple[str, str, int | None]]:
        return {q.key for t in self.tasks for q in t.questions} | {p.key for p in self.problems}

    def annotations_sha256(self) -> str:
        """Content hash of the annotations: the file and its companions, or every annotation file
        (.json, .jsonl, .csv, .parquet) of a directory."""
        digest = hashlib.sha256()
        if self.annotations.is_dir():
            paths = sorted(p for p in self.annotations.rglob("*")
                           if p.is_file() and p.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet"))
        else:
            companions = (self.annotations.with_name(name) for name in self.spec.companions)
            paths = [self.annotations, *(p for p in companions if p.is_file() and p != self.annotations)]
        for path in paths:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()


__all__ = [
    "AnnotationError",
    "Benchmark",
    "Loaded",
    "Problem",
    "Question",
    "QuestionKind",
    "VIDEO_SUFFIXES",
    "VideoTask",
    "group",
    "option_letter",
    "parse_timestamp",
    "read_json_records",
    "require",
    "resolve_video",
    "sorted_questions",
]
