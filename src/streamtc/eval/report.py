"""`streamtc eval report`: score tables of results files and a side-by-side comparison.

Everything is recomputed from the answer records with the run's protocol (the summary lines of a
file are not trusted), so reports never go stale when scoring rules improve. A run that has not
answered every planned question is reported as incomplete (answered / total), its numbers marked
partial, never as a final score. Comparison: the first run is the reference; every other run shows
its accuracy and its retention (accuracy / reference accuracy, in percent) per row, and the timing
table shows the cost of each run with its change against the reference. Runs of different
protocols are not compared unless asked (`allow_mixed_protocols`): their numbers are not on one
scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from .benchmarks import PAPER_OFFLINE_AVERAGE, benchmark_spec
from .results import RunResults, read_results
from .scoring import Score, retention, score, timing_summary


@dataclass
class RunReport:
    """One results file, scored."""

    path: Path
    results: RunResults
    score: Score
    timing: dict[str, Any]

    @property
    def label(self) -> str:
        return self.path.stem

    @property
    def progress(self) -> str:
        """"answered/total" (total unknown: "answered/?")."""
        planned = self.results.planned
        return f"{len(self.results.answers)}/{'?' if planned is None else planned}"

    @property
    def setting(self) -> str:
        """A short description of the STC setting (or of the variant, `--variant`)."""
        variant = self.results.config.get("variant")
        if variant is not None:
            return f"{variant['name']}: {variant['description']}"
        return describe_stc(self.results.config.get("stc"))

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "model": self.results.header.get("model_id"), "config": self.results.config,
                "protocol": self.score.protocol, "score": self.score.to_dict(), "timing": self.timing,
                "answers": len(self.results.answers), "planned": self.results.planned,
                "complete": self.results.complete, "superseded": self.results.superseded}


def describe_stc(stc: dict[str, Any] | None) -> str:
    if stc is None:
        return "no STC"
    parts = []
    if stc.get("cacher"):
        parts.append(f"Cacher N={stc['cacher']['cache_interval']} r={stc['cacher']['update_ratio']}")
    if stc.get("pruner"):
        pruner = stc["pruner"]
        budget = (f"{pruner['tokens_per_frame']} tok" if pruner.get("tokens_per_frame")
                  else f"{pruner['keep_ratio']:.0%}")
        parts.append(f"Pruner {budget}")
    return "STC: " + (", ".join(parts) or "off")


def load_run(path: str | Path) -> RunReport:
    results = read_results(path)
    answers = list(results.answers.values())
    return RunReport(Path(path), results, score(results.benchmark, results.protocol, answers),
                     timing_summary(answers, results.videos))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _change(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return ""
    return f" ({100.0 * (value - reference) / reference:+.1f}%)"


def render_run(console: Console, run: RunReport) -> None:
    """The score tables of one run, with the paper's numbers where the paper has them."""
    info = benchmark_spec(run.score.benchmark)
    score_ = run.score
    console.print(f"[bold]{run.path}[/]: {info.title} · protocol {score_.protocol} · "
                  f"{run.results.header.get('model_id')} · {run.setting} · fps {run.results.config.get('fps')}")
    if not run.results.complete:
        console.print(f"[bold yellow]INCOMPLETE: {run.progress} questions answered; every number below is partial, "
                      "not a final score (resume with the same command)[/]")
    for name, rows in score_.tables.items():
        table = Table(title=f"by {name}", title_justify="left")
        table.add_column(name)
        table.add_column("accuracy %", justify="right")
        table.add_column("n", justify="right")
        for row in rows:
            n = (f"{row.correct}/{row.total}" if row.correct is not None
                 else f"mean of {row.parts} tasks ({row.total} q)")
            table.add_row(row.name, _pct(row.accuracy), n)
        console.print(table)
    what = "overall" if run.results.complete else "PARTIAL overall"
    line = f"[bold]{what} {_pct(score_.overall)}[/] ({score_.headline}); {score_.questions} questions scored"
    if score_.unparsed:
        line += f", {score_.unparsed} replies named no option (wrong)"
    if score_.errors:
        line += f", {score_.errors} errors: unreadable videos or records (wrong)"
    if score_.excluded:
        line += f", {score_.excluded} unanswered replies left out by the official rule"
    if score_.unlabelled:
        line += f", {score_.unlabelled} unlabelled (submission only)"
    console.print(line)
    console.print(f"  reply rule: {score_.rule}")
    for extra, value in score_.extra.items():
        console.print(f"  {extra}: {_pct(value)}")
    if score_.missing_videos:
        console.print(f"[yellow]{len(score_.missing_videos)} video(s) could not be read:[/]")
        for video, error in list(score_.missing_videos.items())[:10]:
            console.print(f"  {video}: {error}")
        if len(score_.missing_videos) > 10:
            console.print(f"  ... and {len(score_.missing_videos) - 10} more")
    paper = info.paper or (PAPER_OFFLINE_AVERAGE if not info.online else None)
    if paper:
        what = "overall" if info.paper else "average of EgoSchema, MLVU, Video-MME"
        caveat = "" if score_.protocol == "paper" else "; compare with --protocol paper runs"
        console.print(f"  paper (ReKV + LLaVA-OV-7B, {what}): {paper['uncompressed']} uncompressed, "
                      f"{paper['stc']} with STC{caveat}")


def check_comparable(runs: list[RunReport], *, allow_mixed_protocols: bool = False) -> None:
    """Raise ConfigError when runs of different benchmarks, or (unless allowed) protocols, are put
    side by side."""
    benchmarks = {run.score.benchmark for run in runs}
    if len(benchmarks) > 1:
        raise ConfigError(f"runs of different benchmarks cannot be compared: {sorted(benchmarks)}")
    if len({run.score.protocol for run in runs}) > 1 and not allow_mixed_protocols:
        raise ConfigError(
            "runs of different protocols are not comparable (prompts, reply rules and metrics differ): "
            + ", ".join(f"{run.path} is {run.score.protocol}" for run in runs)
            + "; pass --allow-mixed-protocols to compare them anyway"
        )


def render_comparison(console: Console, runs: list[RunReport], *, allow_mixed_protocols: bool = False) -> None:
    """Accuracy side by side with retention against the first run, then the timing summary.
    Incomplete runs are marked partial ("*")."""
    check_comparable(runs, allow_mixed_protocols=allow_mixed_protocols)
    reference = runs[0]
    partial = [run for run in runs if not run.results.complete]
    title = "accuracy % (retention % of the first run)" + ("; * partial: run incomplete" if partial else "")
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for run in runs:
        mark = "" if run.results.complete else f" * {run.progress}"
        table.add_column(f"{run.label} ({run.score.protocol}){mark}\n{run.setting}", justify="right")
    rows: list[tuple[str, list[float | None]]] = [("overall", [run.score.overall for run in runs])]
    for name, reference_rows in reference.score.tables.items():
        for row in reference_rows:
            values = []
            for run in runs:
                match = [r for r in run.score.tables.get(name, []) if r.name == row.name]
                values.append(match[0].accuracy if match else None)
            rows.append((f"{name}: {row.name}", values))
    marks = ["" if run.results.complete else "*" for run in runs]
    for label, values in rows:
        cells = [_pct(values[0]) + marks[0]]
        for value, mark in zip(values[1:], marks[1:]):
            kept = retention(value, values[0])
            cells.append(_pct(value) + mark + ("" if kept is None else f" ({kept:.1f})"))
        table.add_row(label, *cells)
    table.add_row("answered", *[run.progress for run in runs])
    console.print(table)
    render_timing(console, runs)


def render_timing(console: Console, runs: list[RunReport]) -> None:
    """The cost of each run (frames streamed, per-frame ViT / pruning / pre-fill time, answer
    latency, tokens kept), with the change against the first run."""
    reference = runs[0]
    timing = Table(title="cost (change against the first run)", title_justify="left")
    for column in ("run", "frames", "ViT ms/frame", "prune ms/frame", "pre-fill ms/frame", "TTFT ms (mean)",
                   "visual tokens kept", "errors"):
        timing.add_column(column, justify="left" if column == "run" else "right")
    base = reference.timing

    def cell(run: RunReport, key: str) -> str:
        value = run.timing[key]
        return _ms(value) + ("" if run is reference else _change(value, base[key]))

    for run in runs:
        kept = run.timing["tokens_kept"]
        timing.add_row(run.label, str(run.timing["frames"]), cell(run, "vit_ms_per_frame"),
                       _ms(run.timing["prune_ms_per_frame"]), cell(run, "prefill_ms_per_frame"),
                       cell(run, "ttft_ms_mean"), "-" if kept is None else f"{100 * kept:.0f}%",
                       str(run.score.errors))
    console.print(timing)


__all__ = ["RunReport", "check_comparable", "describe_stc", "load_run", "render_comparison", "render_run", "render_timing"]
