"""The paper's host for the offline benchmarks (ReKV's video-QA code, as run for the STC paper):
its multiple-choice prompt, reply rule and label resolution, shared by MLVU, EgoSchema and
Video-MME in the `paper` protocol.

- Prompt (`video_qa/base.py`, `format_mcqa_prompt`): "Question: {question}\\nOptions:\\n(A)
  {choice}\\n(B) ...\\nOnly give the best option.", the answer turn starting "Best option: ("
  (`get_prompt(..., mc=True)` of the LLaVA-OneVision wrapper). Choices are written as published:
  Video-MME's "A. Apples." becomes "(A) A. Apples.".
- Reply rule (`extract_choice`): strip; when the reply holds ")", the character just before the
  first ")" ("" when the reply starts with it); otherwise its first character; an empty reply
  reads as "A". Case-sensitive: "b) text" is "b", which matches no label.
- Label (`_get_correct_choice`): the letter of the first choice equal to the answer; an answer
  that matches no choice is "A" (with a warning there); an unlabelled question is "A" too, which
  only matters for a submission.
- Score: the mean of 0/1 over every question (pooled accuracy).

The paper's annotation files share one layout, read by `conversations`: a list of {video_id,
video_path, duration, conversations: [{question, choices, answer, ...}]}. `video_id` may repeat
(MLVU's task folders hold videos of the same name; Video-MME has one entry per question), so a
video is identified by its path (task folder and file name) and a question by its entry and
position, "<entry>/<k>".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..datasets import AnnotationError, Problem, Question, option_letter, require, resolve_video
from .base import Prompt, Record, Verdict

ANSWER_PREFIX = "Best option: ("


def prompt(question: Question) -> Prompt:
    choices = "\n".join(f"({option_letter(i)}) {c}" for i, c in enumerate(question.options or ()))
    return Prompt(f"Question: {question.text}\nOptions:\n{choices}\nOnly give the best option.", ANSWER_PREFIX)


def extract_choice(reply: str) -> str:
    """ReKV's `extract_choice`, transcribed."""
    reply = reply.strip()
    if ")" in reply:
        index = reply.index(")")
        return reply[index - 1:index]
    return reply[0] if reply else "A"


def first_match_label(question: Question) -> str:
    """The letter of the first choice equal to the answer (text), else "A"."""
    options = list(question.options or ())
    return option_letter(options.index(question.answer)) if question.answer in options else "A"


def judge(record: Record) -> Verdict:
    choice = extract_choice(record.get("response") or "")
    return choice, choice == record["answer"]


def is_conversation_file(data: Any) -> bool:
    """Whether parsed JSON has the paper's layout."""
    return (isinstance(data, list) and bool(data) and isinstance(data[0], dict)
            and "conversations" in data[0] and ("video_path" in data[0] or "video_id" in data[0]))


def conversations(
    data: list[Any], name: str, videos: Path, paths: dict[str, Path], problems: list[Problem],
) -> Iterator[tuple[dict[str, Any], str, str, dict[str, Any], str]]:
    """(entry, video key, qid, conversation, where) of every readable conversation; entries and
    conversations that cannot be read become Problems."""
    for n, item in enumerate(data):
        where = f"{name} entry {n}"
        try:
            require(item, ("conversations",), where)
            if "video_path" not in item and "video_id" not in item:
                raise AnnotationError(f"{where}: needs video_path or video_id")
            if not isinstance(item["conversations"], list):
                raise AnnotationError(f"{where}: conversations must be a list")
        except AnnotationError as error:
            problems.append(Problem(f"{name}#{n}", "entry", str(error)))
            continue
        reference = Path(str(item.get("video_path") or item["video_id"]))
        video = f"{reference.parent.name}/{reference.name}" if reference.parent.name else reference.name
        if video not in paths:
            nested = videos / reference.parent.name / reference.name
            paths[video] = nested if reference.parent.name and nested.is_file() else resolve_video(videos, str(reference))
        for k, conversation in enumerate(item["conversations"]):
            qid, point = f"{n}/{k}", f"{where} conversation {k}"
            try:
                require(conversation, ("question", "choices"), point)
                if not isinstance(conversation["choices"], list) or not conversation["choices"]:
                    raise AnnotationError(f"{point}: choices must be a non-empty list")
            except AnnotationError as error:
                problems.append(Problem(video, qid, str(error)))
                continue
            yield item, video, qid, conversation, point


__all__ = [
    "ANSWER_PREFIX",
    "conversations",
    "extract_choice",
    "first_match_label",
    "is_conversation_file",
    "judge",
    "prompt",
]
