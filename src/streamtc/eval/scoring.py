"""Answer parsing and each benchmark's own scoring, as pure functions over result records.

Parsing (`parse_prediction`) turns the model's free text into the comparable prediction:

- multiple choice: `streamtc.prompts.parse_option_letter`, which accepts "B", "b", "(B)", "B.",
  "[B]", "**B**", "B. the red cup", "B: cup", "The answer is B", "answer: (c)", "Option D", a single
  bracketed letter anywhere ("I think (C) fits"), or the exact text of one option; letters outside
  the options, and a lowercase article ("the answer is a cup"), are not read as choices;
- Yes/No (OVO-Bench SSR, CRR): "Yes"/"No"/"Y"/"N" (any case, trailing punctuation allowed) or text
  that starts with yes/no; otherwise the one of the two words that occurs (None if both or neither);
- counts (OVO-Bench REC): the first integer in the text, or a number word up to twenty.

An answer that parses to nothing, and a question whose video could not be read (`error`), are
counted wrong, as the benchmarks' own scripts count a missing response; both are also reported
separately (`Score.unparsed`, `Score.errors`). Questions without a label (EgoSchema's full set)
are left out of the accuracy (`Score.unlabelled`).

Aggregation, per benchmark (accuracies in percent):

- OVO-Bench: accuracy per task; forward-active tasks pool every trigger point of every item
  (per-trigger accuracy, as the official script does). A category's score is the mean of its
  tasks' accuracies; overall = mean of the three category scores (real-time, backward, forward).
- StreamingBench: accuracy per task type; overall = accuracy over all questions.
- MLVU: accuracy per task; overall = M-Avg, the mean of the task accuracies.
- Video-MME: accuracy per duration (short, medium, long) and per task type; overall = accuracy
  over all questions.
- EgoSchema: accuracy over the labelled questions.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..prompts import OPTION_LETTERS, parse_option_letter
from .datasets import OVO_CATEGORIES, benchmark_info

Record = Mapping[str, Any]

_NUMBER_WORDS = {
    word: value for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_YES = re.compile(r"\byes\b", re.IGNORECASE)
_NO = re.compile(r"\bno\b", re.IGNORECASE)


# -- parsing ----------------------------------------------------------------------------------


def parse_yes_no(text: str) -> str | None:
    """"Yes", "No" or None (see the module docstring)."""
    stripped = text.strip().strip("\"'*`“”").strip()
    short = stripped.rstrip(".!,;:").lower()
    if short in ("yes", "y"):
        return "Yes"
    if short in ("no", "n"):
        return "No"
    first = re.match(r"[A-Za-z]+", stripped)
    if first and first.group(0).lower() in ("yes", "no"):
        return first.group(0).capitalize()
    yes, no = bool(_YES.search(stripped)), bool(_NO.search(stripped))
    return "Yes" if yes and not no else "No" if no and not yes else None


def parse_count(text: str) -> int | None:
    """The first integer (digits or a number word up to twenty) in `text`, or None."""
    for token in re.finditer(r"\d+|[A-Za-z]+", text):
        word = token.group(0)
        if word.isdigit():
            return int(word)
        if word.lower() in _NUMBER_WORDS:
            return _NUMBER_WORDS[word.lower()]
    return None


def parse_prediction(kind: str, text: str, options: Sequence[str] | None = None) -> str | int | None:
    """The prediction a free-text answer makes for a question of `kind`."""
    if kind == "choice":
        if not options:
            raise ConfigError("a multiple-choice question needs its options to parse an answer")
        return parse_option_letter(text, options)
    if kind == "yes_no":
        return parse_yes_no(text)
    if kind == "count":
        return parse_count(text)
    raise ConfigError(f"unknown question kind {kind!r}")


def is_correct(record: Record) -> bool | None:
    """Whether an answer record is right; None when the question has no label."""
    if record.get("answer") is None:
        return None
    if record.get("error") is not None or record.get("prediction") is None:
        return False
    return record["prediction"] == record["answer"]


# -- aggregation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of a score table: accuracy in percent (None without questions), and either
    correct/total (pooled) or `parts` (a mean of `parts` sub-scores)."""

    name: str
    accuracy: float | None
    correct: int | None = None
    total: int | None = None
    parts: int | None = None


# (overall, tables, extra figures): what each benchmark's aggregation returns
Aggregate = tuple[float | None, dict[str, list[Row]], dict[str, float | None]]


@dataclass
class Score:
    """A benchmark's scores for one run.

    overall: the headline number (percent), computed by `rule`. tables: named tables of rows
    ("category", "task", "duration"). questions: labelled answers scored; errors / unparsed:
    among them, those whose video failed / whose text named no answer; unlabelled: answers left
    out; missing_videos: videos that failed, with the first error of each.
    """

    benchmark: str
    overall: float | None
    rule: str
    tables: dict[str, list[Row]] = field(default_factory=dict)
    questions: int = 0
    errors: int = 0
    unparsed: int = 0
    unlabelled: int = 0
    missing_videos: dict[str, str] = field(default_factory=dict)
    extra: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _pooled(records: Sequence[Record], key: Callable[[Record], str | None],
            order: Sequence[str] | None = None) -> list[Row]:
    """Accuracy per group of `key`, in `order` first, then by name."""
    groups: dict[str, list[bool]] = {}
    for record in records:
        name = key(record)
        if name is not None:
            groups.setdefault(name, []).append(bool(is_correct(record)))
    names = [n for n in (order or []) if n in groups] + sorted(n for n in groups if n not in (order or []))
    return [Row(n, 100.0 * sum(groups[n]) / len(groups[n]), sum(groups[n]), len(groups[n])) for n in names]


def _overall_row(records: Sequence[Record]) -> Row:
    correct = sum(bool(is_correct(r)) for r in records)
    return Row("overall", 100.0 * correct / len(records) if records else None, correct, len(records))


def score_ovobench(records: Sequence[Record]) -> Aggregate:
    tasks = _pooled(records, lambda r: r["task"], list(OVO_CATEGORIES))
    categories = []
    for category in ("real-time", "backward", "forward"):
        members = [row for row in tasks if OVO_CATEGORIES.get(row.name) == category]
        if members:
            total = sum(row.total or 0 for row in members)
            categories.append(Row(category, _mean(row.accuracy for row in members), total=total, parts=len(members)))
    overall = _mean(row.accuracy for row in categories)
    return overall, {"category": categories, "task": tasks}, {"task_mean": _mean(row.accuracy for row in tasks)}


def score_streamingbench(records: Sequence[Record]) -> Aggregate:
    return _overall_row(records).accuracy, {"task": _pooled(records, lambda r: r["task"])}, {}


def score_mlvu(records: Sequence[Record]) -> Aggregate:
    tasks = _pooled(records, lambda r: r["task"])
    return _mean(row.accuracy for row in tasks), {"task": tasks}, {"micro": _overall_row(records).accuracy}


def score_videomme(records: Sequence[Record]) -> Aggregate:
    durations = _pooled(records, lambda r: r.get("category"), ["short", "medium", "long"])
    tables = {"duration": durations}
    tasks = _pooled(records, lambda r: r["task"])
    if len(tasks) > 1:
        tables["task"] = tasks
    return _overall_row(records).accuracy, tables, {}


def score_egoschema(records: Sequence[Record]) -> Aggregate:
    row = _overall_row(records)
    return row.accuracy, {"subset": [Row("labelled subset", row.accuracy, row.correct, row.total)]}, {}


SCORERS: dict[str, Callable[[Sequence[Record]], Aggregate]] = {
    "ovobench": score_ovobench,
    "streamingbench": score_streamingbench,
    "mlvu": score_mlvu,
    "egoschema": score_egoschema,
    "egoschema-full": score_egoschema,
    "videomme": score_videomme,
}


def score(benchmark: str, records: Iterable[Record]) -> Score:
    """Score answer records (one per question key; see `results.read_results`) as `benchmark`
    defines it."""
    info = benchmark_info(benchmark)
    records = list(records)
    labelled = [r for r in records if r.get("answer") is not None]
    overall, tables, extra = SCORERS[info.name](labelled)
    missing: dict[str, str] = {}
    for record in records:
        if record.get("error") is not None:
            missing.setdefault(record["video"], record["error"])
    return Score(
        benchmark=info.name, overall=overall, rule=info.headline, tables=tables, questions=len(labelled),
        errors=sum(r.get("error") is not None for r in labelled),
        unparsed=sum(r.get("error") is None and r.get("prediction") is None for r in labelled),
        unlabelled=len(records) - len(labelled), missing_videos=missing, extra=extra,
    )


# -- timing -----------------------------------------------------------------------------------


def timing_summary(answers: Iterable[Record], videos: Iterable[Record]) -> dict[str, Any]:
    """Per-run cost: ViT, pruning and pre-fill ms per frame (over every frame streamed), answer
    latency (TTFT and total, mean and median over answered questions), share of visual tokens
    kept, peak memory, and wall time."""
    answers = [a for a in answers if a.get("error") is None and a.get("ttft_ms") is not None]
    videos = [v for v in videos if v.get("frames")]
    frames = sum(v["frames"] for v in videos)
    encoded = sum(v.get("visual_tokens_encoded", 0) for v in videos)

    def per_frame(key: str) -> float | None:
        return sum(v.get(key, 0.0) for v in videos) / frames if frames else None

    def stat(key: str, fn: Callable[[list[float]], float]) -> float | None:
        values = [a[key] for a in answers if a.get(key) is not None]
        return fn(values) if values else None

    return {
        "videos": len(videos),
        "frames": frames,
        "vit_ms_per_frame": per_frame("vit_ms"),
        "prune_ms_per_frame": per_frame("prune_ms"),
        "prefill_ms_per_frame": per_frame("prefill_ms"),
        "ttft_ms_mean": stat("ttft_ms", statistics.fmean),
        "ttft_ms_median": stat("ttft_ms", statistics.median),
        "answer_ms_mean": stat("total_ms", statistics.fmean),
        "tokens_kept": sum(v.get("visual_tokens", 0) for v in videos) / encoded if encoded else None,
        "peak_memory_bytes": max((v.get("peak_memory_bytes", 0) for v in videos), default=0),
        "wall_s": sum(v.get("wall_s", 0.0) for v in videos),
    }


def retention(value: float | None, reference: float | None) -> float | None:
    """value / reference in percent (accuracy kept relative to a reference run)."""
    if value is None or reference is None or reference == 0 or math.isnan(reference):
        return None
    return 100.0 * value / reference


# -- EgoSchema submission ---------------------------------------------------------------------


def egoschema_submission(records: Iterable[Record]) -> dict[str, int]:
    """{q_uid: chosen option index} for every EgoSchema answer record; -1 where the answer named
    no option or the video failed (the server counts it wrong)."""
    submission: dict[str, int] = {}
    for record in records:
        q_uid = (record.get("extra") or {}).get("q_uid") or record["qid"]
        prediction = record.get("prediction") if record.get("error") is None else None
        submission[str(q_uid)] = OPTION_LETTERS.index(prediction) if isinstance(prediction, str) else -1
    return submission


def write_egoschema_submission(records: Iterable[Record], path: str | Path) -> tuple[Path, Path]:
    """Write the submission as `<path>.json` ({q_uid: index}, for the validation server) and
    `<path>.csv` (q_uid,answer, for the Kaggle leaderboard); returns both paths."""
    submission = egoschema_submission(records)
    path = Path(path)
    json_path, csv_path = path.with_name(path.name + ".json"), path.with_name(path.name + ".csv")
    json_path.write_text(json.dumps(submission, indent=1))
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["q_uid", "answer"])
        writer.writerows(sorted(submission.items()))
    return json_path, csv_path


__all__ = [
    "Row",
    "SCORERS",
    "Score",
    "egoschema_submission",
    "is_correct",
    "parse_count",
    "parse_prediction",
    "parse_yes_no",
    "retention",
    "score",
    "score_egoschema",
    "score_mlvu",
    "score_ovobench",
    "score_streamingbench",
    "score_videomme",
    "timing_summary",
    "write_egoschema_submission",
]
