"""Soak test of a stream's memory: thousands of frames through one session, with questions.

    streamtc bench soak --frames 10000 --question-every 500 --memory retrieval,full \\
        --window-tokens 1200 --offload-dir /tmp/soak --offload-budget 20000000
    streamtc bench soak --preset llava-ov-0.5b --vit-layers 2 --text-layers 2 --frames 500 \\
        --question-every 100 --warmup 100 --memory full,window,retrieval --window-tokens 15000

One session per memory variant (`full`, `window`, `retrieval`; STC on unless `--no-stc`) streams
the built-in street clip, looped, one frame per push at `fps` timestamps. Every `sample_every`
frames it records the process's resident memory (RSS, now, not the peak), the mean time of a push
over the interval (encode, prune and pre-fill, questions excluded), bytes of the offload
directory on disk, open file handles, tokens in the cache and KV bytes held (cache, offloaded
blocks in host memory and on disk). Every `question_every` frames it asks a question and records
the time to first token, the retrieval time and the KV bytes per minute of video.

The summary checks what a stream that runs for days needs: RSS flat after warm-up (spread of the
samples past `warmup` frames, relative to their mean), per-frame time flat (mean of the last 1,000
frames over the mean of the first 1,000 past warm-up), disk use within the budget, and as many
open file handles at the end as after warm-up. It is a command, not a test: the numbers depend on
the machine, and the report says which (its `environment` record).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import positive_int
from ..config import STCConfig
from ..errors import ConfigError
from ..memory import memory_policy
from ..session import StreamingSession
from ..sources import open_source
from ..measure import environment

QUESTION = "What is happening in the video?"


@dataclass(frozen=True)
class SoakConfig:
    """One soak run's settings (every variant shares them)."""

    preset: str = "tiny-llava-ov"
    vit_layers: int | None = None  # depth overrides: real widths at a depth that fits a CPU run
    text_layers: int | None = None
    frames: int = 10_000
    question_every: int = 500
    sample_every: int = 100
    warmup: int = 1_000
    window_tokens: int = 15_000
    retrieve_frames: int = 64
    offload_dir: str | None = None
    offload_budget: int | None = None
    fps: float = 1.0
    max_new_tokens: int = 8
    stc: bool = True

    def __post_init__(self) -> None:
        for name in ("frames", "question_every", "sample_every", "window_tokens", "retrieve_frames", "max_new_tokens"):
            positive_int(getattr(self, name), name)
        for name in ("vit_layers", "text_layers"):
            positive_int(getattr(self, name), name, optional=True)
        if not 0 <= self.warmup < self.frames:
            raise ConfigError(f"warmup must be in [0, frames), got {self.warmup!r}")

    @property
    def depth(self) -> str:
        """The depth overrides as a label, e.g. ", vision layers 2, text layers 2" ("" for none)."""
        return "".join(f", {name} layers {value}" for name, value in (("vision", self.vit_layers),
                                                                     ("text", self.text_layers)) if value)


def resident_bytes() -> int:
    """The process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def open_files() -> int:
    """File descriptors the process holds now (Linux /proc; 0 elsewhere)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def directory_bytes(directory: Path | None) -> int:
    if directory is None or not directory.exists():
        return 0
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def looped_clip(count: int) -> Iterator[np.ndarray]:
    """`count` frames of the built-in street clip (decoded once at 5 fps), looped."""
    clip = [frame.image for frame in open_source("demo", fps=5.0)]
    for index in range(count):
        yield clip[index % len(clip)]


def soak_variant(config: SoakConfig, memory: str, progress: Callable[[str], None] | None = None
                 ) -> dict[str, Any]:
    """Stream `config.frames` frames through one session with `memory` (and STC when `config.stc`)."""
    stc = config.stc
    offload_dir = Path(config.offload_dir) / f"{memory}-{'stc' if stc else 'base'}" if config.offload_dir else None
    policy = memory_policy(memory, config.window_tokens, config.retrieve_frames,
                           offload_dir if memory == "retrieval" else None,
                           config.offload_budget if memory == "retrieval" and offload_dir else None)
    session = StreamingSession.from_preset(config.preset, stc=STCConfig() if stc else None, cache_policy=policy,
                                           num_layers=config.vit_layers, text_layers=config.text_layers)
    samples, questions = [], []
    interval_ms, start = 0.0, time.perf_counter()
    for index, frame in enumerate(looped_clip(config.frames), start=1):
        begin = time.perf_counter()
        session.push(frame[None], [index / config.fps])
        interval_ms += (time.perf_counter() - begin) * 1e3
        if index % config.question_every == 0:
            answer = session.ask(QUESTION, max_new_tokens=config.max_new_tokens)
            stats = session.stats
            held = stats.kv_cache_bytes + (stats.memory or {}).get("host_bytes", 0) + (stats.memory or {}).get("disk_bytes", 0)
            questions.append({
                "frames": index, "ttft_ms": answer.ttft_ms, "total_ms": answer.total_ms,
                "retrieval_ms": (stats.memory or {}).get("last_retrieval_ms"),
                "kv_bytes": held, "kv_bytes_per_minute": held / (index / config.fps / 60),
            })
        if index % config.sample_every == 0:
            stats = session.stats
            samples.append({
                "frames": index, "rss_bytes": resident_bytes(), "ms_per_frame": interval_ms / config.sample_every,
                "disk_bytes": directory_bytes(offload_dir), "open_files": open_files(),
                "cache_tokens": stats.cache_tokens, "kv_cache_bytes": stats.kv_cache_bytes,
                "offloaded_blocks": (stats.memory or {}).get("offloaded_blocks", 0),
                "host_bytes": (stats.memory or {}).get("host_bytes", 0),
            })
            interval_ms = 0.0
            if progress is not None:
                progress(f"{memory}{' +STC' if stc else ''}: {index} frames, RSS {samples[-1]['rss_bytes'] / 2**20:.0f} MiB, "
                         f"{samples[-1]['ms_per_frame']:.1f} ms/frame, {time.perf_counter() - start:.0f} s")
    final = session.stats
    session.close()
    return {"memory": memory, "stc": stc, "samples": samples, "questions": questions,
            "final_stats": final.to_dict(), "files_left": directory_bytes(offload_dir),
            "summary": summarize(config, samples)}


def summarize(config: SoakConfig, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Flatness after warm-up: RSS spread (max - min over the mean), per-frame time of the last
    1,000 frames over the first 1,000 past warm-up, peak disk use and open handles."""
    steady = [s for s in samples if s["frames"] > config.warmup]
    if not steady:
        return {}
    rss = [s["rss_bytes"] for s in steady]
    mean = sum(rss) / len(rss)
    span = max(1, 1_000 // config.sample_every)
    first = [s["ms_per_frame"] for s in steady[:span]]
    last = [s["ms_per_frame"] for s in steady[-span:]]
    return {
        "rss_mean_bytes": mean,
        "rss_spread": (max(rss) - min(rss)) / mean,
        "rss_growth_bytes": rss[-1] - rss[0],
        "ms_per_frame_first": sum(first) / len(first),
        "ms_per_frame_last": sum(last) / len(last),
        "ms_per_frame_ratio": (sum(last) / len(last)) / (sum(first) / len(first)),
        "disk_peak_bytes": max(s["disk_bytes"] for s in samples),
        "disk_within_budget": config.offload_budget is None or max(s["disk_bytes"] for s in samples) <= config.offload_budget,
        "open_files_after_warmup": steady[0]["open_files"],
        "open_files_end": steady[-1]["open_files"],
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """RSS, per-frame time and disk use against frames, one line per variant (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results["config"]
    figure, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for run in results["runs"]:
        label = f"{run['memory']}{' + STC' if run['stc'] else ''}"
        frames = [s["frames"] for s in run["samples"]]
        axes[0].plot(frames, [s["rss_bytes"] / 2**20 for s in run["samples"]], label=label)
        axes[1].plot(frames, [s["ms_per_frame"] for s in run["samples"]], label=label)
        axes[2].plot(frames, [s["disk_bytes"] / 2**20 for s in run["samples"]], label=label)
    axes[0].set_ylabel("resident memory (MiB)")
    axes[1].set_ylabel("ms per frame (push)")
    axes[2].set_ylabel("offload dir on disk (MiB)")
    axes[2].set_xlabel("frames streamed")
    budget = config["offload_budget"]
    if budget is not None:
        axes[2].axhline(budget / 2**20, color="grey", linestyle="--", label="budget")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"soak: {config['preset']}{SoakConfig(**config).depth}, {config['frames']} frames, "
                    f"question every {config['question_every']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_soak(config: SoakConfig, memories: list[str], output: Path,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every memory variant in turn; writes soak.json and soak.png under `output`."""
    for memory in memories:
        memory_policy(memory, config.window_tokens, config.retrieve_frames)  # unknown names fail first
    output.mkdir(parents=True, exist_ok=True)
    results = {"config": asdict(config), "environment": environment("cpu", asdict(config)), "runs": []}
    for memory in memories:
        results["runs"].append(soak_variant(config, memory, progress))
        (output / "soak.json").write_text(json.dumps(results, indent=1))
    plot(results, output / "soak.png")
    return results


__all__ = ["SoakConfig", "run_soak", "soak_variant", "summarize"]
