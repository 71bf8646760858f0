"""MLVU-dev multiple choice: seven tasks on 3-minute to 2-hour videos, asked after the whole video.

Formats: MLVU's own release (`data/` or `json/`: one file per task, `<n>_<task>.json`, a list of
{video, duration, question, candidates, answer, question_type}; the generation tasks without
`candidates` are skipped in a directory), as published: an answer that is none of the candidates,
an answer that appears twice among them, and an empty question are all kept. Or the paper's file
(ReKV layout, `rekv.conversations`), where `video_id` repeats across task folders.

Official protocol (MLVU's `evaluation/multiple_choice_evaluation/choice_bench.py`):

- Prompt: system "Carefully watch this video ... addresses the question."; the user turn "Question:
  {question}\\nOptions:\\n(A) {c}\\n(B) ..." (right-stripped) then "\\nOnly give the best option.";
  the answer turn starts "Best Option: (".
- Label (`qa_template`): the letter of the *last* candidate equal to the answer; an answer that
  matches none gets index -1, the letter "@", which no reply gives: the item is always wrong.
- Reply rule (`check_ans`): when the reply holds ")", the character just before the first ")";
  otherwise the whole reply; right when it equals the label. "B) Three" and "B" are right, "B.",
  "(B)", "b" and "B or C" are wrong.
- Headline: M-Avg, the mean of the seven task accuracies (`final_res['Avg']`).

Paper protocol (`rekv`): ReKV's prompt and reply rule, the first matching candidate as label ("A"
when none matches), pooled accuracy over all questions: the metric of the paper's offline average.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..datasets import (
    AnnotationError,
    Loaded,
    Problem,
    Question,
    group,
    option_letter,
    read_json_records,
    require,
    resolve_video,
)
from . import rekv
from .base import Aggregate, BenchmarkSpec, Prompt, Protocol, Record, Verdict, mean, overall_row, pooled

SYSTEM_PROMPT = ("Carefully watch this video and pay attention to every detail. Based on your observations, "
                 "select the best option that accurately addresses the question.")
ANSWER_PREFIX = "Best Option: ("
NO_MATCH = "@"  # chr(ord('A') - 1): the official label of an answer that matches no candidate

_TASK_FILE = re.compile(r"^\d+_(\w+)$")


# -- loading ----------------------------------------------------------------------------------


def _own_file(file: Path, data: list[Any], videos: Path, paths: dict[str, Path],
              problems: list[Problem]) -> list[Question]:
    task = m.group(1) if (m := _TASK_FILE.match(file.stem)) else file.stem
    questions = []
    for n, item in enumerate(data):
        where, qid = f"{file.name} item {n}", f"{file.stem}/{n}"
        reference = str(item.get("video", f"#{n}")) if isinstance(item, dict) else f"#{n}"
        video = f"{file.stem}/{reference}"
        try:
            require(item, ("video", "question", "candidates", "answer"), where)
            if not isinstance(item["candidates"], list) or not item["candidates"]:
                raise AnnotationError(f"{where}: candidates must be a non-empty list")
        except AnnotationError as error:
            problems.append(Problem(video, qid, str(error), task))
            continue
        if video not in paths:
            nested = [videos / file.stem / reference, videos / task / reference]
            found = [p for p in nested if p.is_file()]
            paths[video] = found[0] if found else resolve_video(videos, reference)
        questions.append(Question(video=video, qid=qid, text=str(item["question"]), kind="choice",
                                  options=tuple(str(c) for c in item["candidates"]), answer=str(item["answer"]),
                                  task=task))
    return questions


def load(annotations: Path, videos: Path) -> Loaded:
    """MLVU's task files (a directory or one file) or the paper's file, as published."""
    questions: list[Question] = []
    problems: list[Problem] = []
    paths: dict[str, Path] = {}
    files = sorted(annotations.rglob("*.json")) if annotations.is_dir() else [annotations]
    for file in files:
        data = read_json_records(file)
        if rekv.is_conversation_file(data):
            for _, video, qid, conversation, _ in rekv.conversations(data, file.name, videos, paths, problems):
                task = str(conversation.get("question_type") or video.split("/")[0])
                answer = conversation.get("answer")
                questions.append(Question(video=video, qid=qid, text=str(conversation["question"]), kind="choice",
                                          options=tuple(str(c) for c in conversation["choices"]),
                                          answer=None if answer is None else str(answer), task=task))
            continue
        if not isinstance(data, list) or not all(isinstance(d, dict) and "candidates" in d for d in data):
            if annotations.is_dir():
                continue  # a generation task (no candidates) or another file
            raise AnnotationError(f"{file}: MLVU multiple-choice items are a JSON list with 'candidates'")
        questions += _own_file(file, data, videos, paths, problems)
    if not questions and not problems:
        raise AnnotationError(f"{annotations}: no MLVU multiple-choice questions found")
    return group(questions, paths, problems)


def detect(path: Path, data: Any) -> bool:
    if path.is_dir():
        return any(_TASK_FILE.match(p.stem) for p in path.rglob("*.json"))
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    return "candidates" in first or (rekv.is_conversation_file(data) and "mlvu" in path.name.lower())


# -- the official rules -----------------------------------------------------------------------


def prompt(question: Question) -> Prompt:
    """`qa_template`'s question, then "Only give the best option."; answer turn "Best Option: (" ."""
    text = f"Question: {question.text}\nOptions:\n"
    for i, candidate in enumerate(question.options or ()):
        text += f"({option_letter(i)}) {candidate}\n"
    return Prompt(text.rstrip() + "\nOnly give the best option.", ANSWER_PREFIX)


def last_match_label(question: Question) -> str | None:
    """`qa_template`'s label: the last candidate equal to the answer, else "@"."""
    if question.answer is None:
        return None
    index = -1
    for i, candidate in enumerate(question.options or ()):
        if candidate == question.answer:
            index = i
    return option_letter(index) if index >= 0 else NO_MATCH


def choice_of(pred: str) -> str:
    """`check_ans`'s reading of a reply: the character before the first ")", else the whole reply."""
    if ")" in pred:
        index = pred.index(")")
        return pred[index - 1:index]
    return pred


def check_ans(pred: str, label: str) -> bool:
    """MLVU's `check_ans` (gt is "(<label>) <answer>", so its option is the label)."""
    return choice_of(pred) == label


def judge(record: Record) -> Verdict:
    choice = choice_of(record.get("response") or "")
    valid = {option_letter(i) for i in range(len(record.get("options") or ()))}
    return (choice if choice in valid else None), check_ans(choice, record["answer"])


def aggregate(records: Sequence[Record]) -> Aggregate:
    tasks = pooled(records, lambda r: r["task"])
    return mean(row.accuracy for row in tasks), {"task": tasks}, {"micro": overall_row(records).accuracy}


def aggregate_pooled(records: Sequence[Record]) -> Aggregate:
    tasks = pooled(records, lambda r: r["task"])
    return overall_row(records).accuracy, {"task": tasks}, {"m_avg": mean(row.accuracy for row in tasks)}


OFFICIAL = Protocol(
    "official", prompt, judge, aggregate, expected=last_match_label, system_prompt=SYSTEM_PROMPT,
    headline="M-Avg: mean of the task accuracies",
    rule="MLVU's check_ans: the character before the first ')' (else the whole reply) equals the label",
)
PAPER = Protocol(
    "paper", rekv.prompt, rekv.judge, aggregate_pooled, expected=rekv.first_match_label,
    headline="accuracy over all questions (the paper's host)",
    rule="ReKV's extract_choice: the character before the first ')' (else the first character)",
)
BENCHMARK = BenchmarkSpec(
    name="mlvu", title="MLVU-dev multiple choice", online=False, default_fps=0.5, load=load, detect=detect,
    protocols={"official": OFFICIAL, "paper": PAPER}, aliases=("mlvu-dev",),
)

__all__ = [
    "ANSWER_PREFIX",
    "NO_MATCH",
    "OFFICIAL",
    "PAPER",
    "BENCHMARK",
    "SYSTEM_PROMPT",
    "aggregate",
    "aggregate_pooled",
    "check_ans",
    "choice_of",
    "judge",
    "last_match_label",
    "load",
    "prompt",
]
