"""Load test of `streamtc serve`: N concurrent file streams and a question per stream every few
seconds, against a running server (--url) or servers it starts itself, one per variant.

    streamtc serve loadtest --streams 8 --duration 120 --question-every 10 --compare
    streamtc serve loadtest --streams 1 --streams 4 --streams 8 --streams 16 --duration 45 --compare

Reports per variant: errors, question latency (p50/p95, as the client sees it, and the server's
own queue wait), frames per second per stream, and the server's resident memory over time; with
--output, the same as JSON. Server-read streams loop the clip and, unless --realtime, read it as
fast as the model takes frames, so frames/s is the throughput each stream gets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

QUESTION = "What is happening right now?"


def percentile(values: list[float], share: float) -> float | None:
    """The `share` quantile (nearest rank) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SpawnedServer:
    """`streamtc serve` in a child process on a free port of 127.0.0.1."""

    def __init__(self, extra_args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "streamtc.cli", "serve", "--port", str(self.port),
                                         *extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()}")
            try:
                if httpx.get(self.url + "/v1/info", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the server did not start")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def run_load(url: str, *, streams: int, duration: float, question_every: float, source: str, fps: float,
                   realtime: bool, stc: str, max_new_tokens: int, token: str | None = None) -> dict[str, Any]:
    """Open the streams, ask on each every `question_every` s for `duration` s, measure, close."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as http:
        body = {"source": source, "fps": fps, "realtime": realtime, "loop": True,
                "stc": None if stc == "off" else "default"}
        ids = []
        for _ in range(streams):
            response = await http.post("/v1/streams", json=body)
            response.raise_for_status()
            ids.append(response.json()["id"])
        started = time.monotonic()
        errors: list[str] = []
        latencies: list[float] = []
        server_latencies: list[float] = []
        queue_waits: list[float] = []
        memory: list[tuple[float, int]] = []

        async def questions(index: int, stream_id: str) -> None:
            await asyncio.sleep(question_every * (index + 1) / streams)  # spread over the interval
            while time.monotonic() - started < duration:
                sent = time.monotonic()
                try:
                    response = await http.post(f"/v1/streams/{stream_id}/ask",
                                               json={"question": QUESTION, "max_new_tokens": max_new_tokens})
                    if response.status_code != 200:
                        errors.append(f"{stream_id}: HTTP {response.status_code} {response.text[:200]}")
                    else:
                        answer = response.json()
                        latencies.append((time.monotonic() - sent) * 1e3)
                        server_latencies.append(answer["latency_ms"])
                        queue_waits.append(answer["queue_ms"])
                except httpx.HTTPError as error:
                    errors.append(f"{stream_id}: {type(error).__name__} {error}")
                await asyncio.sleep(max(0.0, question_every - (time.monotonic() - sent)))

        async def sample_memory() -> None:
            while time.monotonic() - started < duration:
                info = (await http.get("/v1/info")).json()
                memory.append((round(time.monotonic() - started, 1), info["rss_bytes"]))
                await asyncio.sleep(10.0)

        first = {s["id"]: s["frames_done"] for s in (await http.get("/v1/streams")).json()["streams"]}
        await asyncio.gather(sample_memory(), *(questions(i, sid) for i, sid in enumerate(ids)))
        elapsed = time.monotonic() - started
        final = {s["id"]: s for s in (await http.get("/v1/streams")).json()["streams"]}
        memory.append((round(elapsed, 1), (await http.get("/v1/info")).json()["rss_bytes"]))
        for sid in ids:
            if final[sid]["state"] not in ("playing", "ended"):
                errors.append(f"{sid}: stream {final[sid]['state']}: {final[sid]['error']}")
            await http.delete(f"/v1/streams/{sid}")
    rates = [(final[sid]["frames_done"] - first.get(sid, 0)) / elapsed for sid in ids]
    return {
        "streams": streams, "duration_s": round(elapsed, 1), "stc": stc, "source": source, "fps": fps,
        "realtime": realtime, "questions": len(latencies), "errors": errors,
        "latency_ms": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95)},
        "server_latency_ms": {"p50": percentile(server_latencies, 0.5), "p95": percentile(server_latencies, 0.95)},
        "queue_wait_ms": {"p50": percentile(queue_waits, 0.5), "p95": percentile(queue_waits, 0.95)},
        "frames_per_s_per_stream": {"mean": statistics.fmean(rates), "min": min(rates), "max": max(rates)},
        "rss_mb": [(t, round(b / 2**20)) for t, b in memory],
    }


def print_report(results: list[dict[str, Any]]) -> None:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    print(f"{'streams':<8}{'STC':<8}{'questions':>10}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'queue p50':>11}"
          f"{'frames/s/stream':>17}{'RSS MB start→end':>20}")
    for r in results:
        rate = r["frames_per_s_per_stream"]
        print(f"{r['streams']:<8}{r['stc']:<8}{r['questions']:>10}{len(r['errors']):>8}{fmt(r['latency_ms']['p50']):>9}"
              f"{fmt(r['latency_ms']['p95']):>9}{fmt(r['queue_wait_ms']['p50']):>11}"
              f"{rate['mean']:>11.2f} ({rate['min']:.2f}-{rate['max']:.2f})"
              f"{r['rss_mb'][0][1]:>11}→{r['rss_mb'][-1][1]}")
        for error in r["errors"][:5]:
            print(f"  error: {error}")
    for r in results:
        print(f"RSS over time, {r['streams']} streams, STC {r['stc']} (s, MB): " + ", ".join(f"{t:g}:{mb}" for t, mb in r["rss_mb"]))


@dataclass(frozen=True)
class LoadSpec:
    """What each variant's load is: streams, how long, how often each asks, what they read."""

    streams: int = 8
    duration: float = 120.0
    question_every: float = 10.0
    source: str = "demo"
    fps: float = 2.0
    realtime: bool = False
    max_new_tokens: int = 16


def run_loadtest(spec: LoadSpec, variants: list[str], *, url: str | None = None, token: str | None = None,
                 server_args: list[str] = (), output: Path | None = None,
                 stream_counts: list[int] | None = None) -> list[dict[str, Any]]:
    """Run `spec` once per variant ("default": the server's STC, "off") and per count of
    `stream_counts` (default: spec.streams), against `url` or a server started per variant
    (`streamtc serve` with `server_args`), print the report and write `output`. Variants take
    turns at each count, so that a loaded machine's drift falls on both alike."""
    counts = stream_counts or [spec.streams]
    servers: dict[str, SpawnedServer] = {}
    results = []
    try:
        if url is None:
            for stc in variants:
                servers[stc] = SpawnedServer(["--max-streams", str(max(16, *counts)), *server_args])
                servers[stc].wait_ready()
        for count in counts:
            for stc in variants:
                results.append(asyncio.run(run_load(
                    url or servers[stc].url, streams=count, duration=spec.duration,
                    question_every=spec.question_every, source=spec.source, fps=spec.fps, realtime=spec.realtime,
                    stc=stc, max_new_tokens=spec.max_new_tokens, token=token)))
    finally:
        for server in servers.values():
            server.stop()
    print_report(results)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))
        print(f"wrote {output}")
    return results


__all__ = ["LoadSpec", "SpawnedServer", "percentile", "print_report", "run_load", "run_loadtest"]
