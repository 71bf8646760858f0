"""Model views (`--max-model-views`): a view is released when its last stream closes, so the limit
bounds the distinct STC settings of the open streams, not of every stream ever opened. Real uvicorn
and httpx on 127.0.0.1, the tiny preset."""

from __future__ import annotations

import httpx

from streamtc.serve import ServeLimits, ServerSettings, ServerThread

from helpers import PRESET, clip_frames, push_raw


def settings_with(ratio: float) -> dict:
    return {"fps": 2.0, "stc": {"cacher": {"update_ratio": ratio}, "pruner": None}}


def test_a_view_is_released_when_its_last_stream_closes() -> None:
    limits = ServeLimits(max_model_views=3)
    frame = clip_frames("bikes", 1)[0]
    with ServerThread(ServerSettings(preset=PRESET, port=0, limits=limits)) as server, \
            httpx.Client(base_url=server.url, timeout=120) as http:
        for ratio in (0.25, 0.5, 0.75):  # three settings, each used and deleted
            stream = http.post("/v1/streams", json=settings_with(ratio))
            assert stream.status_code == 201, stream.text
            sid = stream.json()["id"]
            assert push_raw(http, sid, frame, 0.0).json()["accepted"]
            assert http.post(f"/v1/streams/{sid}/ask", json={"question": "?", "sync": True}).status_code == 200
            assert http.delete(f"/v1/streams/{sid}").status_code == 200
        fourth = http.post("/v1/streams", json=settings_with(1.0))
        assert fourth.status_code == 201, fourth.text
        # the limit still holds for open streams: three open views, a fourth setting refused
        open_ids = [fourth.json()["id"]] + [http.post("/v1/streams", json=settings_with(r)).json()["id"]
                                            for r in (0.25, 0.5)]
        refused = http.post("/v1/streams", json=settings_with(0.75))
        assert refused.status_code == 429 and "--max-model-views" in refused.json()["error"]
        assert http.post("/v1/streams", json=settings_with(0.25)).status_code == 201  # a setting in use: no new view
        http.delete(f"/v1/streams/{open_ids[0]}")
        assert http.post("/v1/streams", json=settings_with(0.75)).status_code == 201
