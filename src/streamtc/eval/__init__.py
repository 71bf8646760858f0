"""Benchmark evaluation: stream each video through a session, ask every question when the stream
reaches it, score as each benchmark defines it, compare runs (docs/evaluation.md).

Modules, in the order a run uses them: `datasets` (annotation formats -> `VideoTask`s),
`protocol` (one video through one session), `results` (resumable JSON-lines files), `runner`
(plan, run, summarise; one process), `ray_runner` (the same on Ray actors), `scoring` (parsing and
each benchmark's aggregation, pure), `report` and `cli` (`streamtc eval ...`).
"""

from .datasets import (
    BENCHMARKS,
    AnnotationError,
    Benchmark,
    BenchmarkInfo,
    Question,
    VideoTask,
    detect_benchmark,
    load_benchmark,
)
from .protocol import EvalSettings, run_video
from .results import ResultsMismatchError, ResultsWriter, RunResults, read_results
from .runner import EvalRun, ModelSpec, summarize
from .scoring import Score, parse_prediction, score, timing_summary

__all__ = [
    "AnnotationError",
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkInfo",
    "EvalRun",
    "EvalSettings",
    "ModelSpec",
    "Question",
    "ResultsMismatchError",
    "ResultsWriter",
    "RunResults",
    "Score",
    "VideoTask",
    "detect_benchmark",
    "load_benchmark",
    "parse_prediction",
    "read_results",
    "run_video",
    "score",
    "summarize",
    "timing_summary",
]
