"""Browser origins: a page on another origin (another port of the same host included) must not
reach the streams with the cookie the server set for its own page, while the page itself and
clients without a browser origin keep working. Real uvicorn on 127.0.0.1 and a real websockets
client."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from streamtc.errors import ConfigError
from streamtc.serve import ServerSettings, ServerThread

PRESET = "tiny-llava-ov"
TOKEN = "s3cret-token-for-tests"
FOREIGN = "http://127.0.0.1:9911"  # same host, another port: same-site, so SameSite=Strict cookies go along


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(preset=PRESET, port=0, token=TOKEN, allow_origins=("http://localhost:7000",))
    with ServerThread(settings) as running:
        yield running


def ws(server: ServerThread, path: str, origin: str | None, cookie: bool = True):
    headers = {"Cookie": f"streamtc_token={TOKEN}"} if cookie else {}
    return connect(server.url.replace("http://", "ws://") + path, origin=origin, additional_headers=headers,
                   open_timeout=120)


def test_a_foreign_page_with_the_cookie_cannot_open_the_websockets(server: ServerThread) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    stream = httpx.post(server.url + "/v1/streams", json={}, headers=auth, timeout=120).json()["id"]
    for path in (f"/v1/streams/{stream}/events", f"/v1/streams/{stream}/push"):
        with pytest.raises(InvalidStatus) as refused:
            ws(server, path, FOREIGN)
        assert refused.value.response.status_code == 403
        with ws(server, path, server.url) as own:  # the server's own page
            if path.endswith("events"):
                assert json.loads(own.recv(timeout=30))["type"] in ("state", "keepalive")
        with ws(server, path, "http://localhost:7000"):  # named by --allow-origin
            pass
    with connect(server.url.replace("http://", "ws://") + f"/v1/streams/{stream}/events",
                 additional_headers=auth, open_timeout=120) as script:  # bearer token, no browser origin
        assert json.loads(script.recv(timeout=30))["type"] in ("state", "keepalive")


def test_a_foreign_page_cannot_change_streams_with_the_cookie(server: ServerThread) -> None:
    cookies = {"streamtc_token": TOKEN}
    with httpx.Client(base_url=server.url, cookies=cookies, timeout=120) as browser:
        refused = browser.post("/v1/streams", json={}, headers={"Origin": FOREIGN})
        assert refused.status_code == 403 and "--allow-origin" in refused.json()["error"]
        created = browser.post("/v1/streams", json={}, headers={"Origin": server.url})
        assert created.status_code == 201
        stream = created.json()["id"]
        assert browser.delete(f"/v1/streams/{stream}", headers={"Origin": FOREIGN}).status_code == 403
        assert browser.get(f"/v1/streams/{stream}", headers={"Origin": FOREIGN}).status_code == 200  # reads: CORS
        assert browser.delete(f"/v1/streams/{stream}", headers={"Origin": server.url}).status_code == 200
    # a script with the bearer token and no Origin header is not a browser page
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(server.url + "/v1/streams", json={}, headers=auth, timeout=120).status_code == 201


def test_origins_and_tokens_are_checked_when_the_server_is_configured() -> None:
    with pytest.raises(ConfigError, match="--allow-origin"):
        ServerSettings(allow_origins=("127.0.0.1:9000",))
    with pytest.raises(ConfigError, match="--token"):
        ServerSettings(token=" " * 12)
    with pytest.raises(ConfigError, match="--token"):
        ServerSettings(host="0.0.0.0", token=" " * 12)
