"""`streamtc eval report`: score tables of results files and a side-by-side comparison.

Everything is recomputed from the answer records (the summary lines of a file are not trusted), so
a report of an interrupted run shows what it has so far, and reports never go stale when scoring
rules improve. Comparison: the first run is the reference; every other run shows its accuracy and
its retention (accuracy / reference accuracy, in percent) per row, and the timing table shows the
cost of each run with its change against the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from .datasets import PAPER_OFFLINE_AVERAGE, benchmark_info
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
    def setting(self) -> str:
        """A short description of the STC setting."""
        return describe_stc(self.results.config.get("stc"))

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "model": self.results.header.get("model_id"), "config": self.results.config,
                "score": self.score.to_dict(), "timing": self.timing, "answers": len(self.results.answers),
                "superseded": self.results.superseded}


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
    return RunReport(Path(path), results, score(results.benchmark, answers), timing_summary(answers, results.videos))


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
    info = benchmark_info(run.score.benchmark)
    score_ = run.score
    console.print(f"[bold]{run.path}[/]: {info.title} · {run.results.header.get('model_id')} · {run.setting} · "
                  f"fps {run.results.config.get('fps')}")
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
    line = f"[bold]overall {_pct(score_.overall)}[/] ({score_.rule}); {score_.questions} questions scored"
    if score_.unparsed:
        line += f", {score_.unparsed} answers named no option (wrong)"
    if score_.errors:
        line += f", {score_.errors} on unreadable videos (wrong)"
    if score_.unlabelled:
        line += f", {score_.unlabelled} unlabelled (submission only)"
    console.print(line)
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
        console.print(f"  paper (ReKV + LLaVA-OV-7B, {what}): {paper['uncompressed']} uncompressed, "
                      f"{paper['stc']} with STC")


def render_comparison(console: Console, runs: list[RunReport]) -> None:
    """Accuracy side by side with retention against the first run, then the timing summary."""
    benchmarks = {run.score.benchmark for run in runs}
    if len(benchmarks) > 1:
        raise ConfigError(f"runs of different benchmarks cannot be compared: {sorted(benchmarks)}")
    reference = runs[0]
    table = Table(title="accuracy % (retention % of the first run)", title_justify="left")
    table.add_column("")
    for run in runs:
        table.add_column(f"{run.label}\n{run.setting}", justify="right")
    rows: list[tuple[str, list[float | None]]] = [("overall", [run.score.overall for run in runs])]
    for name, reference_rows in reference.score.tables.items():
        for row in reference_rows:
            values = []
            for run in runs:
                match = [r for r in run.score.tables.get(name, []) if r.name == row.name]
                values.append(match[0].accuracy if match else None)
            rows.append((f"{name}: {row.name}", values))
    for label, values in rows:
        cells = [_pct(values[0])]
        for value in values[1:]:
            kept = retention(value, values[0])
            cells.append(_pct(value) + ("" if kept is None else f" ({kept:.1f})"))
        table.add_row(label, *cells)
    table.add_row("questions", *[str(run.score.questions) for run in runs])
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


__all__ = ["RunReport", "describe_stc", "load_run", "render_comparison", "render_run", "render_timing"]
