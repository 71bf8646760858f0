"""The HTTP and websocket handlers of `streamtc serve`, as plain functions on one router. Each reads
the backend (`LocalBackend` or `RayBackend`) from the app's state; errors are typed and become
JSON with their status in `app.py`."""

from __future__ import annotations

import io
import json
import time
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.requests import HTTPConnection

from ..errors import InputError, StreamTCError
from .errors import http_status
from .requests import AskRequest, ChatRequest, StreamRequest, chat_question
from .settings import DEFAULT_NEW_TOKENS

STATIC_DIR = Path(__file__).parent / "static"
EVENT_WAIT_S = 2.0  # a subscriber's wait for new events before a keep-alive (also how soon it sees a shutdown)

router = APIRouter()


def backend(connection: HTTPConnection) -> Any:
    """The app's backend (opened when the app started)."""
    return connection.app.state.backend


@lru_cache(maxsize=1)
def favicon_bytes() -> bytes:
    """A 32×32 ICO: the page's blue, with a light square (a frame) in it."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (32, 32), (37, 99, 235, 255))
    ImageDraw.Draw(image).rectangle((8, 10, 23, 21), fill=(224, 242, 254, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="ICO", sizes=[(32, 32)])
    return buffer.getvalue()


# -- page and info -------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return Response(favicon_bytes(), media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})


@router.get("/v1/info")
async def info(request: Request) -> dict[str, Any]:
    return await backend(request).info()


# -- streams -------------------------------------------------------------------------------------


@router.get("/v1/streams")
async def list_streams(request: Request) -> dict[str, Any]:
    return {"streams": await backend(request).list()}


@router.post("/v1/streams", status_code=201)
async def create_stream(request: Request, body: StreamRequest) -> dict[str, Any]:
    return await backend(request).create(body.to_spec())


@router.get("/v1/streams/{stream_id}")
async def describe_stream(request: Request, stream_id: str) -> dict[str, Any]:
    return await backend(request).describe(stream_id)


@router.delete("/v1/streams/{stream_id}")
async def delete_stream(request: Request, stream_id: str) -> dict[str, Any]:
    await backend(request).delete(stream_id)
    return {"deleted": stream_id}


@router.post("/v1/streams/{stream_id}/frames")
async def push_frame(request: Request, stream_id: str, width: int | None = None, height: int | None = None,
                     timestamp: float | None = None) -> dict[str, Any]:
    data = await request.body()
    if not data:
        raise InputError("empty body: send one JPEG/PNG image, or raw RGB bytes with ?width=&height=")
    return await backend(request).push(stream_id, data, width=width, height=height, timestamp=timestamp)


@router.post("/v1/streams/{stream_id}/ask")
async def ask(request: Request, stream_id: str, body: AskRequest) -> dict[str, Any]:
    return await backend(request).ask(stream_id, body.question, body.options, max_new_tokens=body.max_new_tokens,
                                      sync=body.sync, top_logprobs=body.top_logprobs)


@router.get("/v1/streams/{stream_id}/frame.jpg")
async def latest_frame(request: Request, stream_id: str) -> Response:
    data = await backend(request).frame_jpeg(stream_id)
    if data is None:
        return JSONResponse({"error": f"stream {stream_id} has no processed frame yet"}, status_code=404)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


# -- live events and pushed frames -------------------------------------------------------------------


@router.get("/v1/streams/{stream_id}/events")
async def events_sse(request: Request, stream_id: str, after: int = Query(0, ge=0)) -> StreamingResponse:
    source = backend(request)
    await source.describe(stream_id)  # 404 before the stream starts

    async def lines() -> AsyncIterator[str]:
        last = after
        while True:
            try:
                events, _ = await source.events(stream_id, last, EVENT_WAIT_S)
            except StreamTCError as error:
                yield f"event: end\ndata: {json.dumps({'error': str(error)})}\n\n"
                return
            for event in events:
                last = event["seq"]
                yield f"id: {last}\ndata: {json.dumps(event)}\n\n"
            if not events:
                yield ": keep-alive\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.websocket("/v1/streams/{stream_id}/events")
async def events_ws(websocket: WebSocket, stream_id: str, after: int = 0) -> None:
    await websocket.accept()
    last = after
    try:
        while True:
            try:
                events, _ = await backend(websocket).events(stream_id, last, EVENT_WAIT_S)
            except StreamTCError as error:
                await websocket.send_json({"type": "end", "error": str(error)})
                await websocket.close()
                return
            for event in events:
                last = event["seq"]
                await websocket.send_json(event)
            if not events:
                await websocket.send_json({"type": "keepalive"})
    except (WebSocketDisconnect, RuntimeError):
        return  # the subscriber went away


@router.websocket("/v1/streams/{stream_id}/push")
async def push_ws(websocket: WebSocket, stream_id: str) -> None:
    """Frames over a websocket: binary JPEG/PNG messages, or a JSON header (timestamp, width,
    height) before a binary message; one JSON reply per frame."""
    await websocket.accept()
    header: dict[str, Any] = {}
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                try:
                    header = json.loads(message["text"])
                    if not isinstance(header, dict):
                        raise ValueError("not an object")
                except ValueError as error:
                    header = {}
                    await websocket.send_json({"error": f"malformed JSON header: {error}", "status": 400})
                continue
            try:
                result = await backend(websocket).push(stream_id, message.get("bytes") or b"", width=header.get("width"),
                                                       height=header.get("height"), timestamp=header.get("timestamp"))
                await websocket.send_json(result)
            except StreamTCError as error:
                await websocket.send_json({"error": str(error), "status": http_status(error)})
                if http_status(error) == 404:
                    await websocket.close(code=4404)
                    return
            header = {}
    except (WebSocketDisconnect, RuntimeError):
        return


# -- OpenAI-style ------------------------------------------------------------------------------------


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    streams = await backend(request).list()
    return {"object": "list", "data": [{"id": s["id"], "object": "model", "created": int(s["created"]),
                                        "owned_by": "streamtc"} for s in streams]}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatRequest, x_stream_id: str | None = Header(default=None)
                           ) -> dict[str, Any] | StreamingResponse:
    """One question to a stream (model = its id, or the X-Stream-Id header); with `stream: true`,
    the answer's tokens as server-sent chunks while they are generated."""
    stream_id = x_stream_id or (body.model or "").removeprefix("stream:")
    if not stream_id:
        raise InputError("name the stream: the model field (its id) or the X-Stream-Id header")
    question = chat_question(body.messages)
    requested = body.max_completion_tokens or body.max_tokens
    source = backend(request)
    if body.stream:
        await source.describe(stream_id)  # 404 before the response starts
        return StreamingResponse(_chat_chunks(source, stream_id, question, requested), media_type="text/event-stream")
    answer = await source.ask(stream_id, question, max_new_tokens=requested)
    completion_tokens = len(answer["token_ids"])
    return {
        "id": _completion_id(stream_id), "object": "chat.completion", "created": int(time.time()), "model": stream_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["text"]},
                     "finish_reason": _finish_reason(answer, requested)}],
        "usage": {"prompt_tokens": answer["prompt_tokens"], "completion_tokens": completion_tokens,
                  "total_tokens": answer["prompt_tokens"] + completion_tokens},
        "streamtc": {k: answer[k] for k in ("timestamp", "frames", "latency_ms", "ttft_ms", "queue_ms")},
    }


def _completion_id(stream_id: str) -> str:
    return f"chatcmpl-{stream_id}-{int(time.time() * 1000)}"


def _finish_reason(answer: dict[str, Any], requested: int | None) -> str:
    """An answer that used every token it was allowed was cut short ("length"), else it ended ("stop")."""
    return "length" if len(answer["token_ids"]) >= (requested or DEFAULT_NEW_TOKENS) else "stop"


async def _chat_chunks(source: Any, stream_id: str, question: str, requested: int | None) -> AsyncIterator[str]:
    """The chat completion chunks of one answer: the role, one chunk per text delta as the tokens
    are generated, the finish reason, then [DONE]; an error mid-answer as an error chunk."""
    completion_id, created = _completion_id(stream_id), int(time.time())

    def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
        return "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                      "model": stream_id, "choices": [{"index": 0, "delta": delta,
                                                                       "finish_reason": reason}]}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for text, answer in source.ask_stream(stream_id, question, max_new_tokens=requested):
            if text:
                yield chunk({"content": text})
            if answer is not None:
                yield chunk({}, _finish_reason(answer, requested))
    except StreamTCError as error:
        yield f"data: {json.dumps({'error': {'message': str(error), 'code': http_status(error)}})}\n\n"
    yield "data: [DONE]\n\n"


__all__ = ["STATIC_DIR", "backend", "router"]
