"""Scoring: every answer record judged by its benchmark's protocol, then aggregated, as pure
functions over result records; the cost of a run; retention against a reference.

`judge_record` applies the protocol's reply rule to a record's reply (`response`) and label
(`answer`); a record whose video failed or whose question could not be read (`error`) is wrong,
an unlabelled one (EgoSchema's full set) is left out. `score` re-judges every record, so a report
always follows the current rules, whatever the file recorded when it was written.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .benchmarks import protocol_of
from .benchmarks.base import Protocol, Row, Verdict

Record = Mapping[str, Any]


def judge_record(protocol: Protocol, record: Record) -> Verdict:
    """(prediction, correct) of an answer record under `protocol` (see the module docstring)."""
    if record.get("error") is not None:
        return None, False
    prediction, correct = protocol.judge(record)
    return prediction, None if record.get("answer") is None else correct


@dataclass
class Score:
    """A benchmark's scores for one run.

    overall: the headline number (percent) as `headline` says. tables: named tables of rows.
    questions: answer records that count; errors / unparsed: among them, those that failed (video
    or record unreadable, or a clip without frames) / whose reply named nothing; excluded: labelled answers the official
    rule leaves out of the accuracy (Video-MME's unanswered replies); unlabelled: answers without
    a label; missing_videos: failed videos with their first error.
    """

    benchmark: str
    protocol: str
    overall: float | None
    headline: str
    rule: str
    tables: dict[str, list[Row]] = field(default_factory=dict)
    questions: int = 0
    errors: int = 0
    unparsed: int = 0
    excluded: int = 0
    unlabelled: int = 0
    missing_videos: dict[str, str] = field(default_factory=dict)
    extra: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tables"] = {name: [asdict(row) for row in rows] for name, rows in self.tables.items()}
        return data


def score(benchmark: str, protocol: str, records: Iterable[Record]) -> Score:
    """Judge and aggregate answer records (one per question key) as `benchmark`'s `protocol`
    defines it."""
    rules = protocol_of(benchmark, protocol)
    judged = []
    for record in records:
        prediction, correct = judge_record(rules, record)
        judged.append({**record, "prediction": prediction, "correct": correct})
    # an unreadable annotation record has no label but counts: it is wrong, as an unasked question is
    labelled = [r for r in judged if r.get("answer") is not None or r.get("error_kind") == "annotation"]
    counted = [r for r in labelled if r["correct"] is not None]
    overall, tables, extra = rules.aggregate(counted)
    missing: dict[str, str] = {}
    for record in judged:
        if record.get("error") is not None and record.get("error_kind", "video") == "video":
            missing.setdefault(record["video"], record["error"])
    return Score(
        benchmark=benchmark, protocol=protocol, overall=overall, headline=rules.headline, rule=rules.rule,
        tables=tables, questions=len(counted), errors=sum(r.get("error") is not None for r in counted),
        unparsed=sum(r.get("error") is None and r["prediction"] is None for r in counted),
        excluded=len(labelled) - len(counted), unlabelled=len(judged) - len(labelled), missing_videos=missing,
        extra=extra,
    )


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


__all__ = ["Row", "Score", "judge_record", "retention", "score", "timing_summary"]
