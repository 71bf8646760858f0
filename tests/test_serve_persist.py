"""`streamtc serve --persist-dir`: a graceful shutdown (and SIGTERM) saves every stream, a restart
with the same directory resumes them; answers after the restart equal an uninterrupted server's.
Real uvicorn + httpx on 127.0.0.1, the tiny preset."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np

from streamtc import StreamingSession
from streamtc.serve import ServeMemory, ServerSettings, ServerThread
from streamtc.serve.store import StreamStore

from helpers import PRESET, clip_frames, push_raw, wait_for_state

QUESTION = "What is happening?"
SOURCE = {"source": "bikes", "fps": 2.0, "max_seconds": 5.0, "realtime": True}  # 11 frames, paced at 2 fps


def ask(http: httpx.Client, stream_id: str) -> dict:
    response = http.post(f"/v1/streams/{stream_id}/ask", json={"question": QUESTION, "max_new_tokens": 4,
                                                                "sync": True, "top_logprobs": 5})
    assert response.status_code == 200, response.text
    answer = response.json()
    return {k: answer[k] for k in ("token_ids", "frames", "top_logprobs")}


def push(http: httpx.Client, stream_id: str, frames: list[np.ndarray], first: int) -> None:
    for i, image in enumerate(frames, start=first):
        assert push_raw(http, stream_id, image, i * 0.5).json()["accepted"]


def create(http: httpx.Client, body: dict) -> str:
    response = http.post("/v1/streams", json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


def test_a_restarted_server_resumes_its_streams_with_the_same_answers(tmp_path: Path) -> None:
    frames = clip_frames("bikes", 6)
    # STC on (default) / off with a window / off with retrieval memory on disk (40 tokens: 2 of 16-token frames)
    pushed = [{"fps": 2.0}, {"fps": 2.0, "stc": None, "window_tokens": 40},
              {"fps": 2.0, "stc": None, "memory": "retrieval", "window_tokens": 40}]
    memory = ServeMemory(offload_dir=tmp_path / "blocks")

    expected = []  # an uninterrupted server
    with ServerThread(ServerSettings(preset=PRESET, port=0, memory=memory)) as server, \
            httpx.Client(base_url=server.url, timeout=300) as http:
        for body in pushed:
            sid = create(http, body)
            push(http, sid, frames[:3], 0)
            before = ask(http, sid)
            push(http, sid, frames[3:], 3)
            expected.append((before, ask(http, sid)))
        sid = create(http, SOURCE)
        wait_for_state(http, sid, {"ended"})
        expected_source = ask(http, sid)

    settings = ServerSettings(preset=PRESET, port=0, persist_dir=tmp_path / "streams", memory=memory)
    with ServerThread(settings) as server, httpx.Client(base_url=server.url, timeout=300) as http:
        ids = []
        for body, (before, _) in zip(pushed, expected):
            sid = create(http, body)
            push(http, sid, frames[:3], 0)
            assert ask(http, sid) == before
            ids.append(sid)
        source_id = create(http, SOURCE)
        deleted = create(http, {})
        http.delete(f"/v1/streams/{deleted}")
        deadline = time.monotonic() + 120
        while http.get(f"/v1/streams/{source_id}").json()["frames_done"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    # shut down mid-file: the source had processed some of its frames, not all
    saved = {record["id"]: record for record, _ in StreamStore(tmp_path / "streams").saved()}
    assert set(saved) == {*ids, source_id} and saved[source_id]["state"] == "playing"

    with ServerThread(settings) as server, httpx.Client(base_url=server.url, timeout=300) as http:
        listed = {s["id"] for s in http.get("/v1/streams").json()["streams"]}
        assert listed == {*ids, source_id}
        for sid, (_, after) in zip(ids, expected):
            wait_for_state(http, sid, {"playing"})
            push(http, sid, frames[3:], 3)
            assert ask(http, sid) == after
            response = push_raw(http, sid, frames[0], 0.5)  # the stream's clock continues: no going back
            assert response.status_code == 422 and "must not go back" in response.json()["error"]
        retrieval = http.get(f"/v1/streams/{ids[2]}").json()
        assert retrieval["memory"] == "retrieval" and retrieval["stats"]["memory"]["offloaded_blocks"] == 4
        assert retrieval["stats"]["memory"]["disk_bytes"] > 0  # the save's segment, linked into the new stream's directory
        info = wait_for_state(http, source_id, {"ended"})
        assert info["frames_done"] == expected_source["frames"] > 3
        assert ask(http, source_id) == expected_source


def test_sigterm_saves_the_streams_of_the_command(tmp_path: Path) -> None:
    from streamtc.serve.load import SpawnedServer

    frames = clip_frames("bikes", 2)
    server = SpawnedServer(["--persist-dir", str(tmp_path / "streams"), "--no-stc"])
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=300) as http:
            sid = create(http, {"fps": 2.0})
            push(http, sid, frames, 0)
            answer = ask(http, sid)
    finally:
        server.stop()  # SIGTERM
    assert "shut down: closed 1 open streams" in server.process.stderr.read()  # graceful (uvicorn re-raises SIGTERM)
    [(record, saved)] = StreamStore(tmp_path / "streams").saved()
    assert record["id"] == sid and (saved / "CURRENT").is_file()
    # the save resumes in another process on the same model (the preset's weights are seeded)
    model = StreamingSession.from_preset(PRESET, stc=None).model
    restored = StreamingSession.restore(saved, model)
    assert restored.frames == 2
    assert restored.ask(QUESTION, max_new_tokens=4).token_ids == answer["token_ids"]
    restored.close()
