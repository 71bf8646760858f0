"""`streamtc serve --ray`: two Ray Serve replicas on a local Ray cluster bound to 127.0.0.1. Streams
land on both replicas, answer exactly as a single-process server does on the same input, and a
replica's failure is reported for its streams only."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from streamtc.serve import ServerSettings, ServerThread
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


@pytest.mark.slow  # two Ray Serve replicas, each loading a model: about 2 minutes on 2 cores
def test_two_replicas_answer_as_one_process_and_fail_alone() -> None:
    import ray

    with ServerThread(ServerSettings(port=0, threads=1)) as single:
        expected = run_streams(single.url)
    with ServerThread(ServerSettings(port=0, replicas=2, replica_cpus=0.5, threads=1)) as cluster:
        info = httpx.get(cluster.url + "/v1/info").json()
        assert info["replicas"] == 2 and info["model"] == "tiny-llava-ov"
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
