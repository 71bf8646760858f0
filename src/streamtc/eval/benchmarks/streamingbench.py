"""StreamingBench, real-time visual understanding: four-way questions asked at their time stamp.

Formats: StreamingBench's own `src/data/questions_real.json`, a list of {video_path, questions:
[{task_type, question, time_stamp "HH:MM:SS", options ["A. ..."], answer "A"}]} (one entry per
question, entries of one video merged), or the published `Real_Time_Visual_Understanding.csv`
(question_id "real_sample_<n>_<k>", which names the video, task_type, question, time_stamp,
answer, options as a Python list literal).

Official protocol (StreamingBench's `src/benchmark/StreamingBench.py`,
`src/utils/video_execution.py`, `src/data/count.py`):

- Prompt: `PROMPT_TEMPLATE` with the question and exactly four options (lettered "A. " ... when
  the first does not start with "A."), then "\\n\\nThe best option is:".
- Clip: ffmpeg `-ss 0 -t int(t)`, so a question at t sees the frames sampled in [0, int(t)): at
  1 fps, int(t) frames (5 at t = 5 and at t = 5.9).
- Reply rule: the reply's first character must equal the answer letter (`count.py` reads
  `response[0]`): "B" and "B. text" are right, "(B)", " B" and "b" are wrong. An empty reply
  makes `count.py` raise; it is counted wrong here (and shown as unparsed).
- Headline: accuracy over all questions.

Paper protocol: the STC paper ran StreamingBench's own evaluation code on ReKV (its adapter passes
the prompt and returns the reply unchanged), so every rule is the official one.
"""

from __future__ import annotations

import ast
import csv
import math
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..datasets import (
    AnnotationError,
    Loaded,
    Problem,
    Question,
    group,
    option_letter,
    parse_timestamp,
    read_json_records,
    require,
    resolve_video,
)
from .base import Aggregate, BenchmarkSpec, Prompt, Protocol, Record, Verdict, overall_row, pooled

# StreamingBench's src/benchmark/StreamingBench.py, verbatim.
PROMPT_TEMPLATE = """You are an advanced video question-answering AI assistant. You have been provided with some frames from the video and a multiple-choice question related to the video. Your task is to carefully analyze the video and provide the best answer to question, choosing from the four options provided. Respond with only the letter (A, B, C, or D) of the correct option.

Question: {}

Options:
{}
{}
{}
{}"""  # noqa: E501
ANSWER_CUE = "\n\nThe best option is:"

_QUESTION_ID = re.compile(r"_sample_(\d+)_(\d+)$")


# -- loading ----------------------------------------------------------------------------------


def _option_list(value: Any, where: str) -> tuple[str, ...]:
    """Options from a list, or the CSV's cell: a Python list literal (or ';'-separated)."""
    if isinstance(value, (list, tuple)):
        parsed: Any = value
    else:
        text = str(value or "").strip()
        try:
            parsed = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            parsed = [part for part in text.split(";") if part.strip()]
    if isinstance(parsed, str) or not isinstance(parsed, (list, tuple)) or not parsed:
        raise AnnotationError(f"{where}: cannot read the options {value!r}")
    if len(parsed) != 4:
        raise AnnotationError(f"{where}: StreamingBench's prompt takes exactly four options, got {len(parsed)}")
    return tuple(str(o).strip() for o in parsed)


def _question(video: str, qid: str, row: Any, where: str) -> Question:
    require(row, ("task_type", "question", "time_stamp", "options", "answer"), where)
    options = _option_list(row["options"], where)
    answer = str(row["answer"]).strip()
    if answer not in {option_letter(i) for i in range(len(options))}:
        raise AnnotationError(f"{where}: answer {row['answer']!r} is not an option letter A-D")
    try:
        time = parse_timestamp(row["time_stamp"])
    except AnnotationError as error:
        raise AnnotationError(f"{where}: time_stamp {error}") from None
    return Question(video=video, qid=qid, text=str(row["question"]), kind="choice", options=options,
                    answer=answer, task=str(row["task_type"]), time=time)


def load(annotations: Path, videos: Path) -> Loaded:
    """The published CSV or StreamingBench's JSON; unreadable rows become Problems."""
    questions: list[Question] = []
    problems: list[Problem] = []
    paths: dict[str, Path] = {}
    if annotations.suffix.lower() == ".csv":
        with annotations.open(newline="", encoding="utf-8-sig") as handle:
            for n, row in enumerate(csv.DictReader(handle)):
                where = f"{annotations.name} row {n + 2}"
                match = _QUESTION_ID.search(str(row.get("question_id") or ""))
                if match is None:
                    problems.append(Problem(f"{annotations.name}#{n + 2}", "row", f"{where}: question_id "
                                            f"{row.get('question_id')!r} is not '..._sample_<n>_<k>'"))
                    continue
                video = f"sample_{match.group(1)}"
                if video not in paths:
                    found = [p for p in (videos / video / "video.mp4", videos / f"{video}_real.mp4") if p.is_file()]
                    paths[video] = found[0] if found else resolve_video(videos, video)
                try:
                    questions.append(_question(video, row["question_id"], row, where))
                except AnnotationError as error:
                    problems.append(Problem(video, row["question_id"], str(error), str(row.get("task_type") or "unreadable")))
        return group(questions, paths, problems)
    data = read_json_records(annotations)
    if not isinstance(data, list):
        raise AnnotationError(f"{annotations}: StreamingBench JSON is a list of {{video_path, questions}}")
    counters: dict[str, int] = {}
    for n, entry in enumerate(data):
        where = f"{annotations.name} entry {n}"
        try:
            require(entry, ("video_path", "questions"), where)
        except AnnotationError as error:
            problems.append(Problem(f"{annotations.name}#{n}", "entry", str(error)))
            continue
        video = Path(str(entry["video_path"])).name
        paths.setdefault(video, resolve_video(videos, str(entry["video_path"])))
        for row in entry["questions"]:
            index = counters.get(video, 0)
            counters[video] = index + 1
            qid = str(row.get("question_id") or index) if isinstance(row, dict) else str(index)
            try:
                questions.append(_question(video, qid, row, f"{where} question {qid}"))
            except AnnotationError as error:
                task = str(row.get("task_type") or "unreadable") if isinstance(row, dict) else "unreadable"
                problems.append(Problem(video, qid, str(error), task))
    return group(questions, paths, problems)


def detect(path: Path, data: Any) -> bool:
    if path.suffix.lower() == ".csv":
        return True
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    return "questions" in first and "video_path" in first


# -- the official rules -----------------------------------------------------------------------


def prompt(question: Question) -> Prompt:
    """`StreamingBenchEval`'s input: the template, then "The best option is:"."""
    options = list(question.options or ())
    if not options[0].startswith("A."):
        options = [f"{option_letter(i)}. {o}" for i, o in enumerate(options)]
    return Prompt(PROMPT_TEMPLATE.format(question.text, *options) + ANSWER_CUE)


def judge(record: Record) -> Verdict:
    """`count.py`: the reply's first character against the answer letter."""
    response = record.get("response")
    if not response:
        return None, False
    return response[0], response[0] == record["answer"]


def cut(time: float) -> float:
    """The clip [0, int(t))."""
    return float(math.floor(time))


def aggregate(records: Sequence[Record]) -> Aggregate:
    return overall_row(records).accuracy, {"task": pooled(records, lambda r: r["task"])}, {}


OFFICIAL = Protocol(
    "official", prompt, judge, aggregate, cut=cut, headline="accuracy over all questions",
    rule="StreamingBench's count.py: the reply's first character is the answer letter",
)
PAPER = replace(OFFICIAL, name="paper", rule="as official: the paper ran StreamingBench's own evaluation code on ReKV")
BENCHMARK = BenchmarkSpec(
    name="streamingbench", title="StreamingBench real-time visual understanding", online=True, default_fps=1.0,
    load=load, detect=detect, protocols={"official": OFFICIAL, "paper": PAPER},
    paper={"uncompressed": 69.1, "stc": 65.2}, aliases=("streamingbench-rt",),
)

__all__ = ["ANSWER_CUE", "BENCHMARK", "OFFICIAL", "PAPER", "PROMPT_TEMPLATE", "aggregate", "cut", "judge", "load", "prompt"]
