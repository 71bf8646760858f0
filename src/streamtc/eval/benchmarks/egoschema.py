"""EgoSchema: five-way questions on three-minute egocentric clips, asked after the whole clip.

Formats: EgoSchema's `questions.json` ([{q_uid, question, "option 0".."option 4"}]) with
`subset_answers.json` ({q_uid: index}) beside it, or the paper's file (ReKV layout,
`rekv.conversations`; `video_id` is the q_uid). `egoschema` is the labelled 500-question subset;
`egoschema-full` answers all 5,031 and writes the submission file.

Official protocol. EgoSchema publishes no prompt and no reply parser: its scorer (the validation
server, `validate.py`) compares a submitted option index with the label. The reference generative
evaluation is lmms-eval's EgoSchema task (`lmms_eval/tasks/egoschema/utils.py`), reproduced here:

- Prompt (`egoschema_doc_to_text`): the question, each option on its own line as "A. text", then
  "\\nAnswer with the option's letter from the given choices directly.".
- Reply rule (`egoschema_process_results_generation`): the reply must equal a whole option ("A.
  text." with a final period), an option's text (after its "A. "), or a bare letter "A"; anything
  else is -1 (wrong). "A." and "(A)" are wrong, as is any reply with extra words.
- Headline: accuracy over the labelled questions; the submission maps each reply to its index.

Paper protocol (`rekv`): ReKV's prompt and reply rule, pooled accuracy; in the submission a reply
that names no letter A-E is "A" (ReKV's `eval_egoschema.py`).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
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
    read_json_records,
    require,
    resolve_video,
)
from . import rekv
from .base import Aggregate, BenchmarkSpec, Prompt, Protocol, Record, Row, Verdict, overall_row

INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


# -- loading ----------------------------------------------------------------------------------


def _load(annotations: Path, videos: Path, *, full: bool) -> Loaded:
    folder = annotations if annotations.is_dir() else annotations.parent
    file = annotations / "questions.json" if annotations.is_dir() else annotations
    data = read_json_records(file)
    questions: list[Question] = []
    problems: list[Problem] = []
    paths: dict[str, Path] = {}
    if rekv.is_conversation_file(data):
        for item, video, qid, conversation, point in rekv.conversations(data, file.name, videos, paths, problems):
            q_uid = str(conversation.get("q_uid") or item.get("q_uid") or item.get("video_id") or video)
            options = tuple(str(c) for c in conversation["choices"])
            answer = conversation.get("answer")
            if answer is not None and str(answer) not in options:
                problems.append(Problem(video, qid, f"{point}: answer {answer!r} is none of the choices"))
                continue
            label = None if answer is None else option_letter(options.index(str(answer)))
            questions.append(Question(video=video, qid=qid, text=str(conversation["question"]), kind="choice",
                                      options=options, answer=label, task="egoschema", extra={"q_uid": q_uid}))
    else:
        if not isinstance(data, list):
            raise AnnotationError(f"{file}: EgoSchema questions.json is a list of {{q_uid, question, option 0..4}}")
        answers_file = folder / "subset_answers.json"
        answers = json.loads(answers_file.read_text()) if answers_file.is_file() else {}
        for n, item in enumerate(data):
            where = f"{file.name} item {n}"
            q_uid = str(item.get("q_uid", f"{file.name}#{n}")) if isinstance(item, dict) else f"{file.name}#{n}"
            try:
                require(item, ("q_uid", "question"), where)
                keys = sorted((k for k in item if re.fullmatch(r"option \d+", k)), key=lambda k: int(k.split()[1]))
                if not keys:
                    raise AnnotationError(f"{where}: no 'option 0'.. fields")
                label = answers.get(q_uid)
                if label is not None and (isinstance(label, bool) or not isinstance(label, int)
                                          or not 0 <= label < len(keys)):
                    raise AnnotationError(f"{where}: subset answer {label!r} is not an option index")
            except AnnotationError as error:
                problems.append(Problem(q_uid, q_uid, str(error), "egoschema"))
                continue
            paths.setdefault(q_uid, resolve_video(videos, q_uid))
            questions.append(Question(video=q_uid, qid=q_uid, text=str(item["question"]), kind="choice",
                                      options=tuple(str(item[k]) for k in keys),
                                      answer=None if label is None else option_letter(label), task="egoschema",
                                      extra={"q_uid": q_uid}))
    if not full:
        questions = [q for q in questions if q.answer is not None]
        if not questions and not problems:
            raise AnnotationError(f"{file}: no labelled EgoSchema question (put subset_answers.json beside "
                                  "questions.json, or run 'egoschema-full')")
    return group(questions, paths, problems)


def load(annotations: Path, videos: Path) -> Loaded:
    """The labelled subset: unlabelled questions are left out."""
    return _load(annotations, videos, full=False)


def load_full(annotations: Path, videos: Path) -> Loaded:
    """Every question; unlabelled ones are answered for the submission file."""
    return _load(annotations, videos, full=True)


def detect(path: Path, data: Any) -> bool:
    if path.is_dir():
        return (path / "questions.json").is_file()
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    return "q_uid" in first or (rekv.is_conversation_file(data) and "ego" in path.name.lower())


# -- the official rules -----------------------------------------------------------------------


def lettered(options: Sequence[str]) -> list[str]:
    """The options as lmms-eval's EgoSchema data writes them: "A. text"."""
    return [f"{option_letter(i)}. {o}" for i, o in enumerate(options)]


def prompt(question: Question) -> Prompt:
    """`egoschema_doc_to_text`: question, options, instruction."""
    return Prompt(question.text + "".join("\n" + o for o in lettered(question.options or ())) + INSTRUCTION)


def process_results_generation(pred: str, options: Sequence[str]) -> int:
    """lmms-eval's `egoschema_process_results_generation`, transcribed: the index it gives the
    reply, -1 for none (options as "A. text")."""
    option_strs = [opt if opt.endswith(".") else opt + "." for opt in options]
    option_sents = [opt.split(". ")[1] if ". " in opt else opt for opt in option_strs]
    option_inds = [opt.split(". ")[0] if ". " in opt else opt for opt in option_strs]
    for idx, option_str in enumerate(option_strs):
        if pred == option_str:
            return idx
    for idx, option_sent in enumerate(option_sents):
        if pred == option_sent:
            return idx
    for idx, option_ind in enumerate(option_inds):
        if pred == option_ind or pred == option_ind.replace(".", ""):
            return idx
    return -1


def judge(record: Record) -> Verdict:
    index = process_results_generation(record.get("response") or "", lettered(record.get("options") or ()))
    prediction = option_letter(index) if index >= 0 else None
    return prediction, prediction == record["answer"]


def aggregate(records: Sequence[Record]) -> Aggregate:
    row = overall_row(records)
    return row.accuracy, {"subset": [Row("labelled questions", row.accuracy, row.correct, row.total)]}, {}


# -- the submission ---------------------------------------------------------------------------


def submission(records: Iterable[Record], protocol: str) -> dict[str, int]:
    """{q_uid: chosen option index} for every answer record; a reply that names no option is -1
    (official: the server counts it wrong) or 0 (paper: ReKV's "A")."""
    result: dict[str, int] = {}
    for record in records:
        q_uid = str((record.get("extra") or {}).get("q_uid") or record["qid"])
        prediction = record.get("prediction") if record.get("error") is None else None
        count = len(record.get("options") or ()) or 5
        valid = [option_letter(i) for i in range(count)]
        result[q_uid] = valid.index(prediction) if prediction in valid else (0 if protocol == "paper" else -1)
    return result


def write_submission(records: Iterable[Record], results_path: Path, protocol: str) -> list[Path]:
    """`<results stem>.submission.json` ({q_uid: index}, for the validation server) and `.csv`
    (q_uid,answer, for the Kaggle leaderboard)."""
    chosen = submission(records, protocol)
    base = results_path.with_name(results_path.stem + ".submission")
    json_path, csv_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".csv")
    json_path.write_text(json.dumps(chosen, indent=1))
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["q_uid", "answer"])
        writer.writerows(sorted(chosen.items()))
    return [json_path, csv_path]


OFFICIAL = Protocol(
    "official", prompt, judge, aggregate, headline="accuracy over the labelled questions",
    rule="lmms-eval's EgoSchema generation rule: the reply equals an option, its text or its letter",
)
PAPER = Protocol(
    "paper", rekv.prompt, rekv.judge, aggregate,
    headline="accuracy over the labelled questions (the paper's host)",
    rule="ReKV's extract_choice: the character before the first ')' (else the first character)",
)
BENCHMARK = BenchmarkSpec(
    name="egoschema", title="EgoSchema (labelled 500-question subset)", online=False, default_fps=0.5, load=load,
    detect=detect, protocols={"official": OFFICIAL, "paper": PAPER}, aliases=("egoschema-subset",),
    companions=("subset_answers.json",),
)
FULL_BENCHMARK = replace(
    BENCHMARK, name="egoschema-full", title="EgoSchema (full set, submission file)", load=load_full, aliases=(),
    detect=lambda path, data: False,  # the subset is detected; the full set is asked for by name
    finish=write_submission,
)

__all__ = [
    "FULL_BENCHMARK",
    "INSTRUCTION",
    "OFFICIAL",
    "PAPER",
    "BENCHMARK",
    "aggregate",
    "judge",
    "lettered",
    "load",
    "load_full",
    "process_results_generation",
    "prompt",
    "submission",
    "write_submission",
]
