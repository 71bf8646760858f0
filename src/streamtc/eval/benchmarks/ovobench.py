"""OVO-Bench: online video QA at the question's time, backward, real-time and forward-active tasks.

Format (`ovo_bench_new.json`, OVO-Bench's GitHub): a list of {id, task, video, realtime, question,
options, gt} (gt: index of the right option) for the backward (EPM, ASI, HLD) and real-time (OCR,
ACR, ATR, STU, FPD, OJR) tasks; forward-active items carry trigger points in `test_info`: REC
{activity, test_info [{realtime, count}]}, SSR {test_info [{realtime, step, type}]}, CRR {question,
test_info [{realtime, type}]} (type 1 = "Yes", 0 = "No"). Each trigger point is one question.

Official protocol (OVO-Bench's `constant.py` prompts, `utils/OVOBench.py` clips,
`utils/OVOBenchScore.py` scorer):

- Prompts: the four templates of `constant.py`, byte for byte (leading and trailing newlines,
  trailing spaces, typos included); options are written "A. x; B. y; C. z;".
- Clip: `subclip(0, ceil(realtime))`, so a question at t sees the frames sampled in [0, ceil(t)):
  at 1 fps, ceil(t) frames (5 at t = 5.0 and at t = 4.2).
- Reply rules, quirks kept: a choice is right when the right letter occurs anywhere in the reply
  (case-sensitive substring: "A or B" is right for both, "Answer: B" is right when the answer is
  A, "b" is never right); REC joins every digit of the reply and compares with the count ("1 or
  2" reads 12); SSR/CRR are right when the reply is exactly "Y"/"N" or contains "Yes"/"No"
  (case-sensitive: "yes" is wrong, "Not sure" contains "No").
- Headline: the mean of the three category means (real-time, backward, forward), OVO-Bench's
  published "Overall"; the scorer's "Total Avg." (mean over the 12 tasks) is shown as `task_mean`.

Paper protocol (the STC paper's ReKV adapter for OVO-Bench): the same prompts, clips and scorer,
applied to the last line of the stripped reply (the adapter keeps only that line).
"""

from __future__ import annotations

import math
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
    parse_timestamp,
    read_json_records,
    require,
    resolve_video,
)
from .base import Aggregate, BenchmarkSpec, Prompt, Protocol, Record, Row, Verdict, mean, pooled

CATEGORIES = {
    "OCR": "real-time", "ACR": "real-time", "ATR": "real-time", "STU": "real-time", "FPD": "real-time",
    "OJR": "real-time",
    "EPM": "backward", "ASI": "backward", "HLD": "backward",
    "REC": "forward", "SSR": "forward", "CRR": "forward",
}
FORWARD_TASKS = ("REC", "SSR", "CRR")

# OVO-Bench's constant.py, verbatim.
BR_PROMPT_TEMPLATE = (
    "\nQuestion: {}\nOptions:\n{}\n\nRespond only with the letter corresponding to your chosen option "
    "(e.g., A, B, C). \nDo not include any additional text or explanation in your response.\n"
)
REC_PROMPT_TEMPLATE = (
    "\nYou're watching a video in which people may perform a certain type of action repetively. \n"
    "The person performing this kind of action are referred to as 'they' in the following statement.\n"
    "You're task is to count how many times have different people in the video perform this kind of action "
    "in total.\nOne complete motion counts as one. \nNow, answer the following question: {}\n"
    "Provide your answer as a single number (e.g., 0, 1, 2, 3…) indicating the total count.\n"
    "Do not include any additional text or explanation in your response.\n"
)
SSR_PROMPT_TEMPLATE = (
    "\nYou're watching a tutorial video which contain a sequential of steps. \n"
    "The following is one step from the whole procedures: \n{}\n"
    "Your task is to determine if the man or woman in the video is currently performing this step.\n"
    "Answer only with “Yes” or “No”.\nDo not include any additional text or explanation in your response.\n"
)
CRR_PROMPT_TEMPLATE = (
    "\nYou're responsible of answering questions based on the video content. \n"
    "The following question are relevant to the latest frames, i.e. the end of the video.\n{}\n"
    "Decide whether existing visual content, especially latest frames, i.e. frames that near the end of the "
    "video, provide enough information for answering the question.\n"
    "Answer only with “Yes” or “No”.\nDo not include any additional text or explanation in your response.\n"
)


# -- loading ----------------------------------------------------------------------------------


def _item_questions(item: Any, where: str) -> list[Question]:
    require(item, ("id", "task", "video"), where)
    task = str(item["task"])
    if task not in CATEGORIES:
        raise AnnotationError(f"{where}: unknown OVO-Bench task {task!r}; known: {sorted(CATEGORIES)}")
    common = {"video": str(item["video"]), "qid": str(item["id"]), "task": task, "category": CATEGORIES[task]}
    if task not in FORWARD_TASKS:
        require(item, ("realtime", "question", "options", "gt"), where)
        options = tuple(str(o) for o in item["options"])
        gt = item["gt"]
        if isinstance(gt, bool) or not isinstance(gt, int) or not 0 <= gt < len(options):
            raise AnnotationError(f"{where}: gt {gt!r} is not an index into its {len(options)} options")
        return [Question(**common, text=str(item["question"]), kind="choice", options=options,
                         answer=option_letter(gt), time=_time(item["realtime"], where))]
    require(item, ("test_info",), where)
    if task == "REC":
        require(item, ("activity",), where)
    if task == "CRR":
        require(item, ("question",), where)
    questions = []
    for trigger, info in enumerate(item["test_info"]):
        point = f"{where} trigger {trigger}"
        require(info, ("realtime", "count" if task == "REC" else "type", *(("step",) if task == "SSR" else ())), point)
        if task == "REC":
            kind, answer, text = "count", int(info["count"]), str(item["activity"])
        else:
            kind, answer = "yes_no", "Yes" if int(info["type"]) == 1 else "No"
            text = str(info["step"]) if task == "SSR" else str(item["question"])
        questions.append(Question(**common, text=text, kind=kind, answer=answer, trigger=trigger,
                                  time=_time(info["realtime"], point)))
    return questions


def _time(value: Any, where: str) -> float:
    try:
        return parse_timestamp(value)
    except AnnotationError as error:
        raise AnnotationError(f"{where}: realtime {error}") from None


def load(annotations: Path, videos: Path) -> Loaded:
    """OVO-Bench's JSON: backward/real-time items asked at `realtime`, forward items at every
    trigger point. An item (or trigger point) that cannot be read is a Problem."""
    data = read_json_records(annotations)
    if not isinstance(data, list):
        raise AnnotationError(f"{annotations}: OVO-Bench annotations are a JSON list of items")
    questions: list[Question] = []
    problems: list[Problem] = []
    paths: dict[str, Path] = {}
    for n, item in enumerate(data):
        where = f"{annotations.name} item {n}"
        try:
            found = _item_questions(item, where)
        except (AnnotationError, TypeError, ValueError) as error:
            message = str(error) if isinstance(error, AnnotationError) else f"{where}: {error}"
            video = str(item.get("video", f"{annotations.name}#{n}")) if isinstance(item, dict) else f"#{n}"
            qid = str(item.get("id", f"item{n}")) if isinstance(item, dict) else f"item{n}"
            task = str(item.get("task", "unreadable")) if isinstance(item, dict) else "unreadable"
            problems.append(Problem(video, qid, message, task))
            continue
        for question in found:
            paths.setdefault(question.video, resolve_video(videos, question.video))
        questions += found
    return group(questions, paths, problems)


def detect(path: Path, data: Any) -> bool:
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    return "task" in first and ("realtime" in first or "test_info" in first)


# -- the official rules -----------------------------------------------------------------------


def prompt(question: Question) -> Prompt:
    """OVO-Bench's `build_prompt` with the `constant.py` templates."""
    if question.task == "REC":
        return Prompt(REC_PROMPT_TEMPLATE.format("How many times did they " + question.text + "?"))
    if question.task == "SSR":
        return Prompt(SSR_PROMPT_TEMPLATE.format(question.text))
    if question.task == "CRR":
        return Prompt(CRR_PROMPT_TEMPLATE.format(question.text))
    options = "; ".join(f"{option_letter(i)}. {o}" for i, o in enumerate(question.options or ())) + ";"
    return Prompt(BR_PROMPT_TEMPLATE.format(question.text, options))


def score_reply(kind: str, response: str | None, answer: str | int) -> bool:
    """OVO-Bench's `get_score` / `get_score_REC` / the SSR-CRR rule, transcribed (None: 0)."""
    if response is None:
        return False
    if kind == "count":
        return "".join(re.findall(r"\d+", response)) == str(answer)
    if kind == "yes_no" and ((response == "N" and answer == "No") or (response == "Y" and answer == "Yes")):
        return True
    return str(answer) in response


def _prediction(kind: str, response: str, options: Sequence[str] | None) -> str | int | None:
    """What the reply offers under the official rule, for display: the option letters it
    contains, its joined digits, or the Yes/No words it contains."""
    if kind == "count":
        digits = "".join(re.findall(r"\d+", response))
        return int(digits) if digits else None
    if kind == "yes_no":
        words = [w for w, short in (("Yes", "Y"), ("No", "N")) if w in response or response == short]
        return "/".join(words) or None
    letters = "".join(option_letter(i) for i in range(len(options or ())) if option_letter(i) in response)
    return letters or None


def judge(record: Record) -> Verdict:
    response = record.get("response")
    return (None if response is None else _prediction(record["kind"], response, record.get("options")),
            score_reply(record["kind"], response, record["answer"]))


def last_line(response: str | None) -> str | None:
    """The paper adapter's reply: the last line of the stripped reply ("" when empty)."""
    if response is None:
        return None
    lines = response.strip().splitlines()
    return lines[-1] if lines else ""


def judge_paper(record: Record) -> Verdict:
    return judge({**record, "response": last_line(record.get("response"))})


def cut(time: float) -> float:
    """The clip [0, ceil(t))."""
    return float(math.ceil(time))


def aggregate(records: Sequence[Record]) -> Aggregate:
    tasks = pooled(records, lambda r: r["task"], list(CATEGORIES))
    categories = []
    for category in ("real-time", "backward", "forward"):
        members = [row for row in tasks if CATEGORIES.get(row.name) == category]
        if members:
            total = sum(row.total or 0 for row in members)
            categories.append(Row(category, mean(row.accuracy for row in members), total=total, parts=len(members)))
    overall = mean(row.accuracy for row in categories)
    return overall, {"category": categories, "task": tasks}, {"task_mean": mean(row.accuracy for row in tasks)}


HEADLINE = "mean of the real-time, backward and forward category means"
OFFICIAL = Protocol(
    "official", prompt, judge, aggregate, cut=cut, headline=HEADLINE,
    rule="OVO-Bench's scorer: right letter / Yes / No anywhere in the reply; REC: all digits joined",
)
PAPER = Protocol(
    "paper", prompt, judge_paper, aggregate, cut=cut, headline=HEADLINE,
    rule="OVO-Bench's scorer on the last line of the reply (the paper's ReKV adapter)",
)
BENCHMARK = BenchmarkSpec(
    name="ovobench", title="OVO-Bench", online=True, default_fps=1.0, load=load, detect=detect,
    protocols={"official": OFFICIAL, "paper": PAPER}, paper={"uncompressed": 52.6, "stc": 52.0},
    aliases=("ovo-bench", "ovo"),
)

__all__ = [
    "BR_PROMPT_TEMPLATE",
    "CATEGORIES",
    "CRR_PROMPT_TEMPLATE",
    "FORWARD_TASKS",
    "OFFICIAL",
    "PAPER",
    "REC_PROMPT_TEMPLATE",
    "BENCHMARK",
    "SSR_PROMPT_TEMPLATE",
    "aggregate",
    "cut",
    "judge",
    "judge_paper",
    "last_line",
    "load",
    "prompt",
    "score_reply",
]
