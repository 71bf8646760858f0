"""`streamtc serve` through real clients: httpx and websockets against uvicorn on 127.0.0.1 (a free
port), on the tiny preset. The API, live events, push streams, the OpenAI-style endpoint, fairness,
answers equal to streams served alone, security (token, allow-lists, limits) and bad input that
affects only its own request or stream."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from streamtc import STCConfig, StreamingSession
from streamtc.cacher import attached_cacher
from streamtc.errors import ConfigError
from streamtc.serve import ServeLimits, ServerSettings, ServerThread, SourcePolicy
from streamtc.factory import shared_weights_view
from streamtc.memory import memory_policy
from streamtc.serve.engine import Engine, StreamSpec
from streamtc.sources import builtin_clip_path, open_source
from helpers import PRESET, clip_frames, push_raw, wait_for_state

TOKEN = "s3cret-token-for-tests"


def ws_url(server: ServerThread, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def encoded(image: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=kind)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    shutil.copy(builtin_clip_path("bikes"), folder / "bikes.mp4")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))
    return folder


@pytest.fixture(scope="module")
def server(video_dir: Path):
    settings = ServerSettings(preset=PRESET, port=0, sources=SourcePolicy(allow_dirs=(video_dir.resolve(),)))
    with ServerThread(settings) as running:
        yield running


@pytest.fixture()
def client(server: ServerThread):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http
        for stream in http.get("/v1/streams").json()["streams"]:  # each test leaves the server empty
            http.delete(f"/v1/streams/{stream['id']}")


# -- the model side -------------------------------------------------------------------------------


def test_model_views_share_the_weights_and_leave_the_loaded_model_untouched() -> None:
    base = StreamingSession.from_preset(PRESET, stc=None)
    view = shared_weights_view(base.model)
    pairs = list(zip(base.model.parameters(), view.parameters(), strict=True))
    assert all(a is b for a, b in pairs) and view is not base.model
    with_stc = StreamingSession(view, base.tokenizer, STCConfig(), preprocessor=base.preprocessor)
    assert attached_cacher(view) is not None and attached_cacher(base.model) is None
    frames = np.stack(clip_frames("bikes", 3))
    base.push(frames, [0.0, 0.5, 1.0])
    alone = StreamingSession.from_preset(PRESET, stc=None)
    alone.push(frames, [0.0, 0.5, 1.0])
    torch.testing.assert_close(base.next_token_logits("What?"), alone.next_token_logits("What?"), rtol=0, atol=0)
    with_stc.close()


def test_round_robin_serves_streams_in_turn_and_a_question_jumps_its_queue() -> None:
    order: list[tuple[str, int]] = []
    engine = Engine(StreamingSession.from_preset(PRESET, stc=None), STCConfig(),
                    limits=ServeLimits(max_queue_frames=32),
                    listener=lambda sid, e: order.append((sid, e["type"])) if e["type"] in ("frame", "answer") else None)
    try:
        first = engine.create_stream(StreamSpec(fps=10)).result()["id"]
        second = engine.create_stream(StreamSpec(fps=10)).result()["id"]
        frames = clip_frames("bikes", 12, fps=10)
        for i, image in enumerate(frames):
            engine.push_frame(first, image, i / 10)
        for i, image in enumerate(frames):
            engine.push_frame(second, image, i / 10)
        answer = engine.ask(first, "What now?", max_new_tokens=2).result(timeout=120)
        assert 1 <= answer["frames"] < len(frames)  # answered on the video so far, ahead of its queued frames
        late = engine.ask(second, "And now?", max_new_tokens=2, sync=True).result(timeout=120)
        assert late["frames"] == len(frames)  # sync: after every frame queued before it
        streams = [sid for sid, _ in order]  # one unit of work each: a frame or an answer
        start = streams.index(second)
        both = streams[start:start + 2 * (len(frames) - start)]  # while both queues hold work
        assert all(a != b for a, b in zip(both, both[1:])), order
    finally:
        engine.close()


def test_shutdown_closes_every_stream_through_the_persistence_hook() -> None:
    closed: list[str] = []
    engine = Engine(StreamingSession.from_preset(PRESET, stc=None), STCConfig(),
                    on_close=lambda info, session: closed.append((info["id"], session.frames)))
    ids = [engine.create_stream(StreamSpec()).result()["id"] for _ in range(3)]
    engine.push_frame(ids[0], clip_frames("bikes", 1)[0], 0.0)
    engine.ask(ids[0], "Anything?", max_new_tokens=1, sync=True).result(timeout=60)
    views = [root.model for root in engine._roots.values()]
    engine.delete(ids[2])
    engine.close()
    assert sorted(closed) == sorted([(ids[0], 1), (ids[1], 0), (ids[2], 0)])
    assert all(attached_cacher(model) is None for model in views)


# -- the API --------------------------------------------------------------------------------------


def test_a_file_stream_plays_and_its_events_arrive(client: httpx.Client, server: ServerThread, video_dir) -> None:
    info = client.post("/v1/streams", json={"source": str(video_dir / "bikes.mp4"), "fps": 2, "realtime": False,
                                            "max_seconds": 2.6}).json()
    events = []
    with connect(ws_url(server, f"/v1/streams/{info['id']}/events?after=0")) as socket:
        while not any(e.get("state") == "ended" for e in events):
            events.append(json.loads(socket.recv(timeout=120)))
    frames = [e for e in events if e["type"] == "frame"]
    expected = [f.timestamp for f in open_source(video_dir / "bikes.mp4", fps=2, max_seconds=2.6)]
    assert [f["timestamp"] for f in frames] == expected and len(expected) == 6
    assert [f["cacher"]["refresh"] for f in frames] == [True, False] * 3  # cache_interval 2
    assert frames[1]["cacher"]["recomputed_per_layer"] == [12, 12]  # floor(49 * 0.25) of the 7x7 ViT grid
    assert all(f["pruner"]["grid"] == [4, 4] and len(f["pruner"]["kept"]) == f["tokens_kept"] == 5 for f in frames)
    # which ViT tokens the Cacher recomputed: per cell of the 7x7 grid, in how many of the 2 layers
    for frame in frames:
        cacher = frame["cacher"]
        assert cacher["grid"] == [7, 7] and cacher["layers"] == 2
        if cacher["refresh"]:
            assert cacher["recomputed"] is None  # every token
        else:
            counts = cacher["recomputed"]
            assert len(counts) == 49 and max(counts) <= 2 and sum(counts) == sum(cacher["recomputed_per_layer"])
    assert frames[-1]["cache_tokens"] > frames[0]["cache_tokens"]
    image = client.get(f"/v1/streams/{info['id']}/frame.jpg")
    assert image.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(image.content)).width > 0
    answer = client.post(f"/v1/streams/{info['id']}/ask", json={"question": "What is happening?",
                                                                "options": ["bikes", "cars"]}).json()
    assert answer["frames"] == 6 and answer["timestamp"] == expected[-1] and answer["total_ms"] > 0
    assert answer["options"] == ["bikes", "cars"] and "letter" in answer
    with client.stream("GET", f"/v1/streams/{info['id']}/events", params={"after": 0}) as sse:
        first = next(line for line in sse.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["seq"] == 1


def test_push_streams_take_jpeg_png_and_raw_rgb_over_http_and_websocket(client, server) -> None:
    stream = client.post("/v1/streams", json={"fps": 1, "stc": None}).json()
    frames = clip_frames("carphone", 4, fps=1)
    assert client.post(f"/v1/streams/{stream['id']}/frames", params={"timestamp": 0},
                       content=encoded(frames[0], "JPEG")).json()["accepted"]
    assert push_raw(client, stream["id"], frames[1], 1.0).json()["accepted"]
    dropped = push_raw(client, stream["id"], frames[1], 1.4).json()  # between the 1 fps instants
    assert not dropped["accepted"] and "fps" in dropped["reason"]
    with connect(ws_url(server, f"/v1/streams/{stream['id']}/push")) as socket:
        socket.send(b"not an image")
        assert json.loads(socket.recv(timeout=30))["status"] == 422  # the bad frame only
        socket.send(json.dumps({"timestamp": 2.0}))
        socket.send(encoded(frames[2], "PNG"))
        assert json.loads(socket.recv(timeout=30))["accepted"]
        height, width = frames[3].shape[:2]
        socket.send(json.dumps({"timestamp": 3.0, "width": width, "height": height}))
        socket.send(frames[3].tobytes())
        assert json.loads(socket.recv(timeout=30))["frame"] == 3
    answer = client.post(f"/v1/streams/{stream['id']}/ask", json={"question": "Who?", "sync": True}).json()
    assert answer["frames"] == 4 and answer["timestamp"] == 3.0
    described = client.get(f"/v1/streams/{stream['id']}").json()
    assert described["frames_done"] == 4 and described["frames_dropped"] == 1 and described["stc"] is None


def test_two_concurrent_streams_answer_as_the_same_streams_served_alone(client: httpx.Client) -> None:
    clips = {"bikes": clip_frames("bikes", 6), "carphone": clip_frames("carphone", 6)}
    settings = {"bikes": {"stc": "default"}, "carphone": {"stc": None}}

    def serve(name: str, results: dict) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=120) as http:
            stream = http.post("/v1/streams", json={"fps": 2, **settings[name]}).json()["id"]
            answers = []
            for i, image in enumerate(clips[name]):
                assert push_raw(http, stream, image, i / 2).json()["accepted"]
                if i in (2, 5):
                    answers.append(http.post(f"/v1/streams/{stream}/ask", json={
                        "question": "What is happening?", "sync": True, "max_new_tokens": 6, "top_logprobs": 5,
                    }).json())
            results[name] = [(a["frames"], a["token_ids"], a["top_logprobs"]) for a in answers]

    alone: dict = {}
    for name in clips:
        serve(name, alone)
    together: dict = {}
    threads = [threading.Thread(target=serve, args=(name, together)) for name in clips]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone
    assert alone["bikes"][0][2] != alone["carphone"][0][2]  # the check can tell the streams apart
    # and both equal a plain session on the same frames
    for name, stc in (("bikes", STCConfig()), ("carphone", None)):
        session = StreamingSession.from_preset(PRESET, stc=stc)
        session.push(np.stack(clips[name][:3]), [0.0, 0.5, 1.0])
        logprobs = session.next_token_logits("What is happening?").log_softmax(-1)
        assert [t["token_id"] for t in alone[name][0][2]] == logprobs.topk(5).indices.tolist()
        assert np.allclose([t["logprob"] for t in alone[name][0][2]], logprobs.topk(5).values.numpy(), atol=1e-5)
        session.close()


def test_per_stream_settings_window_and_retrieval_memory_and_stc_off(client: httpx.Client) -> None:
    frames = clip_frames("bikes", 6)
    window = client.post("/v1/streams", json={"fps": 2, "window_tokens": 10,
                                              "stc": {"cacher": None, "pruner": {"tokens_per_frame": 5}}}).json()
    full = client.post("/v1/streams", json={"fps": 2, "stc": None}).json()
    retrieval = client.post("/v1/streams", json={"fps": 2, "stc": None, "memory": "retrieval",
                                                 "window_tokens": 32}).json()
    assert (window["memory"], full["memory"], retrieval["memory"]) == ("window", "full", "retrieval")
    for i, image in enumerate(frames):
        for stream in (window, full, retrieval):
            push_raw(client, stream["id"], image, i / 2)
    answers = [client.post(f"/v1/streams/{stream['id']}/ask", json={"question": "?", "sync": True, "max_new_tokens": 1,
                                                                     "top_logprobs": 5}).json()
               for stream in (window, full, retrieval)]
    # retrieval holds 2 of the 6 frames (16 tokens each) in its window and offloads 4, and answers
    # as a plain session with the same memory fed the same frames
    retrieval_stats = client.get(f"/v1/streams/{retrieval['id']}").json()["stats"]
    assert retrieval_stats["memory"]["offloaded_blocks"] == 4 and retrieval_stats["memory"]["window_frames"] == 2
    session = StreamingSession.from_preset(PRESET, stc=None, cache_policy=memory_policy("retrieval", 32))
    for i, image in enumerate(frames):
        session.push(image[None], [i / 2])
    logprobs = session.next_token_logits("?").log_softmax(-1).topk(5)
    assert [t["token_id"] for t in answers[2]["top_logprobs"]] == logprobs.indices.tolist()
    assert np.allclose([t["logprob"] for t in answers[2]["top_logprobs"]], logprobs.values.numpy(), atol=1e-5)
    assert [t["token_id"] for t in answers[2]["top_logprobs"]] != [t["token_id"] for t in answers[1]["top_logprobs"]]
    session.close()
    window_stats = client.get(f"/v1/streams/{window['id']}").json()
    full_stats = client.get(f"/v1/streams/{full['id']}").json()
    assert window_stats["stc"]["cacher"] is None and window_stats["window_tokens"] == 10
    assert window_stats["stats"]["visual_tokens"] == 30 and full_stats["stats"]["visual_tokens"] == 96
    per_token = full_stats["stats"]["kv_cache_bytes"] // (96 + full_stats["stats"]["prompt_tokens"])
    held = window_stats["stats"]["kv_cache_bytes"] // per_token - window_stats["stats"]["prompt_tokens"]
    assert held == 10  # the two newest frames of 5 kept tokens
    for body, message in (({"memory": "full", "window_tokens": 10}, "has no window"), ({"memory": "recall"}, "memory")):
        response = client.post("/v1/streams", json=body)
        assert response.status_code in (400, 422) and message in response.text, response.text


def test_openai_style_chat_completions(client: httpx.Client) -> None:
    stream = client.post("/v1/streams", json={"fps": 1}).json()["id"]
    push_raw(client, stream, clip_frames("bikes", 1)[0], 0.0)
    client.post(f"/v1/streams/{stream}/ask", json={"question": "?", "sync": True, "max_new_tokens": 1})
    assert stream in [m["id"] for m in client.get("/v1/models").json()["data"]]
    body = {"model": stream, "max_tokens": 4, "temperature": 0.2,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "What is in the video?"}]}]}
    completion = client.post("/v1/chat/completions", json=body).json()
    direct = client.post(f"/v1/streams/{stream}/ask", json={"question": "What is in the video?",
                                                            "max_new_tokens": 4}).json()
    assert completion["object"] == "chat.completion" and completion["model"] == stream
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": direct["text"]}
    assert completion["usage"]["completion_tokens"] == len(direct["token_ids"])
    by_header = client.post("/v1/chat/completions", headers={"X-Stream-Id": stream},
                            json={**body, "model": "anything", "stream": True})
    chunks = [line[6:] for line in by_header.text.splitlines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]" and json.loads(chunks[0])["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(json.loads(c)["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert streamed == direct["text"]
    no_question = client.post("/v1/chat/completions", json={"model": stream, "messages": [{"role": "system",
                                                                                           "content": "x"}]})
    assert no_question.status_code == 422 and "user message" in no_question.json()["error"]


# -- bad input stays with its request or stream ---------------------------------------------------


def test_bad_input_gets_a_clear_error_and_leaves_other_streams_intact(client, server, video_dir) -> None:
    healthy = client.post("/v1/streams", json={"fps": 1}).json()["id"]
    frames = clip_frames("bikes", 3, fps=1)
    push_raw(client, healthy, frames[0], 0.0)
    before = client.post(f"/v1/streams/{healthy}/ask", json={"question": "?", "sync": True, "top_logprobs": 3}).json()

    bad = client.post("/v1/streams", content=b'{"fps": ', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
    unknown = client.post("/v1/streams", json={"fsp": 2})
    assert unknown.status_code == 422 and "fsp" in unknown.json()["error"]
    assert client.post("/v1/streams", json={"fps": -1}).status_code == 422
    assert client.post("/v1/streams", json={"stc": {"cacher": {"update_ratio": 7}}}).status_code == 422
    missing = client.get("/v1/streams/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    corrupt = client.post(f"/v1/streams/{healthy}/frames", content=encoded(frames[1], "JPEG")[:300])
    assert corrupt.status_code == 422 and "frame" in corrupt.json()["error"]
    empty = client.post("/v1/streams", json={"fps": 1}).json()["id"]
    no_frames = client.post(f"/v1/streams/{empty}/ask", json={"question": "?"})
    # the server's words (its endpoints), not the Python API's ("push(frames)")
    assert no_frames.status_code == 422 and f"/v1/streams/{empty}/frames" in no_frames.json()["error"]
    assert "push(" not in no_frames.json()["error"]

    broken = client.post("/v1/streams", json={"source": str(video_dir / "broken.mp4"), "realtime": False}).json()
    refused = client.post("/v1/streams", json={"source": str(video_dir / "bikes.mp4")}).json()  # fine
    assert wait_for_state(client, broken["id"], {"error"})["error"]
    assert client.get(f"/v1/streams/{refused['id']}").json()["state"] == "playing"

    # a client that disconnects mid-answer: the server answers the next question as before
    with pytest.raises(httpx.TimeoutException):
        client.post(f"/v1/streams/{healthy}/ask", json={"question": "?", "max_new_tokens": 200}, timeout=0.01)
    after = client.post(f"/v1/streams/{healthy}/ask", json={"question": "?", "sync": True, "top_logprobs": 3}).json()
    assert after["top_logprobs"] == before["top_logprobs"] and after["frames"] == before["frames"]
    push_raw(client, healthy, frames[1], 1.0)
    assert client.post(f"/v1/streams/{healthy}/ask", json={"question": "?", "sync": True}).json()["frames"] == 2


def test_a_source_that_never_connects_fails_its_stream_only(tmp_path) -> None:
    settings = ServerSettings(preset=PRESET, port=0, sources=SourcePolicy(allow_schemes=frozenset({"tcp"})))
    with ServerThread(settings) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        other = http.post("/v1/streams", json={"fps": 1}).json()["id"]
        gone = http.post("/v1/streams", json={"source": "tcp://127.0.0.1:9"}).json()["id"]  # nothing listens
        assert "127.0.0.1:9" in wait_for_state(http, gone, {"error"})["error"]
        failed = http.post(f"/v1/streams/{gone}/ask", json={"question": "?"}).json()["error"]
        assert "failed before its first frame" in failed and "127.0.0.1:9" in failed and "push(" not in failed
        assert push_raw(http, other, clip_frames("bikes", 1)[0], 0.0).json()["accepted"]
        assert http.post(f"/v1/streams/{other}/ask", json={"question": "?", "sync": True}).status_code == 200
        deleted = http.delete(f"/v1/streams/{gone}")
        assert deleted.status_code == 200 and http.get(f"/v1/streams/{gone}").status_code == 404


# -- security ---------------------------------------------------------------------------------------


def test_only_allowed_sources_are_read(client: httpx.Client, video_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "clip.mp4"
    shutil.copy(builtin_clip_path("carphone"), outside)
    (video_dir / "escape.mp4").symlink_to(outside)
    for source, hint in ((str(outside), "--allow-dir"), ("/etc/passwd", "--allow-dir"),
                         (str(video_dir / "escape.mp4"), "--allow-dir"), (str(video_dir / ".." / outside.name), "--allow-dir"),
                         ("rtsp://127.0.0.1/cam", "--allow-scheme rtsp"), ("http://example.com/a.m3u8", "--allow-scheme http"),
                         ("0", "--allow-scheme webcam"), ("file:///etc/passwd", "--allow-scheme file")):
        refused = client.post("/v1/streams", json={"source": source})
        assert refused.status_code == 403 and hint in refused.json()["error"], source
    assert client.post("/v1/streams", json={"source": str(video_dir / "nothing.mp4")}).status_code == 422
    assert client.post("/v1/streams", json={"source": "carphone", "realtime": False}).status_code == 201
    assert client.get("/v1/streams").json()["streams"][0]["source"] == "carphone"


def test_limits_answer_4xx_with_the_limit_named() -> None:
    limits = ServeLimits(max_streams=2, max_queue_frames=2, max_upload_bytes=50_000, max_frame_side=128,
                         max_question_chars=40, max_options=3, max_new_tokens=8)
    with ServerThread(ServerSettings(preset=PRESET, port=0, limits=limits)) as running, \
            httpx.Client(base_url=running.url, timeout=60) as http:
        first = http.post("/v1/streams", json={"fps": 30}).json()["id"]
        http.post("/v1/streams", json={})
        third = http.post("/v1/streams", json={})
        assert third.status_code == 429 and "--max-streams" in third.json()["error"]
        large = http.post(f"/v1/streams/{first}/frames", content=bytes(60_000))
        assert large.status_code == 413 and "--max-upload-bytes" in large.json()["error"]
        wide = push_raw(http, first, np.zeros((16, 200, 3), np.uint8), 0.0)
        assert wide.status_code == 413 and "--max-frame-side" in wide.json()["error"]
        png = http.post(f"/v1/streams/{first}/frames", content=encoded(np.zeros((200, 16, 3), np.uint8), "PNG"))
        assert png.status_code == 413
        statuses = [push_raw(http, first, np.zeros((64, 64, 3), np.uint8), i / 30).status_code for i in range(12)]
        assert 429 in statuses  # the queue holds 2 frames; the model is slower than these pushes
        question = {"question": "x" * 41}
        long = http.post(f"/v1/streams/{first}/ask", json=question)
        assert long.status_code == 413 and "--max-question-chars" in long.json()["error"]
        options = http.post(f"/v1/streams/{first}/ask", json={"question": "?", "options": list("abcd")})
        assert options.status_code == 413
        tokens = http.post(f"/v1/streams/{first}/ask", json={"question": "?", "max_new_tokens": 9})
        assert tokens.status_code == 422 and "max_new_tokens" in tokens.json()["error"]
        assert http.post(f"/v1/streams/{first}/ask", json={"question": "?", "sync": True}).status_code == 200


def test_a_token_guards_every_endpoint_and_websocket() -> None:
    with ServerThread(ServerSettings(preset=PRESET, port=0, token=TOKEN)) as running:
        for path in ("/", "/v1/info", "/v1/streams", "/v1/models", "/static/app.js"):
            refused = httpx.get(running.url + path)
            assert refused.status_code == 401 and "token" in refused.json()["error"], path
        assert httpx.get(running.url + "/v1/info", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        assert httpx.post(running.url + "/v1/chat/completions", json={}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        stream = httpx.post(running.url + "/v1/streams", json={}, headers=auth).json()["id"]
        assert httpx.get(running.url + f"/v1/info?token={TOKEN}").status_code == 200
        with httpx.Client(base_url=running.url) as browser:  # the page opened as /?token=...: a cookie
            assert browser.get(f"/?token={TOKEN}").status_code == 200
            assert browser.get("/static/app.js").status_code == 200
        assert httpx.get(running.url + "/static/app.js", cookies={"streamtc_token": "wrong-token"}).status_code == 401
        for path in (f"/v1/streams/{stream}/events", f"/v1/streams/{stream}/push"):
            with pytest.raises(InvalidStatus):
                connect(ws_url(running, path))
        with connect(ws_url(running, f"/v1/streams/{stream}/push?token={TOKEN}")) as socket:
            socket.send(json.dumps({"timestamp": 0}))
            socket.send(encoded(clip_frames("bikes", 1)[0], "JPEG"))
            assert json.loads(socket.recv(timeout=30))["accepted"]


def test_binding_beyond_loopback_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="--token"):
        ServerSettings(host="0.0.0.0")
    assert ServerSettings(host="0.0.0.0", token=TOKEN).host == "0.0.0.0"
    assert ServerSettings(host="::1").token is None
    result = subprocess.run([sys.executable, "-m", "streamtc.cli", "serve", "--host", "192.168.1.5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--token" in result.stdout


def test_server_shutdown_closes_open_streams_and_their_subscribers() -> None:
    running = ServerThread(ServerSettings(preset=PRESET, port=0)).start()
    closed: list[tuple[str, int]] = []
    app = running.server.config.app
    app.state.backend.engine.on_close = lambda info, session: closed.append((info["id"], session.frames))
    with httpx.Client(base_url=running.url, timeout=60) as http:
        ids = [http.post("/v1/streams", json={}).json()["id"] for _ in range(2)]
        push_raw(http, ids[0], clip_frames("bikes", 1)[0], 0.0)
        http.post(f"/v1/streams/{ids[0]}/ask", json={"question": "?", "sync": True, "max_new_tokens": 1})
    with connect(ws_url(running, f"/v1/streams/{ids[1]}/events")) as subscriber:
        started = time.monotonic()
        running.stop()
        assert time.monotonic() - started < 30
        with pytest.raises(ConnectionClosed):  # the subscriber's connection is closed, not left hanging
            while True:
                subscriber.recv(timeout=10)
    assert sorted(closed) == sorted([(ids[0], 1), (ids[1], 0)])


def test_the_command_serves_and_the_loadtest_command_measures_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from streamtc.cli.serve import serve_app
    from streamtc.serve.load import SpawnedServer

    server = SpawnedServer(["--no-stc", "--max-streams", "3"])
    try:
        server.wait_ready()
        info = httpx.get(server.url + "/v1/info").json()
        assert info["default_stc"] is None and info["limits"]["max_streams"] == 3
        run = CliRunner().invoke(serve_app, ["loadtest", "--url", server.url, "--streams", "2", "--streams", "1",
                                             "--duration", "4",
                                             "--question-every", "2", "--source", "carphone", "--stc", "off",
                                             "--max-new-tokens", "2", "--output", str(tmp_path / "load.json")])
    finally:
        server.stop()
    assert run.exit_code == 0, run.output
    assert "shut down: closed 0 open streams" in server.process.stderr.read()  # SIGTERM: a graceful shutdown
    result, single = json.loads((tmp_path / "load.json").read_text())["results"]  # the sweep, in the order asked
    assert (result["streams"], single["streams"]) == (2, 1) and single["errors"] == [] and single["questions"] >= 1
    assert result["errors"] == [] and result["questions"] >= 2
    assert result["frames_per_s_per_stream"]["min"] > 0 and result["rss_mb"][-1][1] > 100
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p95"]
    assert "frames/s/stream" in run.output and "off" in run.output  # the printed report


def test_the_servers_language_model_depth_can_be_reduced() -> None:
    from streamtc.serve.backend import load_base_session

    session = load_base_session(ServerSettings(preset="tiny-llava-ov", num_layers=1, text_layers=1))
    assert len(session.model.model.language_model.layers) == 1  # the preset's own depth is 2
    assert session.model.config.vision_config.num_hidden_layers == 1
