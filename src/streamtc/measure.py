"""Measurement at the bottom of the stack: clock, peak memory, the run's environment record, and
the paired time ratio with its bootstrap interval.

The session, `run --output`, the benchmarks and the evaluation all measure through this module (it
imports nothing from streamtc, so every layer may use it; see docs/architecture.md). Every clock
read is preceded by a device synchronisation, so GPU work queued by the timed code is inside the
measurement. Peak memory is CUDA's max allocated on a GPU and the process's peak RSS (VmHWM) on a
CPU; both are process-wide and can be reset, so a measurement covers what ran since the reset.
Every result file carries one `environment(device, config)` record: package versions, machine,
torch threads, git revision, date and the run's settings, the same keys for every kind of result.
torch is imported by the functions that use it, so that importing this module (as every command
does) stays quick.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import importlib.metadata
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued work on `device` (a no-op on CPU)."""
    if device is None or str(device).split(":")[0] != "cuda":
        return
    import torch

    torch.cuda.synchronize(torch.device(device))


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, float]:
    """Run fn once; return (its result, wall milliseconds), synchronising before both clock reads."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak: CUDA's peak statistics, or the process's peak RSS (after handing freed heap
    back to the OS, so that earlier garbage does not count; where Linux allows the reset)."""
    import torch

    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak stays the process's


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory since the last `reset_peak_memory`: CUDA max allocated, or peak RSS."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def paired_ratio(base: list[float], fast: list[float], resamples: int = 400) -> dict[str, Any]:
    """Ratio sum(fast) / sum(base) over frames timed in pairs, with a 90% bootstrap interval over
    the frames. `noise` is True when the interval, at the two decimals it is printed with, contains
    1 (no difference shown by this run: "0.97-1.00" is noise), or when fewer than 3 frames were timed."""
    if len(base) != len(fast):
        raise ValueError(f"paired timings need as many frames on both sides, got {len(base)} and {len(fast)}")
    if not base or sum(base) <= 0:
        return {"ratio": None, "low": None, "high": None, "noise": True, "frames": len(base)}
    ratio = sum(fast) / sum(base)
    rng = random.Random(0)
    count = len(base)
    draws = []
    for _ in range(resamples):
        picks = [rng.randrange(count) for _ in range(count)]
        denominator = sum(base[i] for i in picks)
        if denominator > 0:
            draws.append(sum(fast[i] for i in picks) / denominator)
    draws.sort()
    low, high = draws[int(0.05 * len(draws))], draws[int(0.95 * len(draws)) - 1]
    noise = count < 3 or round(low, 2) <= 1.0 <= round(high, 2)
    return {"ratio": ratio, "low": low, "high": high, "noise": noise, "frames": count}


# Packages whose version can change a number or an answer; a missing one is recorded as None.
RECORDED_PACKAGES = ("transformers", "numpy", "av")


def package_versions() -> dict[str, str | None]:
    """Versions of the running streamtc and torch (the imported build, e.g. "+cpu"), of
    `RECORDED_PACKAGES` as installed, and of Python."""
    import torch

    # the package this module belongs to is imported by now; reading it here imports nothing upward
    running = sys.modules.get(__package__ or "streamtc")
    versions: dict[str, str | None] = {
        "streamtc": getattr(running, "__version__", None),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine a measurement ran on: CPU model and count, platform, device (and GPU name)."""
    import torch

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def environment(device: torch.device | str = "cpu", config: Any = None) -> dict[str, Any]:
    """One record of what produced a result: date (UTC), package versions, machine, torch threads,
    git revision and the run's `config` (any JSON-able value). Every result kind writes it under
    the key "environment"."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "machine": machine_info(device),
        "torch_threads": torch.get_num_threads(),
        "git": _git_hash(),
        "config": config,
    }


__all__ = [
    "RECORDED_PACKAGES",
    "environment",
    "machine_info",
    "package_versions",
    "paired_ratio",
    "peak_memory_bytes",
    "reset_peak_memory",
    "synchronize",
    "timed",
]
