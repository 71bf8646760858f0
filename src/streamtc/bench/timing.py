"""Clock, peak memory and machine description shared by the session and the benchmarks.

Every clock read is preceded by a device synchronisation, so GPU work queued by the timed code is
inside the measurement; every benchmark writes `machine_info()` next to its numbers. Peak memory is
CUDA's max allocated on a GPU and the process's peak RSS (VmHWM) on a CPU; both are process-wide
and can be reset, so a measurement covers what ran since the reset.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import resource
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued work on `device` (a no-op on CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


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


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What produced a measurement: versions, CPU/GPU model, threads, date, git commit."""
    import transformers

    device = torch.device(device)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "git": _git_hash(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


__all__ = ["synchronize", "timed", "reset_peak_memory", "peak_memory_bytes", "machine_info"]
