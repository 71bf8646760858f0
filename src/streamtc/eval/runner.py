"""Run a benchmark: plan what is left to answer, answer it (one process or Ray actors), score it.

    run = EvalRun(benchmark, ModelSpec(preset="tiny-llava-ov", stc=STCConfig().to_dict()),
                  "runs/ovo_stc.jsonl", EvalSettings(fps=1.0), protocol="official")
    run.pending_questions            # what this invocation will ask (0 when the file is complete)
    summary = run.run()              # or run.run(ray_address="local", actors=2)
    summary["score"]["overall"]

The results file is opened (and its header checked) when the run is built, so a mismatched or
locked file fails before any model is loaded. Records the benchmark could not read are written
first, as error lines. Without Ray, one session is built and reset for every video; with Ray,
each actor builds its own (`ray_runner`). Either way every record goes through the same writer, in
the order answers arrive; records of one video stay in time order.
"""

from __future__ import annotations

import datetime
import functools
import logging
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import STCConfig
from ..presets import torch_dtype
from .benchmarks import protocol_of
from .benchmarks.base import Protocol
from .datasets import Benchmark, VideoTask
from .results import FORMAT, Key, ResultsWriter, read_results
from .scoring import judge_record, score, timing_summary
from .streaming import STREAM_VERSION, EvalSettings, problem_record, run_video

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Which model and STC setting to evaluate; picklable, so Ray actors can build it too.

    model: real weights (a directory or hub id; LLaVA-OneVision, Qwen2-VL or Qwen2.5-VL, see
    `streamtc.hosts`; Qwen-VL needs stc without the Cacher for now); None uses `preset` (random
    weights, built from `seed`; `num_layers` overrides the vision tower depth). stc: an
    `STCConfig.to_dict()`, or None for the uncompressed model. dtype: "float32", "bfloat16" or
    "float16". window_tokens: bound each stream's cache to the chat prefix and the newest frames
    holding at most this many visual tokens (`SlidingWindowCache`); None keeps every token.
    system_prompt: the system turn (None: the session's default); set from the benchmark protocol.
    """

    model: str | None = None
    preset: str = "tiny-llava-ov"
    num_layers: int | None = None
    seed: int = 0
    stc: dict[str, Any] | None = None
    dtype: str = "float32"
    window_tokens: int | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)  # validates
        if self.window_tokens is not None:
            from ..memory import SlidingWindowCache

            SlidingWindowCache(self.window_tokens)  # validates
        if self.stc is not None:
            STCConfig.from_dict(self.stc)  # validates

    @property
    def model_id(self) -> str:
        """The weights' path or hub id, or "preset:<name>" for a random-weight preset."""
        return self.model if self.model is not None else f"preset:{self.preset}"

    def identity(self) -> dict[str, Any]:
        """What determines the model's answers (goes into the results header's config)."""
        if self.model is not None:
            return {"id": self.model, "dtype": self.dtype, "window_tokens": self.window_tokens,
                    "system_prompt": self.system_prompt}
        return {"id": self.model_id, "num_layers": self.num_layers, "seed": self.seed, "dtype": self.dtype,
                "window_tokens": self.window_tokens, "system_prompt": self.system_prompt}

    def build(self, device: str | torch.device = "cpu") -> Any:
        """A `StreamingSession` on `device`."""
        from ..memory import SlidingWindowCache
        from ..session import StreamingSession

        stc = None if self.stc is None else STCConfig.from_dict(self.stc)
        dtype = torch_dtype(self.dtype)
        policy: dict[str, Any] = {} if self.window_tokens is None else {
            "cache_policy": functools.partial(SlidingWindowCache, self.window_tokens)}
        if self.system_prompt is not None:
            policy["system_prompt"] = self.system_prompt
        if self.model is not None:
            return StreamingSession.from_pretrained(self.model, stc=stc, device=device, dtype=dtype, **policy)
        return StreamingSession.from_preset(self.preset, stc=stc, num_layers=self.num_layers, seed=self.seed,
                                            device=device, dtype=dtype, **policy)


def versions() -> dict[str, str]:
    """Versions that can change answers (warned about on resume when they differ)."""
    import av
    import transformers

    from .. import __version__

    return {"streamtc": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "av": av.__version__, "python": platform.python_version()}


def run_config(benchmark: Benchmark, spec: ModelSpec, settings: EvalSettings, protocol: str) -> dict[str, Any]:
    """The identity of a run: a results file only takes records written with an equal config."""
    return {
        "benchmark": benchmark.name,
        "annotations_sha256": benchmark.annotations_sha256(),
        "model": spec.identity(),
        "stc": spec.stc,
        **settings.to_dict(),
        "protocol": protocol,
        "stream": STREAM_VERSION,
    }


class EvalRun:
    """One invocation of `streamtc eval run`: the results file is opened and checked, and the
    questions still to answer are planned, at construction.

    protocol: "official" (the benchmark's own prompt, reply rule, clip rule and headline) or
    "paper" (what the paper's host did); its system prompt goes into the model spec.
    retry_errors: ask again the questions recorded with an error (e.g. after the missing videos
    were added); `retried` says how many.
    """

    def __init__(
        self,
        benchmark: Benchmark,
        spec: ModelSpec,
        output: str | Path,
        settings: EvalSettings,
        *,
        protocol: str = "official",
        device: str = "cpu",
        retry_errors: bool = False,
    ) -> None:
        self.protocol: Protocol = protocol_of(benchmark.name, protocol)
        spec = replace(spec, system_prompt=self.protocol.system_prompt)
        self.benchmark, self.spec, self.settings, self.device = benchmark, spec, settings, device
        self.output = Path(output)
        from ..bench.timing import machine_info

        header = {
            "type": "header",
            "format": FORMAT,
            "config": run_config(benchmark, spec, settings, protocol),
            "questions": benchmark.questions,
            "model_id": spec.model_id,
            "benchmark_title": benchmark.spec.title,
            "annotations": str(benchmark.annotations),
            "videos": str(benchmark.videos),
            "versions": versions(),
            "machine": machine_info(device),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self.writer = ResultsWriter(self.output, header)
        existing = self.writer.existing
        if existing is not None and existing.planned != benchmark.questions:
            self.writer.write({"type": "plan", "questions": benchmark.questions})
        done = existing.done_keys(retry_errors=retry_errors) if existing else set()
        self.retried = len(existing.done_keys() - done) if existing else 0
        self.problems = [p for p in benchmark.problems if p.key not in done]
        self.jobs: list[tuple[VideoTask, set[Key]]] = []
        for task in benchmark.tasks:
            pending = {q.key for q in task.questions} - done
            if pending:
                self.jobs.append((task, pending))

    @property
    def pending_questions(self) -> int:
        return sum(len(keys) for _, keys in self.jobs) + len(self.problems)

    @property
    def resumed(self) -> bool:
        return self.writer.existing is not None

    def _records_local(self) -> Iterator[dict[str, Any]]:
        session = self.spec.build(self.device)
        try:
            for task, pending in self.jobs:
                yield from run_video(session, task, self.protocol, self.settings, pending)
        finally:
            session.close()

    def run(
        self,
        *,
        ray_address: str | None = None,
        actors: int | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Answer every pending question, appending each record as it arrives, then append and
        return the summary (score and timing of the whole file). ray_address: None runs in this
        process; "local" starts a local Ray cluster on 127.0.0.1; anything else is passed to
        `ray.init(address=...)`. actors: Ray actors (default: one per GPU, else see ray_runner)."""
        try:
            for problem in self.problems:
                record = problem_record(problem)
                self.writer.write(record)
                if on_record is not None:
                    on_record(record)
            if self.jobs:
                if ray_address is None:
                    records = self._records_local()
                else:
                    from .ray_runner import run_on_ray

                    records = run_on_ray(self.jobs, self.spec, self.protocol, self.settings, address=ray_address,
                                         actors=actors)
                for record in records:
                    self.writer.write(record)
                    if on_record is not None:
                        on_record(record)
            summary = summarize(self.output, complete_keys=self.benchmark.keys())
            self.writer.write({"type": "summary", **summary})
        finally:
            self.writer.close()
        if self.benchmark.spec.finish is not None:
            judged = [{**record, "prediction": judge_record(self.protocol, record)[0]}
                      for record in read_results(self.output).answers.values()]
            paths = self.benchmark.spec.finish(judged, self.output, self.protocol.name)
            summary["submission"] = [str(p) for p in paths]
        return summary


def summarize(path: str | Path, complete_keys: set[Key] | None = None) -> dict[str, Any]:
    """Score and timing of a results file; `complete` says whether it answers every key in
    `complete_keys` (when given)."""
    results = read_results(path)
    answers = list(results.answers.values())
    summary: dict[str, Any] = {
        "score": score(results.benchmark, results.protocol, answers).to_dict(),
        "timing": timing_summary(answers, results.videos),
        "answers": len(answers),
    }
    if complete_keys is not None:
        summary["complete"] = complete_keys <= set(results.answers)
    return summary


__all__ = ["EvalRun", "ModelSpec", "run_config", "summarize", "versions"]
