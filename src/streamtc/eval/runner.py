"""Run a benchmark: plan what is left to answer, answer it (one process or Ray actors), score it.

    run = EvalRun(benchmark, SessionSpec(preset="tiny-llava-ov", stc=STCConfig()),
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

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import STCConfig
from ..errors import ConfigError
from ..factory import SessionSpec
from ..measure import environment
from .benchmarks import protocol_of
from .benchmarks.base import Protocol
from .datasets import Benchmark, VideoTask
from .results import FORMAT, Key, ResultsWriter, read_results
from .scoring import judge_record, score, timing_summary
from .streaming import STREAM_VERSION, EvalSettings, problem_record, run_video

logger = logging.getLogger(__name__)


def with_current_stc_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A results file's config with STC settings added since it was written filled in at their
    defaults, which is what that run used (settings that no longer exist stay, and differ)."""
    def current(stc: dict[str, Any] | None) -> dict[str, Any] | None:
        try:
            return None if stc is None else STCConfig.from_dict(stc).to_dict()
        except (ConfigError, TypeError):
            return stc

    upgraded = {**config, "stc": current(config.get("stc"))}
    if isinstance(config.get("variant"), dict):
        upgraded["variant"] = {**config["variant"], "stc": current(config["variant"].get("stc"))}
    return upgraded


def run_config(benchmark: Benchmark, spec: SessionSpec, settings: EvalSettings, protocol: str) -> dict[str, Any]:
    """The identity of a run: a results file only takes records written with an equal config. A
    registered variant (`--variant`) is recorded by name and settings; an STC setting as `stc`."""
    variant = {} if spec.variant is None else {"variant": spec.resolved_variant().to_dict()}
    return {
        "benchmark": benchmark.name,
        "annotations_sha256": benchmark.annotations_sha256(),
        "model": spec.identity(),
        "stc": None if spec.stc is None else spec.stc.to_dict(),
        **variant,
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
        spec: SessionSpec,
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
        config = run_config(benchmark, spec, settings, protocol)
        header = {
            "type": "header",
            "format": FORMAT,
            "config": config,
            "questions": benchmark.questions,
            "model_id": spec.model_id,
            # which named Cacher setting `stc` is (robust / paper / custom; None: no Cacher)
            "cacher_profile": None if spec.stc is None or spec.stc.cacher is None else spec.stc.cacher.profile,
            "benchmark_title": benchmark.spec.title,
            "annotations": str(benchmark.annotations),
            "videos": str(benchmark.videos),
            "environment": environment(device, config),
        }
        self.writer = ResultsWriter(self.output, header, upgrade=with_current_stc_fields)
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


__all__ = ["EvalRun", "run_config", "summarize"]
