"""Benchmark evaluation: stream each video through a session, ask every question when the stream
reaches it, score as each benchmark defines it, compare runs (docs/evaluation.md).

Modules, in the order a run uses them: `datasets` (the common model: `Question`, `VideoTask`,
`Problem`), `benchmarks` (one module per benchmark: loaders, the official and the paper protocol,
registered in `benchmarks/__init__.py`), `streaming` (one video through one session), `results`
(resumable JSON-lines files), `runner` (plan, run, summarise; one process), `ray_runner` (the same
on Ray actors), `scoring` (judging and aggregation, pure), `report`; the commands (`streamtc eval ...`)
are `streamtc.cli.eval`.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .benchmarks import BENCHMARKS, BenchmarkSpec, Protocol, benchmark_spec, detect_benchmark, load_benchmark
    from .datasets import AnnotationError, Benchmark, Problem, Question, VideoTask
    from .results import ResultsMismatchError, ResultsWriter, RunResults, read_results
    from .runner import EvalRun, summarize
    from .scoring import Score, judge_record, score, timing_summary
    from .streaming import EvalSettings, run_video

# name -> submodule it is imported from when first used: the streaming loop and the runner import
# torch, which `streamtc eval --help` and the argument checks must not wait for
_LAZY = {
    **dict.fromkeys(("BENCHMARKS", "BenchmarkSpec", "Protocol", "benchmark_spec", "detect_benchmark",
                     "load_benchmark"), "benchmarks"),
    **dict.fromkeys(("AnnotationError", "Benchmark", "Problem", "Question", "VideoTask"), "datasets"),
    **dict.fromkeys(("ResultsMismatchError", "ResultsWriter", "RunResults", "read_results"), "results"),
    **dict.fromkeys(("EvalRun", "summarize"), "runner"),
    **dict.fromkeys(("Score", "judge_record", "score", "timing_summary"), "scoring"),
    **dict.fromkeys(("EvalSettings", "run_video"), "streaming"),
}


__getattr__ = lazy_names(__name__, _LAZY)


__all__ = [
    "AnnotationError",
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkSpec",
    "EvalRun",
    "EvalSettings",
    "Problem",
    "Protocol",
    "Question",
    "ResultsMismatchError",
    "ResultsWriter",
    "RunResults",
    "Score",
    "VideoTask",
    "benchmark_spec",
    "detect_benchmark",
    "judge_record",
    "load_benchmark",
    "read_results",
    "run_video",
    "score",
    "summarize",
    "timing_summary",
]
