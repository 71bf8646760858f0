"""`/v1/chat/completions` with `stream: true`, through the official `openai` client against uvicorn on
127.0.0.1: the answer's tokens arrive as separate deltas while the model is still generating, and
they add up to the non-streamed answer."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from openai import NotFoundError, OpenAI

from streamtc.serve import ServerSettings, ServerThread

from helpers import PRESET, clip_frames, push_raw

TOKEN_S = 0.1  # the model is slowed to this per token, so "before generation ends" is measurable
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server():
    with ServerThread(ServerSettings(preset=PRESET, port=0, default_stc=None)) as running:
        base = running.server.config.app.state.backend.engine.base
        # random weights answer blank lines only: mask every token that decodes to no visible text
        # (and the end of turn), so the greedy answer is MAX_TOKENS visible tokens; each takes TOKEN_S
        tokenizer = base.tokenizer
        blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
        masked = torch.tensor(blank)

        def slow_visible(module, inputs, logits):
            time.sleep(TOKEN_S)
            return logits.index_fill(-1, masked, float("-inf"))

        hook = base.model.lm_head.register_forward_hook(slow_visible)
        yield running
        hook.remove()


def test_streamed_chat_sends_each_token_as_it_is_generated(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        stream = http.post("/v1/streams", json={"fps": 1}).json()["id"]
        push_raw(http, stream, clip_frames("bikes", 1)[0], 0.0)
        http.post(f"/v1/streams/{stream}/ask", json={"question": "?", "sync": True, "max_new_tokens": 1})
    client = OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0)
    messages = [{"role": "user", "content": "What is in the video?"}]
    whole = client.chat.completions.create(model=stream, messages=messages, max_tokens=MAX_TOKENS)
    assert whole.usage.completion_tokens == MAX_TOKENS and whole.choices[0].finish_reason == "length"

    deltas, arrivals, reasons = [], [], []
    for chunk in client.chat.completions.create(model=stream, messages=messages, max_tokens=MAX_TOKENS, stream=True):
        choice = chunk.choices[0]
        if choice.delta.content:
            deltas.append(choice.delta.content)
            arrivals.append(time.monotonic())
        reasons.append(choice.finish_reason)
    finished = time.monotonic()
    assert len(deltas) >= MAX_TOKENS // 2  # several deltas, not one chunk with the whole answer
    assert "".join(deltas) == whole.choices[0].message.content  # they add up to the answer
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    # the first delta came while the model still had most of its tokens to generate
    assert finished - arrivals[0] >= (MAX_TOKENS - 2) * TOKEN_S


def test_a_streamed_chat_about_an_unknown_stream_fails_before_it_starts(server: ServerThread) -> None:
    client = OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0)
    with pytest.raises(NotFoundError):  # a 404 status, not a 200 stream that carries an error
        next(iter(client.chat.completions.create(model="nope", stream=True,
                                                 messages=[{"role": "user", "content": "?"}])))
