"""Video-MME: four-way questions on short (< 2 min), medium (4-15 min) and long (30-60 min) videos,
asked after the whole video.

Formats, each read as published:
- the Hugging Face parquet (`videomme/test-*.parquet`, read with pyarrow), or its rows as JSON /
  JSON lines: {video_id, duration "short"|"medium"|"long", domain, sub_category, videoID,
  question_id, task_type, question, options ["A. ..."], answer "C"};
- Video-MME's own JSON (README): [{video_id, duration_category, video_category, questions:
  [{question_id, task_type, question, choices|options, answer}]}];
- the paper's file (ReKV layout, `rekv.conversations`): three entries per video (one question
  each), choices written "A. ...", the answer a letter.

Official protocol (Video-MME's README prompt, `evaluation/eval_your_results.py`):

- Prompt (subtitle-free): "Select the best answer to the following multiple-choice question based
  on the video. Respond with only the letter (A, B, C, or D) of the correct option.\\n{question}\\n
  A. ...\\nB. ...\\nC. ...\\nD. ...\\nThe best answer is:".
- Reply rule (`extract_characters_regex`): strip; delete the phrases "The best answer is", "The
  correct answer is", "The answer is", "The answer", "The best optionisThe correct option is" and
  "Best answer:Best option:" (two missing commas in the script join those); a reply of more than
  ten words without any of A-D is unanswered; otherwise the first capital A, B, C or D anywhere:
  "Answer: C" reads as A (from "Answer"), "b" and "" are unanswered.
- Headline: accuracy over the answered questions: unanswered replies leave the denominator (the
  script counts `answered`, not questions); the count of unanswered questions is reported.

Paper protocol (`rekv`): ReKV's prompt ("(A) A. Apples." as the paper's choices are written) and
reply rule; the label is the answer letter; pooled accuracy over all questions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
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
from . import rekv
from .base import Aggregate, BenchmarkSpec, Prompt, Protocol, Record, Verdict, overall_row, pooled

INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
               "Respond with only the letter (A, B, C, or D) of the correct option.")
ANSWER_CUE = "The best answer is:"
DURATIONS = ("short", "medium", "long")
# Annotations that give seconds instead of the category: short videos are under 2 min, medium
# 4-15 min, long 30-60 min; the boundaries sit in the gaps.
SHORT_MAX_S = 240.0
MEDIUM_MAX_S = 1800.0


# -- loading ----------------------------------------------------------------------------------


def duration_category(value: Any) -> str:
    """"short" / "medium" / "long" from the category or from seconds ("unknown" otherwise)."""
    if isinstance(value, str) and value.strip().lower() in DURATIONS:
        return value.strip().lower()
    try:
        seconds = parse_timestamp(value)
    except AnnotationError:
        return "unknown"
    return "short" if seconds < SHORT_MAX_S else "medium" if seconds < MEDIUM_MAX_S else "long"


def _rows(annotations: Path) -> list[Any]:
    if annotations.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise AnnotationError("reading Video-MME's parquet needs pyarrow: pip install 'streamtc[eval]'") from error
        try:
            return pq.read_table(annotations).to_pylist()
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise AnnotationError(f"{annotations}: cannot read as parquet ({error})") from None
    return read_json_records(annotations)


def _official_rows(data: list[Any]) -> Iterator[tuple[int, Any]]:
    """(row number, row) of the flat layout, the README's nested layout flattened."""
    for n, row in enumerate(data):
        if isinstance(row, dict) and isinstance(row.get("questions"), list):
            for question in row["questions"]:
                yield n, {**{k: v for k, v in row.items() if k != "questions"}, **(question if isinstance(
                    question, dict) else {"question_id": None})}
        else:
            yield n, row


def _letter_answer(answer: Any, options: Sequence[str], where: str) -> str:
    text = str(answer).strip()
    if text in {option_letter(i) for i in range(len(options))}:
        return text
    raise AnnotationError(f"{where}: answer {answer!r} is not an option letter")


def load(annotations: Path, videos: Path) -> Loaded:
    data = _rows(annotations)
    questions: list[Question] = []
    problems: list[Problem] = []
    paths: dict[str, Path] = {}
    if rekv.is_conversation_file(data):
        for item, video, qid, conversation, point in rekv.conversations(data, annotations.name, videos, paths,
                                                                        problems):
            options = tuple(str(c) for c in conversation["choices"])
            try:
                answer = _letter_answer(conversation.get("answer"), options, point)
            except AnnotationError as error:
                problems.append(Problem(video, qid, str(error)))
                continue
            questions.append(Question(
                video=video, qid=qid, text=str(conversation["question"]), kind="choice", options=options,
                answer=answer, task=str(conversation.get("task_type") or item.get("task_type") or "all"),
                category=duration_category(item.get("duration_category") or item.get("duration")),
            ))
        return group(questions, paths, problems)
    if not isinstance(data, list):
        raise AnnotationError(f"{annotations}: Video-MME annotations are a list of rows (parquet, JSON, JSON lines)")
    for n, row in _official_rows(data):
        where = f"{annotations.name} row {n}"
        video = str(row.get("videoID") or row.get("video_id") or f"{annotations.name}#{n}") if isinstance(
            row, dict) else f"{annotations.name}#{n}"
        qid = str(row.get("question_id") or n) if isinstance(row, dict) else str(n)
        try:
            require(row, ("question", "answer"), where)
            options = row.get("options", row.get("choices"))
            if options is None or isinstance(options, str) or len(options) == 0:
                raise AnnotationError(f"{where}: options must be a non-empty list")
            options = tuple(str(o) for o in options)
            answer = _letter_answer(row["answer"], options, where)
        except AnnotationError as error:
            problems.append(Problem(video, qid, str(error)))
            continue
        paths.setdefault(video, resolve_video(videos, video))
        extra = {k: row[k] for k in ("domain", "sub_category", "video_category") if row.get(k) is not None}
        questions.append(Question(
            video=video, qid=qid, text=str(row["question"]), kind="choice", options=options, answer=answer,
            task=str(row.get("task_type") or "all"), extra=extra,
            category=duration_category(row.get("duration_category") or row.get("duration")),
        ))
    return group(questions, paths, problems)


def detect(path: Path, data: Any) -> bool:
    if path.suffix.lower() == ".parquet":
        return True
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    return ("videoID" in first or "duration_category" in first and "questions" in first
            or (rekv.is_conversation_file(data) and "mme" in path.name.lower()))


# -- the official rules -----------------------------------------------------------------------


def prompt(question: Question) -> Prompt:
    options = list(question.options or ())
    if not all(o.startswith(f"{option_letter(i)}.") for i, o in enumerate(options)):
        options = [f"{option_letter(i)}. {o}" for i, o in enumerate(options)]
    return Prompt("\n".join([INSTRUCTION, question.text, *options, ANSWER_CUE]))


def extract_characters_regex(s: str) -> str:
    """Video-MME's `extract_characters_regex`, transcribed (the missing commas kept)."""
    s = s.strip()
    answer_prefixes = [
        "The best answer is",
        "The correct answer is",
        "The answer is",
        "The answer",
        "The best option is" "The correct option is",
        "Best answer:" "Best option:",
    ]
    for answer_prefix in answer_prefixes:
        s = s.replace(answer_prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    matches = re.search(r"[ABCD]", s)
    if matches is None:
        return ""
    return matches[0]


def judge(record: Record) -> Verdict:
    extraction = extract_characters_regex(record.get("response") or "")
    if extraction == "":
        return None, None  # unanswered: left out of the accuracy, as the script does
    return extraction, extraction == record["answer"]


def _tables(records: Sequence[Record]) -> dict[str, list]:
    tables = {"duration": pooled(records, lambda r: r.get("category"), DURATIONS)}
    tasks = pooled(records, lambda r: r["task"])
    if len(tasks) > 1:
        tables["task"] = tasks
    return tables


def aggregate(records: Sequence[Record]) -> Aggregate:
    return overall_row(records).accuracy, _tables(records), {}


OFFICIAL = Protocol(
    "official", prompt, judge, aggregate, headline="accuracy over the answered questions",
    rule="Video-MME's extract_characters_regex: the first capital A-D after removing answer phrases",
)
PAPER = Protocol(
    "paper", rekv.prompt, rekv.judge, aggregate, headline="accuracy over all questions (the paper's host)",
    rule="ReKV's extract_choice: the character before the first ')' (else the first character)",
)
BENCHMARK = BenchmarkSpec(
    name="videomme", title="Video-MME (short/medium/long)", online=False, default_fps=0.5, load=load, detect=detect,
    protocols={"official": OFFICIAL, "paper": PAPER}, aliases=("video-mme",),
)

__all__ = [
    "ANSWER_CUE",
    "DURATIONS",
    "INSTRUCTION",
    "OFFICIAL",
    "PAPER",
    "BENCHMARK",
    "aggregate",
    "duration_category",
    "extract_characters_regex",
    "judge",
    "load",
    "prompt",
]
