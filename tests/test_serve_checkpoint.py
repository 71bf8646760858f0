"""Crash-safe persistence of `streamtc serve --persist-dir --checkpoint-every`: real server processes
killed with SIGKILL (`kill -9`) and restarted. What a restart restores is every frame processed up to
one checkpoint interval before the kill, is logged per stream (never silent), refuses timestamps
the stream already took, and a save that a restart resumed is never restored again as if current.
Offload folders a killed server left are removed at the next start.

Servers are forked from one process that imported torch, transformers and streamtc once (each
server is still its own process, killed for real), so twenty kills fit in about two minutes."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from streamtc.serve.load import free_port
from streamtc.serve.offload import MARKER
from streamtc.serve.store import StreamStore

from helpers import PRESET, clip_frames, push_raw

INTERVAL = 2.0  # --checkpoint-every
SLACK = 1.5  # the worker's idle tick, one checkpoint's write and a loaded 2-core machine's scheduling
QUESTION = {"question": "What is happening?", "max_new_tokens": 4, "sync": True}

# Forks one `streamtc serve` per request line: [arguments, log file]; answers with the child's pid.
ZYGOTE = r"""
import json, os, signal, sys
import fastapi, httpx, torch, transformers, uvicorn
import streamtc.cli.serve, streamtc.factory, streamtc.serve.app, streamtc.serve.backend
from streamtc.cli import main

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed servers are reaped at once
for line in sys.stdin:
    arguments, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = ["streamtc", *arguments]
        try:
            main()
        finally:
            os._exit(0)
    print(pid, flush=True)
"""


class Servers:
    """Starts `streamtc serve` processes (forked from one warm interpreter) and kills them."""

    def __init__(self, arguments: list[str], logs: Path) -> None:
        self.arguments, self.logs, self.lives = arguments, logs, 0
        self.zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
        self.pid: int | None = None

    def start(self) -> str:
        """A new server on a free port; returns its URL once it answers."""
        port, self.lives = free_port(), self.lives + 1
        self.log = self.logs / f"server-{self.lives}.log"
        request = [["serve", "--preset", PRESET, "--port", str(port), "--threads", "1", *self.arguments], str(self.log)]
        self.zygote.stdin.write(json.dumps(request) + "\n")
        self.zygote.stdin.flush()
        self.pid = int(self.zygote.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/v1/info", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"the server did not start: {self.log.read_text()}")

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        while Path(f"/proc/{self.pid}").exists():  # gone (reaped by the zygote)
            time.sleep(0.01)

    def terminate(self) -> None:
        os.kill(self.pid, signal.SIGTERM)
        while Path(f"/proc/{self.pid}").exists():
            time.sleep(0.05)

    def close(self) -> None:
        if self.pid is not None and Path(f"/proc/{self.pid}").exists():
            self.kill()
        self.zygote.stdin.close()
        self.zygote.wait(timeout=30)


@pytest.fixture()
def frames():
    return clip_frames("bikes", 8)


def only_stream(http: httpx.Client) -> dict:
    """The server's one stream, once started (a restored one: once its save is loaded)."""
    deadline = time.monotonic() + 60
    while True:
        [stream] = http.get("/v1/streams").json()["streams"]
        if stream["state"] != "starting" or time.monotonic() > deadline:
            return stream
        time.sleep(0.05)


def test_kill_9_after_a_checkpoint_restores_every_frame_and_refuses_old_timestamps(tmp_path: Path, frames) -> None:
    offload = tmp_path / "offload"
    (offload / "mine").mkdir(parents=True)  # not the server's: never touched
    servers = Servers(["--persist-dir", str(tmp_path / "streams"), "--checkpoint-every", str(INTERVAL), "--no-stc",
                       "--memory", "retrieval", "--window-tokens", "40", "--offload-dir", str(offload)], tmp_path)
    try:
        with httpx.Client(base_url=servers.start(), timeout=120) as http:
            sid = http.post("/v1/streams", json={"fps": 2.0}).json()["id"]
            for i, image in enumerate(frames[:6]):
                assert push_raw(http, sid, image, i * 0.5).json()["accepted"]
            answer = http.post(f"/v1/streams/{sid}/ask", json=QUESTION).json()
            assert answer["frames"] == 6
            deadline = time.monotonic() + 60  # the wait: until the checkpoint holds all six frames
            while [r["frames"] for r, _ in StreamStore(tmp_path / "streams").saved()] != [6]:
                assert time.monotonic() < deadline, "no checkpoint of the six frames"
                time.sleep(0.1)
            killed_folders = sorted(offload.glob("serve-*"))
            assert len(killed_folders) == 1 and (killed_folders[0] / MARKER).is_file()  # the server's own
            assert list(killed_folders[0].glob("stream-*"))  # the stream's offloaded blocks
        servers.kill()
        assert killed_folders[0].exists()  # left behind by the kill

        with httpx.Client(base_url=servers.start(), timeout=120) as http:
            stream = only_stream(http)
            assert stream["id"] == sid and stream["frames_done"] == 6 and stream["last_timestamp"] == 2.5
            assert stream["restored"]["saved"] == "checkpoint" and stream["restored"]["frames"] == 6
            old = push_raw(http, sid, frames[0], 2.0)
            assert old.status_code == 422 and "must not go back" in old.json()["error"]
            again = http.post(f"/v1/streams/{sid}/ask", json=QUESTION).json()
            assert again["token_ids"] == answer["token_ids"] and again["frames"] == 6  # the same memory
            assert push_raw(http, sid, frames[6], 3.0).json()["accepted"]
        log = servers.log.read_text()
        assert f"stream {sid}: restored 6 frames up to stream time 2.5 s from its checkpoint save" in log
        assert "the server stopped without saving" in log
        assert not killed_folders[0].exists() and (offload / "mine").is_dir()  # the killed server's folder only
        assert len(list(offload.glob("serve-*"))) == 1  # the running server's own
    finally:
        servers.close()


def test_a_resumed_save_is_never_restored_again_as_if_current(tmp_path: Path, frames) -> None:
    servers = Servers(["--persist-dir", str(tmp_path / "streams"), "--checkpoint-every", "0", "--no-stc"], tmp_path)
    try:
        with httpx.Client(base_url=servers.start(), timeout=120) as http:
            sid = http.post("/v1/streams", json={"fps": 2.0}).json()["id"]
            for i, image in enumerate(frames[:3]):
                push_raw(http, sid, image, i * 0.5)
            http.post(f"/v1/streams/{sid}/ask", json=QUESTION)
        servers.terminate()  # graceful: the shutdown save (3 frames)
        with httpx.Client(base_url=servers.start(), timeout=120) as http:
            assert only_stream(http)["restored"]["resumed_before"] is None
            for i, image in enumerate(frames[3:6], start=3):
                push_raw(http, sid, image, i * 0.5)
            assert http.post(f"/v1/streams/{sid}/ask", json=QUESTION).json()["frames"] == 6
        assert "restored 3 frames up to stream time 1.0 s from its shutdown save" in servers.log.read_text()
        assert "nothing lost" in servers.log.read_text()
        servers.kill()  # no checkpoints: the 3 frames after the restart were never saved
        with httpx.Client(base_url=servers.start(), timeout=120) as http:
            stream = only_stream(http)
            assert stream["frames_done"] == 3 and stream["restored"]["resumed_before"] is not None
        log = servers.log.read_text()
        assert "which a restart already resumed" in log and "is lost" in log and "nothing lost" not in log
    finally:
        servers.close()


@pytest.mark.slow
def test_twenty_random_kills_never_lose_more_than_the_interval_and_never_silently(tmp_path: Path, frames) -> None:
    rng = random.Random(26)
    servers = Servers(["--persist-dir", str(tmp_path / "streams"), "--checkpoint-every", str(INTERVAL)], tmp_path)
    pushed = 0  # frames accepted so far (timestamps 0.5 s apart: every one is sampled at 2 fps)
    sid, killed_at = None, 0.0
    started = time.monotonic()
    try:
        for life in range(21):
            url = servers.start()
            with httpx.Client(base_url=url, timeout=30) as http:
                if sid is None:
                    sid = http.post("/v1/streams", json={"fps": 2.0}).json()["id"]
                    samples = [(time.monotonic(), 0)]
                else:
                    stream = only_stream(http)
                    restored = stream["frames_done"]
                    log = servers.log.read_text()
                    # never silent: the restart says what it restored and that what came after is lost
                    assert re.search(rf"stream {sid}: restored {restored} frames .* checkpoint save", log), log
                    assert stream["restored"]["frames"] == restored <= pushed
                    # never older than the interval: every frame processed that long before the kill is back
                    settled = max((f for t, f in samples if t <= killed_at - INTERVAL - SLACK), default=samples[0][1])
                    assert restored >= settled, (life, restored, settled, samples[-5:])
                    if restored:
                        assert stream["last_timestamp"] == (restored - 1) * 0.5
                    pushed = restored  # the client resends from the restored time
                    samples = [(time.monotonic(), restored)]
                if life == 20:
                    break
                kill_after = rng.uniform(0.5, 4.0)
                begun = time.monotonic()
                while time.monotonic() - begun < kill_after:
                    response = push_raw(http, sid, frames[pushed % len(frames)], pushed * 0.5)
                    if response.status_code == 200:
                        pushed += 1
                    samples.append((time.monotonic(), http.get(f"/v1/streams/{sid}").json()["frames_done"]))
                    time.sleep(0.05)
            killed_at = time.monotonic()
            servers.kill()
    finally:
        servers.close()
    assert pushed > 20 and time.monotonic() - started < 300
