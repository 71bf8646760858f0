"""What a benchmark module provides: its loader, and per protocol its prompt, reply rule, frame
timing and headline score.

A benchmark is one `BenchmarkSpec`; each of its protocols ("official", "paper") is one `Protocol`:

- `prompt(question) -> Prompt`: the text asked after the video and the text the answer turn starts
  with (e.g. "Best option: ("), as the benchmark's own evaluation code builds them;
- `expected(question)`: the label the rule compares with (an option letter, "Yes"/"No", a count;
  None when unlabelled), resolved as that code resolves it;
- `judge(record) -> (prediction, correct)`: the reply rule, on an answer record ("response",
  "answer" = the expected label, "options", "kind", "task"). `correct` is None when the rule
  leaves the question out of the accuracy (Video-MME's unanswered replies);
- `cut(t)`: for a question at `t` seconds, the clip end; the question sees the sampled frames
  strictly before it (None: offline, after the whole video);
- `aggregate(records) -> (overall, tables, extra)`: the headline number and its tables.

The aggregation helpers shared by the benchmark modules (`Row`, `pooled`, `mean`) live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..datasets import Loaded, Question

Record = Mapping[str, Any]
Verdict = tuple[Any, bool | None]
PROTOCOLS = ("official", "paper")


@dataclass(frozen=True)
class Prompt:
    """What a question pre-fills: `text` as the user turn after the video, `answer_prefix` as the
    start of the answer turn."""

    text: str
    answer_prefix: str = ""


@dataclass(frozen=True)
class Row:
    """One line of a score table: accuracy in percent (None without questions), and either
    correct/total (pooled) or `parts` (a mean of `parts` sub-scores over `total` questions)."""

    name: str
    accuracy: float | None
    correct: int | None = None
    total: int | None = None
    parts: int | None = None


# (overall, tables, extra figures): what an aggregation returns
Aggregate = tuple[float | None, dict[str, list[Row]], dict[str, float | None]]


def _identity_label(question: Question) -> str | int | None:
    return question.answer


@dataclass(frozen=True)
class Protocol:
    """One way of evaluating a benchmark (see the module docstring). rule: one line naming the
    reply rule and where it comes from; headline: how `aggregate` computes the overall number;
    system_prompt: the system turn (None: the model's default)."""

    name: str
    prompt: Callable[[Question], Prompt]
    judge: Callable[[Record], Verdict]
    aggregate: Callable[[Sequence[Record]], Aggregate]
    rule: str
    headline: str
    cut: Callable[[float], float] | None = None
    expected: Callable[[Question], str | int | None] = _identity_label
    system_prompt: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark: name and title, online (questions asked at their time) or offline, default
    sampling rate, loader, format sniffing, its protocols and the paper's numbers.

    detect(path, data): whether an annotation file is this benchmark's (data: the parsed JSON of a
    JSON file, else None). paper: {"uncompressed": x, "stc": y} where the paper reports this
    benchmark alone. companions: files read beside an annotation file (hashed with it). finish:
    writes extra outputs of a finished run (EgoSchema's submission), given its answer records, the
    results path and the protocol name; returns the paths written.
    """

    name: str
    title: str
    online: bool
    default_fps: float
    load: Callable[[Path, Path], Loaded]
    detect: Callable[[Path, Any], bool]
    protocols: dict[str, Protocol]
    paper: dict[str, float] | None = None
    aliases: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()
    finish: Callable[[Iterable[Record], Path, str], list[Path]] | None = None


def mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def pooled(records: Iterable[Record], key: Callable[[Record], str | None], order: Sequence[str] = ()) -> list[Row]:
    """Accuracy per group (records with `correct` None are left out), groups in `order` first."""
    groups: dict[str, list[bool]] = {}
    for record in records:
        name = key(record)
        if name is not None and record.get("correct") is not None:
            groups.setdefault(name, []).append(bool(record["correct"]))
    names = [n for n in order if n in groups] + sorted(n for n in groups if n not in order)
    return [Row(n, 100.0 * sum(groups[n]) / len(groups[n]), sum(groups[n]), len(groups[n])) for n in names]


def overall_row(records: Sequence[Record]) -> Row:
    """Accuracy over every record that counts."""
    counted = [r for r in records if r.get("correct") is not None]
    correct = sum(bool(r["correct"]) for r in counted)
    return Row("overall", 100.0 * correct / len(counted) if counted else None, correct, len(counted))


__all__ = [
    "Aggregate",
    "BenchmarkSpec",
    "PROTOCOLS",
    "Prompt",
    "Protocol",
    "Record",
    "Row",
    "Verdict",
    "mean",
    "overall_row",
    "pooled",
]
