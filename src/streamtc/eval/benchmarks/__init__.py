"""The benchmarks, one module each, registered here (a new benchmark is one module and one line).

Each module (`ovobench`, `streamingbench`, `mlvu`, `egoschema`, `videomme`) holds its loaders for
every published form, its official prompt, reply rule, frame timing and headline score, the
`paper` protocol (what the STC paper's host did) and the paper's numbers, as one `BenchmarkSpec`
(`base`). `rekv` holds what the paper's host shares across the offline benchmarks.

    spec = benchmark_spec("ovobench")
    benchmark = load_benchmark("auto", "ovo_bench_new.json", videos="data/ovo")
    benchmark.spec.protocols["official"].cut(4.2)     # 5.0: the question sees frames before 5 s
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...checks import positive_int
from ...errors import ConfigError
from ..datasets import AnnotationError, Benchmark, read_json_records
from . import egoschema, mlvu, ovobench, streamingbench, videomme
from .base import PROTOCOLS, BenchmarkSpec, Prompt, Protocol

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (ovobench.BENCHMARK, streamingbench.BENCHMARK, mlvu.BENCHMARK, egoschema.BENCHMARK,
                 egoschema.FULL_BENCHMARK, videomme.BENCHMARK)
}
ALIASES = {alias: spec.name for spec in BENCHMARKS.values() for alias in spec.aliases}
# The paper reports EgoSchema, MLVU and Video-MME as one average (ReKV + LLaVA-OV-7B).
PAPER_OFFLINE_AVERAGE = {"uncompressed": 61.3, "stc": 60.8}


def benchmark_spec(name: str) -> BenchmarkSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)} or 'auto'")
    return BENCHMARKS[key]


def protocol_of(benchmark: str, protocol: str) -> Protocol:
    """The named protocol of a benchmark."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}")
    return benchmark_spec(benchmark).protocols[protocol]


def detect_benchmark(annotations: Path) -> str:
    """The benchmark whose format an annotation file (or directory) has; AnnotationError when none
    or the format is shared and the file name does not tell."""
    data = None
    if annotations.is_file() and annotations.suffix.lower() not in (".csv", ".parquet"):
        data = read_json_records(annotations)
    for spec in BENCHMARKS.values():
        if spec.detect(annotations, data):
            return spec.name
    raise AnnotationError(
        f"{annotations}: cannot tell which benchmark this is; give its name ({', '.join(sorted(BENCHMARKS))})"
    )


def load_benchmark(name: str, annotations: str | Path, videos: str | Path) -> Benchmark:
    """Load `annotations` as benchmark `name` ("auto": detect it), videos resolved under `videos`."""
    annotations, videos = Path(annotations), Path(videos)
    if not annotations.exists():
        raise AnnotationError(f"{annotations}: no such annotation file")
    spec = benchmark_spec(detect_benchmark(annotations) if name == "auto" else name)
    loaded = spec.load(annotations, videos)
    return Benchmark(spec, annotations, videos, tuple(loaded.tasks), tuple(loaded.problems))


def limit_videos(benchmark: Benchmark, max_videos: int | None) -> Benchmark:
    """The first `max_videos` videos (in annotation order), and the problems among them; for smoke
    runs."""
    if max_videos is None:
        return benchmark
    positive_int(max_videos, "max_videos")
    tasks = benchmark.tasks[:max_videos]
    kept = {t.video for t in tasks}
    return replace(benchmark, tasks=tasks, problems=tuple(p for p in benchmark.problems if p.video in kept))


__all__ = [
    "ALIASES",
    "BENCHMARKS",
    "BenchmarkSpec",
    "PAPER_OFFLINE_AVERAGE",
    "PROTOCOLS",
    "Prompt",
    "Protocol",
    "benchmark_spec",
    "detect_benchmark",
    "limit_videos",
    "load_benchmark",
    "protocol_of",
]
