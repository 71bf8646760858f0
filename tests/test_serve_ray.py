"""`streamtc serve --ray`: two Ray Serve replicas on a local Ray cluster bound to 127.0.0.1. Streams
land on both replicas, answer exactly as a single-process server does on the same input, and a
replica's failure is reported for its streams only."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import threading
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from streamtc.serve import ServerSettings, ServerThread
from streamtc.serve.app import build_app
from streamtc.serve.errors import ServeError
from streamtc.serve.ray_backend import RayBackend
from streamtc.sources import builtin_clip_path, open_source

pytest.importorskip("ray.serve", reason="needs ray[serve] (the serve extra)")

CLIPS = ("bikes", "carphone")


def run_streams(url: str) -> list[dict]:
    """One push stream per clip (STC on the first, off the second), a question after 3 and 5 frames."""
    results = []
    with httpx.Client(base_url=url, timeout=300) as http:
        for name, stc in zip(CLIPS, ("default", None)):
            stream = http.post("/v1/streams", json={"fps": 2, "stc": stc}).json()
            answers = []
            for frame in open_source(builtin_clip_path(name), fps=2, max_frames=5):
                height, width = frame.image.shape[:2]
                assert http.post(f"/v1/streams/{stream['id']}/frames", content=frame.image.tobytes(),
                                 params={"width": width, "height": height, "timestamp": frame.timestamp}).json()["accepted"]
                if frame.index in (2, 4):
                    answers.append(http.post(f"/v1/streams/{stream['id']}/ask", json={
                        "question": "What happens?", "sync": True, "max_new_tokens": 6, "top_logprobs": 5}).json())
            results.append({"id": stream["id"], "replica": stream.get("replica"), "answers": answers})
    return results


def listening_addresses(root: int) -> set[tuple[str, str]]:
    """(process name, address) of every TCP socket on which one of `root`'s descendant processes
    listens (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    family, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - family
        family |= frontier
    owners = {}
    for pid in family:
        with suppress(OSError):
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            owners |= {os.readlink(fd)[8:-1]: name for fd in Path(f"/proc/{pid}/fd").iterdir()
                       if os.readlink(fd).startswith("socket:[")}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in owners:  # LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(packed)
                found.add((owners[fields[9]], str(getattr(address, "ipv4_mapped", None) or address)))
    return found


@pytest.mark.slow  # two Ray Serve replicas, each loading a model: about 2 minutes on 2 cores
def test_two_replicas_answer_as_one_process_and_fail_alone() -> None:
    import ray

    with ServerThread(ServerSettings(port=0, threads=1)) as single:
        expected = run_streams(single.url)
    with ServerThread(ServerSettings(port=0, replicas=2, replica_cpus=0.5, threads=1)) as cluster:
        info = httpx.get(cluster.url + "/v1/info").json()
        assert info["replicas"] == 2 and info["model"] == "tiny-llava-ov"
        if Path("/proc/net/tcp").exists():  # a local cluster listens on the loopback interface only
            ray_processes = {(name, address) for name, address in listening_addresses(os.getpid())
                             if not name.startswith("ray::ServeRepl")}  # Ray Serve binds these to [::] itself
            assert ray_processes and all(ipaddress.ip_address(a).is_loopback for _, a in ray_processes), ray_processes
        got = run_streams(cluster.url)
        assert sorted(r["replica"] for r in got) == [0, 1]  # spread over both replicas
        for ours, theirs in zip(got, expected, strict=True):
            for a, b in zip(ours["answers"], theirs["answers"], strict=True):
                assert a["token_ids"] == b["token_ids"] and a["frames"] == b["frames"]
                assert [t["token_id"] for t in a["top_logprobs"]] == [t["token_id"] for t in b["top_logprobs"]]
                assert np.allclose([t["logprob"] for t in a["top_logprobs"]],
                                   [t["logprob"] for t in b["top_logprobs"]], atol=1e-5)
        listed = httpx.get(cluster.url + "/v1/streams").json()["streams"]
        assert sorted(s["id"] for s in listed) == sorted(r["id"] for r in got)
        for stream in got:  # events and frames come through the replica that holds the stream
            with httpx.stream("GET", cluster.url + f"/v1/streams/{stream['id']}/events", timeout=60) as sse:
                first = next(line for line in sse.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["stream"] == stream["id"]
            image = httpx.get(cluster.url + f"/v1/streams/{stream['id']}/frame.jpg", timeout=60)
            assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"

        # replica 1 dies: its stream answers 503, replica 0's stream carries on
        lost = next(r["id"] for r in got if r["replica"] == 1)
        kept = next(r["id"] for r in got if r["replica"] == 0)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "streamtc-replica-1" in a["name"] and "REPLICA" in a["name"]]
        assert names, ray.util.list_named_actors(all_namespaces=True)
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
        failed = httpx.post(cluster.url + f"/v1/streams/{lost}/ask", json={"question": "Still there?"}, timeout=300)
        assert failed.status_code == 503 and "replica 1" in failed.json()["error"]
        still = httpx.post(cluster.url + f"/v1/streams/{kept}/ask", json={"question": "Still there?", "sync": True},
                           timeout=300)
        assert still.status_code == 200 and still.json()["frames"] == 5
    assert not ray.is_initialized()


def test_a_ray_start_that_never_returns_fails_the_start_and_lets_the_process_exit() -> None:
    """A Ray start can block for ever (a process Ray starts may never run). The server's start
    must then fail with a clear error, and the process must still exit: a start on one of
    asyncio's worker threads would be joined at exit, for ever."""
    script = textwrap.dedent("""
        import asyncio, threading
        from streamtc.serve import ServerSettings
        from streamtc.serve.ray_backend import RayBackend

        RayBackend._bring_up = classmethod(lambda cls, settings, name, connection: threading.Event().wait())
        try:
            asyncio.run(RayBackend.start(ServerSettings(replicas=2), "tiny", timeout=0.5))
        except Exception as error:
            print(type(error).__name__, error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ServeError Ray did not bring up 2 replica(s) within 0.5 s" in done.stdout


def test_a_ray_start_that_ends_after_its_timeout_is_shut_down() -> None:
    release, closed = threading.Event(), threading.Event()

    class Late(RayBackend):
        @classmethod
        def _bring_up(cls, settings, model_name, connection):
            release.wait()
            connection.callback(closed.set)  # what a Ray connection does on close
            return cls([], model_name)

        def _shutdown(self) -> None:
            pass

    with pytest.raises(ServeError, match="within 0.2 s"):
        asyncio.run(Late.start(ServerSettings(replicas=1), "tiny", timeout=0.2))
    release.set()
    assert closed.wait(10)  # the late cluster is not left running


def test_a_server_that_does_not_start_in_time_is_stopped() -> None:
    async def slow_backend():
        await asyncio.sleep(2)
        return SimpleNamespace(close=lambda: asyncio.sleep(0))

    server = ServerThread(ServerSettings(port=0), app=build_app(slow_backend))
    with pytest.raises(TimeoutError, match="within 0.3 s"):
        server.start(timeout=0.3)
    server._thread.join(30)  # it stops once its start ends, 2 s in
    assert not server._thread.is_alive()
