"""Benchmark annotations -> one common model: videos, each with the questions to ask while it plays.

    benchmark = load_benchmark("ovobench", "ovo_bench_new.json", videos="data/ovo/videos")
    benchmark = load_benchmark("auto", "Real_Time_Visual_Understanding.csv", videos="data/sb")
    for task in benchmark.tasks:            # one `VideoTask` per video, questions in time order
        task.path, [(q.key, q.time, q.kind) for q in task.questions]

The model. A `Question` is one thing to ask the model: its text, options (multiple choice) or none
(OVO-Bench's count and Yes/No prompts), the expected answer, its task and category, and `time`, the
second of the stream at which it is asked (None: after the whole video, the offline benchmarks).
OVO-Bench's forward-active items become one `Question` per trigger point (`trigger` = 0, 1, ...).
A question's `key` = (video id, question id, trigger) is unique within a benchmark and is what a
results file is resumed by. Benchmark-specific parsing lives in one loader per benchmark; nothing
else in `streamtc.eval` knows a benchmark's file format.

Formats (SPEC §6; docs/evaluation.md has the download locations):

- OVO-Bench: `ovo_bench_new.json`, a list of {id, task, video, realtime, question, options, gt}
  (gt: index of the right option); forward tasks REC {activity, test_info [{realtime, count}]},
  SSR {test_info [{realtime, step, type}]}, CRR {question, test_info [{realtime, type}]}
  (type 1 = "Yes", 0 = "No").
- StreamingBench real-time: the published `Real_Time_Visual_Understanding.csv` (question_id
  "real_sample_<n>_<k>", task_type, question, time_stamp "HH:MM:SS", answer letter, options as a
  Python list literal), or its common JSON conversion [{video_path, questions: [{task_type,
  question, time_stamp, options ["A. ..."], answer}]}] (one entry per video or per question).
- MLVU-dev multiple choice, EgoSchema, Video-MME: the ReKV-style JSON [{video_id, video_path,
  duration, conversations: [{question, choices, answer}]}]; also each benchmark's own release:
  MLVU's per-task JSON files [{video, duration, question, candidates, answer, question_type}],
  EgoSchema's questions.json [{q_uid, question, "option 0".."option 4"}] with subset_answers.json
  ({q_uid: index}) beside it, Video-MME's rows [{videoID, duration "short"|"medium"|"long",
  question_id, task_type, question, options ["A. ..."], answer}] as JSON or JSON lines.

Video files are resolved against the videos directory when the benchmark is loaded (see
`resolve_video`); a missing file is not an error here: the run records it per question.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, InputError
from ..prompts import OPTION_LETTERS

logger = logging.getLogger(__name__)

QuestionKind = Literal["choice", "yes_no", "count"]
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")

# OVO-Bench task -> category (the three problem-solving modes).
OVO_CATEGORIES = {
    "OCR": "real-time", "ACR": "real-time", "ATR": "real-time", "STU": "real-time", "FPD": "real-time",
    "OJR": "real-time",
    "EPM": "backward", "ASI": "backward", "HLD": "backward",
    "REC": "forward", "SSR": "forward", "CRR": "forward",
}
OVO_FORWARD_TASKS = ("REC", "SSR", "CRR")

# OVO-Bench's own prompts for the forward-active tasks (its offline evaluation code), whitespace
# normalised. The model's reply is a count (REC) or Yes/No (SSR, CRR).
OVO_REC_PROMPT = (
    "You're watching a video in which people may perform a certain type of action repetively. "
    "The person performing this kind of action are referred to as 'they' in the following statement. "
    "You're task is to count how many times have different people in the video perform this kind of action "
    "in total. One complete motion counts as one. Now, answer the following question: "
    "How many times did they {activity}? Provide your answer as a single number (e.g., 0, 1, 2, 3…) "
    "indicating the total count. Do not include any additional text or explanation in your response."
)
OVO_SSR_PROMPT = (
    "You're watching a tutorial video which contain a sequential of steps. The following is one step from "
    "the whole procedures: {step} Your task is to determine if the man or woman in the video is currently "
    "performing this step. Answer only with “Yes” or “No”. Do not include any additional text or "
    "explanation in your response."
)
OVO_CRR_PROMPT = (
    "You're responsible of answering questions based on the video content. The following question are "
    "relevant to the latest frames, i.e. the end of the video. {question} Decide whether existing visual "
    "content, especially latest frames, i.e. frames that near the end of the video, provide enough "
    "information for answering the question. Answer only with “Yes” or “No”. Do not include any "
    "additional text or explanation in your response."
)

# Video-MME duration buckets for annotations that give seconds instead of the category: the
# benchmark's short videos are under 2 min, medium 4-15 min, long 30-60 min.
VIDEOMME_SHORT_MAX_S = 240.0
VIDEOMME_MEDIUM_MAX_S = 1800.0


class AnnotationError(InputError):
    """An annotation file cannot be read as the benchmark it was given as."""


# -- the common model -------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One prompt to the model at one moment of one video.

    qid: the benchmark's question id (unique within the video); trigger: index of the trigger
    point for OVO-Bench forward-active items, else None. time: seconds into the stream at which to
    ask (None: after the whole video). text: the question or full prompt; options: multiple-choice
    options (None for free-form kinds). answer: the expected option letter ("choice"), "Yes"/"No"
    ("yes_no") or an int ("count"); None when the benchmark withholds labels (EgoSchema's full
    set). task / category: the groups the benchmark scores by. extra: identifiers a submission
    needs (EgoSchema's q_uid) or the benchmark attaches (Video-MME's domain).
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
class VideoTask:
    """One video and every question asked on it, in the order they are asked (time, then file
    order; end-of-video questions last). path: the resolved file (may not exist)."""

    video: str
    path: Path
    questions: tuple[Question, ...]

    @property
    def last_time(self) -> float | None:
        """The latest question time, or None when some question waits for the end of the video."""
        if any(q.time is None for q in self.questions):
            return None
        return max(q.time for q in self.questions)


@dataclass(frozen=True)
class BenchmarkInfo:
    """What a benchmark is: its online/offline protocol, default sampling rate and loader.

    paper: the published accuracies this library reproduces (SPEC §5, ReKV + LLaVA-OV-7B):
    {"uncompressed": x, "stc": y}, or None where the paper reports no per-benchmark number.
    companions: files the loader also reads beside an annotation file (hashed with it).
    """

    name: str
    title: str
    online: bool
    default_fps: float
    loader: Callable[[Path, Path], list[VideoTask]]
    headline: str
    paper: dict[str, float] | None = None
    companions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its description, the annotation file and the video tasks."""

    info: BenchmarkInfo
    annotations: Path
    videos: Path
    tasks: tuple[VideoTask, ...]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def questions(self) -> int:
        return sum(len(t.questions) for t in self.tasks)

    def annotations_sha256(self) -> str:
        """Content hash of the annotations: the file and its companions, or every annotation file
        (.json, .jsonl, .csv) of a directory."""
        digest = hashlib.sha256()
        if self.annotations.is_dir():
            paths = sorted(p for p in self.annotations.rglob("*")
                           if p.is_file() and p.suffix.lower() in (".json", ".jsonl", ".csv"))
        else:
            companions = (self.annotations.with_name(name) for name in self.info.companions)
            paths = [self.annotations, *(p for p in companions if p.is_file() and p != self.annotations)]
        for path in paths:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()


# -- shared helpers ---------------------------------------------------------------------------


def _read_json_records(path: Path) -> Any:
    """A JSON document, or a JSON-lines file as a list."""
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            return [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            raise AnnotationError(f"{path}: neither JSON nor JSON lines ({error})") from None


def _require(item: dict[str, Any], keys: Sequence[str], where: str) -> None:
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
    """Seconds from "HH:MM:SS", "MM:SS", "SS(.f)" or a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise AnnotationError(f"cannot read {value!r} as a time stamp (HH:MM:SS or seconds)") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 or not math.isfinite(p) for p in parts):
        raise AnnotationError(f"cannot read {value!r} as a time stamp (HH:MM:SS or seconds)")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds


def _answer_letter(answer: Any, options: Sequence[str], where: str) -> str:
    """The correct option's letter from an index, a letter ("B", "(B)", "B. text") or the
    option's text."""
    if isinstance(answer, bool):
        raise AnnotationError(f"{where}: answer {answer!r} is not an option")
    if isinstance(answer, int):
        if 0 <= answer < len(options):
            return OPTION_LETTERS[answer]
        raise AnnotationError(f"{where}: answer index {answer} outside {len(options)} options")
    text = str(answer).strip()
    stripped = [re.sub(r"^\(?[A-Za-z][\.\):]\s+", "", o).strip().lower() for o in options]
    for index, option in enumerate(options):  # the option's own text first ("3" among "1".."4")
        if text.lower() in (option.strip().lower(), stripped[index]):
            return OPTION_LETTERS[index]
    match = re.fullmatch(r"\(?([A-Za-z])[\.\):]?", text) or re.match(r"\(?([A-Za-z])[\.\):]\s", text)
    if match and match.group(1).upper() in OPTION_LETTERS[: len(options)]:
        return match.group(1).upper()
    if text.isdigit() and int(text) < len(options):
        return OPTION_LETTERS[int(text)]
    raise AnnotationError(f"{where}: answer {answer!r} matches none of the options {list(options)}")


def _sorted_questions(questions: Iterable[Question]) -> tuple[Question, ...]:
    """Timed questions by time (stable: file order within a time), end-of-video ones last."""
    questions = list(questions)
    timed = sorted((q for q in questions if q.time is not None), key=lambda q: q.time)
    return tuple(timed + [q for q in questions if q.time is None])


def _group(questions: Iterable[Question], paths: dict[str, Path]) -> list[VideoTask]:
    """VideoTasks in order of each video's first appearance."""
    by_video: dict[str, list[Question]] = {}
    for question in questions:
        by_video.setdefault(question.video, []).append(question)
    keys = [q.key for qs in by_video.values() for q in qs]
    if len(keys) != len(set(keys)):
        dupes = sorted({k for k in keys if keys.count(k) > 1}, key=str)[:5]
        raise AnnotationError(f"duplicate question ids (video, id, trigger): {dupes}")
    return [VideoTask(video, paths[video], _sorted_questions(qs)) for video, qs in by_video.items()]


def _conversation_records(data: Any) -> list[dict[str, Any]] | None:
    """The ReKV-style list [{video_id?, video_path, conversations: [...]}], or None if `data` is
    not one."""
    if isinstance(data, list) and data and all(isinstance(d, dict) and "conversations" in d for d in data):
        return data
    return None


def _video_reference(item: dict[str, Any], where: str) -> tuple[str, str]:
    """(video id, file reference) of a ReKV-style record."""
    reference = item.get("video_path") or item.get("video")
    video_id = item.get("video_id") or (Path(str(reference)).stem if reference else None)
    if not reference and not video_id:
        raise AnnotationError(f"{where}: needs video_path or video_id")
    return str(video_id), str(reference or video_id)


def _rekv_conversations(
    records: list[dict[str, Any]], file_name: str, videos: Path, paths: dict[str, Path],
) -> Iterator[tuple[dict[str, Any], str, str, int, dict[str, Any], str]]:
    """Every conversation of ReKV-style records as (item, video id, file reference, index,
    conversation, where-for-errors); each video's path is registered in `paths` on the way."""
    for n, item in enumerate(records):
        where = f"{file_name} item {n}"
        video, reference = _video_reference(item, where)
        paths.setdefault(video, resolve_video(videos, reference))
        for k, conversation in enumerate(item["conversations"]):
            yield item, video, reference, k, conversation, f"{where} question {k}"


def _task_from(*sources: dict[str, Any]) -> str | None:
    for source in sources:
        for key in ("question_type", "task_type", "task", "type"):
            if source.get(key):
                return str(source[key])
    return None


# -- OVO-Bench --------------------------------------------------------------------------------


def load_ovobench(annotations: Path, videos: Path) -> list[VideoTask]:
    """OVO-Bench (`ovo_bench_new.json`): backward/real-time items asked at `realtime`, forward
    items (REC, SSR, CRR) asked at every trigger point of `test_info`."""
    data = _read_json_records(annotations)
    if not isinstance(data, list):
        raise AnnotationError(f"{annotations}: OVO-Bench annotations are a JSON list of items")
    questions: list[Question] = []
    paths: dict[str, Path] = {}
    for n, item in enumerate(data):
        where = f"{annotations.name} item {n}"
        _require(item, ("id", "task", "video"), where)
        task = str(item["task"])
        if task not in OVO_CATEGORIES:
            raise AnnotationError(f"{where}: unknown OVO-Bench task {task!r}; known: {sorted(OVO_CATEGORIES)}")
        video = str(item["video"])
        paths.setdefault(video, resolve_video(videos, video))
        common = {"video": video, "qid": str(item["id"]), "task": task, "category": OVO_CATEGORIES[task]}
        if task not in OVO_FORWARD_TASKS:
            _require(item, ("realtime", "question", "options", "gt"), where)
            options = tuple(str(o) for o in item["options"])
            questions.append(Question(
                **common, text=str(item["question"]), kind="choice", options=options,
                answer=_answer_letter(item["gt"], options, where), time=parse_timestamp(item["realtime"]),
            ))
            continue
        _require(item, ("test_info",), where)
        for trigger, info in enumerate(item["test_info"]):
            point = f"{where} trigger {trigger}"
            _require(info, ("realtime",), point)
            if task == "REC":
                _require(item, ("activity",), where)
                _require(info, ("count",), point)
                text, kind, answer = OVO_REC_PROMPT.format(activity=item["activity"]), "count", int(info["count"])
            else:
                _require(info, ("type",), point)
                if task == "SSR":
                    _require(info, ("step",), point)
                    text = OVO_SSR_PROMPT.format(step=info["step"])
                else:
                    _require(item, ("question",), where)
                    text = OVO_CRR_PROMPT.format(question=item["question"])
                kind, answer = "yes_no", "Yes" if int(info["type"]) == 1 else "No"
            questions.append(Question(**common, text=text, kind=kind, answer=answer, trigger=trigger,
                                      time=parse_timestamp(info["realtime"])))
    return _group(questions, paths)


# -- StreamingBench ---------------------------------------------------------------------------

_SB_QUESTION_ID = re.compile(r"_sample_(\d+)_(\d+)$")


def _parse_option_list(value: str, where: str) -> tuple[str, ...]:
    """The CSV's options cell: a Python list literal "['A. ...', 'B. ...']" (or ';'-separated)."""
    text = (value or "").strip()
    try:
        parsed = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        parsed = [part for part in text.split(";") if part.strip()]
    if isinstance(parsed, str) or not isinstance(parsed, (list, tuple)) or not parsed:
        raise AnnotationError(f"{where}: cannot read the options {value!r}")
    return tuple(str(o).strip() for o in parsed)


def _streamingbench_question(video: str, qid: str, row: dict[str, Any], where: str) -> Question:
    _require(row, ("task_type", "question", "time_stamp", "options", "answer"), where)
    options = row["options"] if isinstance(row["options"], tuple) else tuple(str(o) for o in row["options"])
    return Question(
        video=video, qid=qid, text=str(row["question"]), kind="choice", options=options,
        answer=_answer_letter(row["answer"], options, where), task=str(row["task_type"]),
        time=parse_timestamp(row["time_stamp"]),
    )


def load_streamingbench(annotations: Path, videos: Path) -> list[VideoTask]:
    """StreamingBench real-time visual understanding: the published CSV or the JSON conversion."""
    questions: list[Question] = []
    paths: dict[str, Path] = {}
    if annotations.suffix.lower() == ".csv":
        with annotations.open(newline="", encoding="utf-8-sig") as handle:
            for n, row in enumerate(csv.DictReader(handle)):
                where = f"{annotations.name} row {n + 2}"
                _require(row, ("question_id",), where)
                match = _SB_QUESTION_ID.search(row["question_id"])
                if match is None:
                    raise AnnotationError(f"{where}: question_id {row['question_id']!r} is not '..._sample_<n>_<k>'")
                video = f"sample_{match.group(1)}"
                if video not in paths:
                    found = [p for p in (videos / video / "video.mp4", videos / f"{video}_real.mp4")
                             if p.is_file()]
                    paths[video] = found[0] if found else resolve_video(videos, video)
                row = {**row, "options": _parse_option_list(row.get("options", ""), where)}
                questions.append(_streamingbench_question(video, row["question_id"], row, where))
        return _group(questions, paths)
    data = _read_json_records(annotations)
    if not isinstance(data, list):
        raise AnnotationError(f"{annotations}: StreamingBench JSON is a list of {{video_path, questions}}")
    counters: dict[str, int] = {}
    for n, entry in enumerate(data):
        where = f"{annotations.name} entry {n}"
        _require(entry, ("video_path", "questions"), where)
        video = Path(str(entry["video_path"])).name
        paths.setdefault(video, resolve_video(videos, str(entry["video_path"])))
        for row in entry["questions"]:
            index = counters.get(video, 0)
            counters[video] = index + 1
            qid = str(row.get("question_id") or index)
            questions.append(_streamingbench_question(video, qid, row, f"{where} question {qid}"))
    return _group(questions, paths)


# -- MLVU -------------------------------------------------------------------------------------

_MLVU_TASK_DIR = re.compile(r"^\d+_(\w+)$")


def _conversation_question(video: str, qid: str, conversation: dict[str, Any], task: str, where: str,
                           *, category: str | None = None, labelled: bool = True,
                           extra: dict[str, Any] | None = None) -> Question:
    _require(conversation, ("question", "choices"), where)
    options = tuple(str(c) for c in conversation["choices"])
    answer = conversation.get("answer")
    if answer is None and labelled:
        raise AnnotationError(f"{where}: no answer")
    return Question(
        video=video, qid=qid, text=str(conversation["question"]), kind="choice", options=options,
        answer=None if answer is None else _answer_letter(answer, options, where), task=task,
        category=category, extra=extra or {},
    )


def load_mlvu(annotations: Path, videos: Path) -> list[VideoTask]:
    """MLVU-dev multiple choice: ReKV-style JSON, or MLVU's own per-task JSON (a file, or the
    directory holding them; generation tasks without `candidates` are skipped)."""
    questions: list[Question] = []
    paths: dict[str, Path] = {}
    files = sorted(annotations.rglob("*.json")) if annotations.is_dir() else [annotations]
    for file in files:
        data = _read_json_records(file)
        if (records := _conversation_records(data)) is not None:
            for item, video, reference, k, conversation, where in _rekv_conversations(records, file.name, videos, paths):
                from_dir = m.group(1) if (m := _MLVU_TASK_DIR.match(Path(reference).parent.name)) else None
                task = _task_from(conversation, item) or from_dir or "all"
                qid = str(conversation.get("question_id", k))
                questions.append(_conversation_question(video, qid, conversation, task, where))
            continue
        if not isinstance(data, list):
            raise AnnotationError(f"{file}: not MLVU annotations (a JSON list)")
        if data and not all(isinstance(d, dict) and "candidates" in d for d in data):
            if annotations.is_dir():
                logger.info("skipping %s: not a multiple-choice MLVU task", file.name)
                continue
            raise AnnotationError(f"{file}: MLVU multiple-choice items need 'candidates'")
        for n, item in enumerate(data):
            where = f"{file.name} item {n}"
            _require(item, ("video", "question", "candidates", "answer"), where)
            task = _task_from(item) or (m.group(1) if (m := _MLVU_TASK_DIR.match(file.stem)) else file.stem)
            reference = str(item["video"])
            video = f"{file.stem}/{reference}"
            if video not in paths:
                nested = videos / file.stem / reference
                paths[video] = nested if nested.is_file() else resolve_video(videos, reference)
            conversation = {"question": item["question"], "choices": item["candidates"], "answer": item["answer"]}
            questions.append(_conversation_question(video, f"{file.stem}/{n}", conversation, task, where))
    if not questions:
        raise AnnotationError(f"{annotations}: no MLVU multiple-choice questions found")
    return _group(questions, paths)


# -- EgoSchema --------------------------------------------------------------------------------


def _load_egoschema(annotations: Path, videos: Path, *, full: bool) -> list[VideoTask]:
    folder = annotations if annotations.is_dir() else annotations.parent
    file = annotations / "questions.json" if annotations.is_dir() else annotations
    data = _read_json_records(file)
    questions: list[Question] = []
    paths: dict[str, Path] = {}
    if (records := _conversation_records(data)) is not None:
        for item, video, _, k, conversation, where in _rekv_conversations(records, file.name, videos, paths):
            q_uid = str(conversation.get("q_uid") or item.get("q_uid") or video)
            qid = q_uid if len(item["conversations"]) == 1 else f"{q_uid}/{k}"
            questions.append(_conversation_question(
                video, qid, conversation, "egoschema", where, labelled=False, extra={"q_uid": q_uid},
            ))
    else:
        if not isinstance(data, list):
            raise AnnotationError(f"{file}: EgoSchema questions.json is a list of {{q_uid, question, option 0..4}}")
        answers_file = folder / "subset_answers.json"
        answers = json.loads(answers_file.read_text()) if answers_file.is_file() else {}
        for n, item in enumerate(data):
            where = f"{file.name} item {n}"
            _require(item, ("q_uid", "question"), where)
            option_keys = sorted((k for k in item if re.fullmatch(r"option \d+", k)), key=lambda k: int(k.split()[1]))
            if not option_keys:
                raise AnnotationError(f"{where}: no 'option 0'.. fields")
            q_uid = str(item["q_uid"])
            paths.setdefault(q_uid, resolve_video(videos, q_uid))
            conversation = {"question": item["question"], "choices": [item[k] for k in option_keys],
                            "answer": answers.get(q_uid)}
            questions.append(_conversation_question(q_uid, q_uid, conversation, "egoschema", where, labelled=False,
                                                    extra={"q_uid": q_uid}))
    if not full:
        unlabelled = [q for q in questions if q.answer is None]
        if unlabelled:
            logger.info("EgoSchema: %d questions have no label and are left out of the subset "
                        "(run 'egoschema-full' to answer them for a submission)", len(unlabelled))
        questions = [q for q in questions if q.answer is not None]
        if not questions:
            raise AnnotationError(f"{file}: no labelled EgoSchema question (put subset_answers.json beside "
                                  "questions.json, or run 'egoschema-full')")
    return _group(questions, paths)


def load_egoschema(annotations: Path, videos: Path) -> list[VideoTask]:
    """EgoSchema, the labelled subset (500 questions): unlabelled questions are left out."""
    return _load_egoschema(annotations, videos, full=False)


def load_egoschema_full(annotations: Path, videos: Path) -> list[VideoTask]:
    """EgoSchema, every question (5,031): unlabelled ones are answered for the submission file."""
    return _load_egoschema(annotations, videos, full=True)


# -- Video-MME --------------------------------------------------------------------------------


def videomme_duration(value: Any) -> str | None:
    """"short" / "medium" / "long" from the category or from seconds (None when unknown)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("short", "medium", "long"):
        return value.strip().lower()
    try:
        seconds = parse_timestamp(value)
    except AnnotationError:
        return None
    return "short" if seconds < VIDEOMME_SHORT_MAX_S else "medium" if seconds < VIDEOMME_MEDIUM_MAX_S else "long"


def load_videomme(annotations: Path, videos: Path) -> list[VideoTask]:
    """Video-MME: ReKV-style JSON or the official rows (one per question, `videoID`)."""
    data = _read_json_records(annotations)
    questions: list[Question] = []
    paths: dict[str, Path] = {}
    if (records := _conversation_records(data)) is not None:
        for item, video, _, k, conversation, where in _rekv_conversations(records, annotations.name, videos, paths):
            duration = videomme_duration(item.get("duration_category") or item.get("duration"))
            qid = str(conversation.get("question_id", k))
            task = _task_from(conversation, item) or "all"
            questions.append(_conversation_question(video, qid, conversation, task, where,
                                                    category=duration or "unknown"))
        return _group(questions, paths)
    if not isinstance(data, list):
        raise AnnotationError(f"{annotations}: Video-MME annotations are a JSON list")
    for n, row in enumerate(data):
        where = f"{annotations.name} row {n}"
        _require(row, ("videoID", "question", "options", "answer"), where)
        video = str(row["videoID"])
        paths.setdefault(video, resolve_video(videos, video))
        conversation = {"question": row["question"], "choices": list(row["options"]), "answer": row["answer"]}
        extra = {k: row[k] for k in ("domain", "sub_category") if k in row}
        questions.append(_conversation_question(
            video, str(row.get("question_id", n)), conversation, str(row.get("task_type") or "all"), where,
            category=videomme_duration(row.get("duration")) or "unknown", extra=extra,
        ))
    return _group(questions, paths)


# -- registry, detection, loading -------------------------------------------------------------

BENCHMARKS: dict[str, BenchmarkInfo] = {
    info.name: info
    for info in (
        BenchmarkInfo("ovobench", "OVO-Bench", True, 1.0, load_ovobench,
                      "mean of the real-time, backward and forward category means",
                      {"uncompressed": 52.6, "stc": 52.0}),
        BenchmarkInfo("streamingbench", "StreamingBench real-time visual understanding", True, 1.0,
                      load_streamingbench, "accuracy over all questions", {"uncompressed": 69.1, "stc": 65.2}),
        BenchmarkInfo("mlvu", "MLVU-dev multiple choice", False, 0.5, load_mlvu, "M-Avg: mean of the task accuracies"),
        BenchmarkInfo("egoschema", "EgoSchema (labelled 500-question subset)", False, 0.5, load_egoschema,
                      "accuracy on the labelled subset", companions=("subset_answers.json",)),
        BenchmarkInfo("egoschema-full", "EgoSchema (full set, submission file)", False, 0.5, load_egoschema_full,
                      "accuracy on the labelled questions; the rest go to the submission file",
                      companions=("subset_answers.json",)),
        BenchmarkInfo("videomme", "Video-MME (short/medium/long)", False, 0.5, load_videomme,
                      "accuracy over all questions"),
    )
}
ALIASES = {"ovo-bench": "ovobench", "ovo": "ovobench", "streamingbench-rt": "streamingbench",
           "video-mme": "videomme", "mlvu-dev": "mlvu", "egoschema-subset": "egoschema"}
# The paper reports the three offline benchmarks as one average (SPEC §5).
PAPER_OFFLINE_AVERAGE = {"uncompressed": 61.3, "stc": 60.8}


def benchmark_info(name: str) -> BenchmarkInfo:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)} or 'auto'")
    return BENCHMARKS[key]


def detect_benchmark(annotations: Path) -> str:
    """Guess the benchmark from an annotation file's format (and, for the formats several
    benchmarks share, its name); raises AnnotationError when it cannot tell."""
    name = annotations.name.lower()
    if annotations.is_dir():
        if (annotations / "questions.json").is_file():
            return "egoschema"
        if any(_MLVU_TASK_DIR.match(p.stem) for p in annotations.rglob("*.json")):
            return "mlvu"
        raise AnnotationError(f"{annotations}: cannot tell the benchmark of this directory; name it")
    if annotations.suffix.lower() == ".csv":
        return "streamingbench"
    data = _read_json_records(annotations)
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    if "task" in first and ("realtime" in first or "test_info" in first):
        return "ovobench"
    if "questions" in first and "video_path" in first:
        return "streamingbench"
    if "q_uid" in first:
        return "egoschema"
    if "videoID" in first:
        return "videomme"
    if "candidates" in first:
        return "mlvu"
    if "conversations" in first:
        for hint, benchmark in (("mlvu", "mlvu"), ("ego", "egoschema"), ("mme", "videomme")):
            if hint in name:
                return benchmark
    raise AnnotationError(
        f"{annotations}: cannot tell which benchmark this is; give its name ({', '.join(sorted(BENCHMARKS))})"
    )


def load_benchmark(name: str, annotations: str | Path, videos: str | Path) -> Benchmark:
    """Load `annotations` as benchmark `name` ("auto": detect it), videos resolved under `videos`."""
    annotations, videos = Path(annotations), Path(videos)
    if not annotations.exists():
        raise AnnotationError(f"{annotations}: no such annotation file")
    info = benchmark_info(detect_benchmark(annotations) if name == "auto" else name)
    tasks = info.loader(annotations, videos)
    return Benchmark(info, annotations, videos, tuple(tasks))


def limit_videos(benchmark: Benchmark, max_videos: int | None) -> Benchmark:
    """The first `max_videos` videos (in annotation order); for smoke runs."""
    if max_videos is None:
        return benchmark
    if max_videos < 1:
        raise ConfigError(f"max_videos must be >= 1, got {max_videos}")
    return replace(benchmark, tasks=benchmark.tasks[:max_videos])


__all__ = [
    "ALIASES",
    "AnnotationError",
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkInfo",
    "OVO_CATEGORIES",
    "PAPER_OFFLINE_AVERAGE",
    "Question",
    "QuestionKind",
    "VideoTask",
    "benchmark_info",
    "detect_benchmark",
    "limit_videos",
    "load_benchmark",
    "load_egoschema",
    "load_egoschema_full",
    "load_mlvu",
    "load_ovobench",
    "load_streamingbench",
    "load_videomme",
    "parse_timestamp",
    "resolve_video",
    "videomme_duration",
]
