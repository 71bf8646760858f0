"""Rough edges a new user of `streamtc serve` meets: limit messages that quote the flag's own value,
an IPv6 banner a browser can open, the command's help naming every host family, a favicon, and the
checkpoint settings refused when they cannot apply."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from streamtc.errors import ConfigError
from streamtc.serve import ServeLimits, ServerSettings, ServerThread

from helpers import PRESET


@pytest.fixture(scope="module")
def server():
    with ServerThread(ServerSettings(preset=PRESET, port=0, limits=ServeLimits(max_upload_bytes=50_000))) as running:
        yield running


def test_upload_limits_quote_the_flag_value(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        sid = http.post("/v1/streams", json={}).json()["id"]
        for size in (50_001, 60_000, 200_000):  # above the limit, and above it by more than 64 KiB
            declared = http.post(f"/v1/streams/{sid}/frames", content=bytes(size))
            assert declared.status_code == 413 and "limit of 50000 bytes (--max-upload-bytes)" in declared.json()["error"]

        def chunks():  # no Content-Length: the body is counted as it arrives
            for _ in range(4):
                yield bytes(20_000)

        streamed = http.post(f"/v1/streams/{sid}/frames", content=chunks())
        assert streamed.status_code == 413 and "limit of 50000 bytes" in streamed.json()["error"]


def test_the_page_has_a_favicon(server: ServerThread) -> None:
    icon = httpx.get(server.url + "/favicon.ico", timeout=60)
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    with Image.open(io.BytesIO(icon.content)) as image:
        assert image.format == "ICO" and image.size == (32, 32)


def test_the_banner_brackets_an_ipv6_host_and_the_help_names_qwen3_vl(monkeypatch) -> None:
    from streamtc.cli.serve import serve_app
    from streamtc.serve import server as server_module

    started = []
    monkeypatch.setattr(server_module, "run", started.append)
    runner = CliRunner()
    result = runner.invoke(serve_app, ["--host", "::1", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert "http://[::1]:8123/" in result.output and started[0].host == "::1"
    help_text = runner.invoke(serve_app, ["--help"], env={"COLUMNS": "300"}).output
    assert "Qwen3-VL" in help_text and "--checkpoint-every" in help_text and "--allow-origin" in help_text


def test_checkpoint_settings(tmp_path: Path) -> None:
    assert ServerSettings().checkpoint_interval is None
    assert ServerSettings(persist_dir=tmp_path).checkpoint_interval == 30.0  # on by default with a persist dir
    assert ServerSettings(persist_dir=tmp_path, checkpoint_every=2).checkpoint_interval == 2.0
    assert ServerSettings(persist_dir=tmp_path, checkpoint_every=0).checkpoint_interval is None
    with pytest.raises(ConfigError, match="--persist-dir"):
        ServerSettings(checkpoint_every=5)
    with pytest.raises(ConfigError, match="--checkpoint-every"):
        ServerSettings(persist_dir=tmp_path, checkpoint_every=-1)


def test_every_error_has_one_http_status() -> None:
    from streamtc.errors import ConfigError, InputError, StreamStateError, VideoSourceError
    from streamtc.serve.errors import (
        AccessDenied, LimitExceeded, ReplicaUnavailable, StreamClosed, StreamNotFound, http_status,
    )

    expected = {StreamNotFound("x"): 404, AccessDenied("x"): 403, LimitExceeded("x"): 429,
                LimitExceeded("x", status=413): 413, StreamClosed("x"): 409, ReplicaUnavailable("x"): 503,
                InputError("x"): 422, ConfigError("x"): 422, StreamStateError("x"): 409, VideoSourceError("x"): 400,
                RuntimeError("x"): 500}
    for error, status in expected.items():
        assert http_status(error) == status, repr(error)
