"""The HTTP front of `streamtc serve`: a FastAPI app over a backend (`LocalBackend` in this process,
`RayBackend` over Ray Serve replicas), with bearer auth, size limits and the web page.

Endpoints (JSON unless noted; every one, websockets included, needs the token when one is set,
given as `Authorization: Bearer TOKEN`, or for browsers `?token=` (which also sets a cookie)):

    GET    /                              the web page (static HTML/JS, no build step)
    GET    /v1/info                       model, default STC settings, limits, resident memory
    GET    /v1/streams                    list; POST creates ({"source": ..., "fps": ..., "stc": ...})
    GET    /v1/streams/{id}               inspect (state, counters, stats); DELETE closes it
    POST   /v1/streams/{id}/frames        push one frame: JPEG/PNG body, or raw RGB with ?width=&height=
    WS     /v1/streams/{id}/push          push frames: binary JPEG/PNG (or a JSON header, then raw RGB)
    POST   /v1/streams/{id}/ask           {"question", "options"?, "max_new_tokens"?, "sync"?,
                                          "top_logprobs"?} -> the answer, with timings
    GET    /v1/streams/{id}/frame.jpg     the latest processed frame
    WS     /v1/streams/{id}/events        live events (JSON); GET on the same path: server-sent events
    GET    /v1/models                     the streams, as OpenAI "models"
    POST   /v1/chat/completions           OpenAI-style chat against one stream (model = stream id, or
                                          the X-Stream-Id header)
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

from fastapi import FastAPI, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from ..config import STCConfig
from ..errors import ConfigError, InputError, StreamStateError, StreamTCError, VideoSourceError
from .engine import DEFAULT_NEW_TOKENS, LimitExceeded, ServeError, ServeLimits, StreamSpec, origin_of


STATIC_DIR = Path(__file__).parent / "static"
COOKIE = "streamtc_token"
EVENT_WAIT_S = 2.0  # a subscriber's wait for new events before a keep-alive (also how soon it sees a shutdown)


# -- request bodies -------------------------------------------------------------------------------


class StreamRequest(BaseModel):
    """Body of POST /v1/streams; see `StreamSpec`. stc: "default", null (no STC) or
    {"cacher": {...} | null, "pruner": {...} | null}."""

    model_config = ConfigDict(extra="forbid")
    source: str | None = None
    fps: float = 1.0
    stc: dict[str, Any] | None | Literal["default"] = "default"
    memory: Literal["full", "window", "retrieval", "streaming-vlm"] | None = None
    window_tokens: int | None = None
    realtime: bool = True
    loop: bool = False
    max_seconds: float | None = None
    name: str | None = Field(default=None, max_length=200)

    def to_spec(self) -> StreamSpec:
        stc = self.stc if self.stc in ("default", None) else STCConfig.from_dict(self.stc)
        return StreamSpec(source=self.source, fps=self.fps, stc=stc, memory=self.memory,
                          window_tokens=self.window_tokens, realtime=self.realtime, loop=self.loop,
                          max_seconds=self.max_seconds, name=self.name)


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    options: list[str] | None = None
    max_new_tokens: int | None = None
    sync: bool = False
    top_logprobs: int | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """OpenAI chat completion request; fields beyond these (temperature, ...) are accepted and
    ignored: answers are greedy."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False


def _chat_question(messages: list[ChatMessage]) -> str:
    """The text of the last user message (string content or text parts)."""
    for message in reversed(messages):
        if message.role == "user":
            content = message.content
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
            if content and content.strip():
                return content
            break
    raise InputError("the chat needs a last user message with text: the question about the stream")


# -- security ---------------------------------------------------------------------------------------


STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Guard:
    """ASGI middleware: the browser origin, the bearer token (when one is set) and the body size.

    Origin: a websocket handshake, or a state-changing request (POST, PUT, PATCH, DELETE), that
    carries an `Origin` header (every browser sends one) is refused (403) unless the origin is the
    server's own (the request's `Host`) or one of `allow_origins`: a page on another origin, even
    another port of the same host, whose requests a browser would send with the token cookie,
    can neither open the websockets nor change streams. Clients that send no `Origin` (scripts,
    the `openai` client, curl) are not affected.

    Token: taken from `Authorization: Bearer`, a `?token=` query parameter or the `streamtc_token`
    cookie. A request authorised by the query parameter gets that cookie (HttpOnly,
    SameSite=Strict), so the page opened as `/?token=...` can load its scripts and images, which a
    browser fetches without headers.

    Size: request bodies are capped at `max_body` bytes (413), whether or not they declare their
    length."""

    def __init__(self, app: Any, token: str | None, max_body: int, allow_origins: tuple[str, ...] = ()) -> None:
        self.app, self.token, self.max_body = app, token, max_body
        self.allow_origins = frozenset(filter(None, map(origin_of, allow_origins)))

    def _credentials(self, scope: dict[str, Any], headers: dict[str, str]) -> tuple[bool, bool]:
        """(authorised, authorised by the query parameter)."""
        if self.token is None:
            return True, False
        scheme, _, value = headers.get("authorization", "").partition(" ")
        cookies = dict(part.strip().partition("=")[::2] for part in headers.get("cookie", "").split(";") if "=" in part)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])

        def matches(offered: list[str]) -> bool:
            return any(hmac.compare_digest(o.encode(), self.token.encode()) for o in offered)

        by_query = matches(query)
        return by_query or matches([value.strip()] if scheme.lower() == "bearer" else []) or matches(
            [cookies.get(COOKIE, "")]), by_query

    def _foreign_origin(self, scope: dict[str, Any], headers: dict[str, str]) -> str | None:
        """The request's `Origin` when it must be refused: a websocket or state-changing request
        from a browser page on an origin that is neither the server's own nor allowed."""
        if "origin" not in headers or (scope["type"] == "http" and scope["method"] not in STATE_CHANGING):
            return None
        offered = headers["origin"]
        origin = origin_of(offered)
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        if origin is not None and (origin in self.allow_origins
                                   or origin == origin_of(f"{scheme}://{headers.get('host', '')}")):
            return None
        return offered

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        foreign = self._foreign_origin(scope, headers)
        authorised, by_query = self._credentials(scope, headers)
        if foreign is not None or not authorised:
            reason = (f"origin {foreign} is not this server's; start the server with --allow-origin {foreign} to "
                      "allow pages from it" if foreign is not None else "missing or wrong bearer token")
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
                return
            if foreign is not None:
                response = JSONResponse({"error": reason}, status_code=403)
            else:
                response = JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer TOKEN)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        if scope["type"] == "http":
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                response = JSONResponse({"error": f"request body of {int(length)} bytes exceeds the limit of "
                                                  f"{self.max_body} bytes (--max-upload-bytes)"}, status_code=413)
                return await response(scope, receive, send)
            receive = self._capped(receive)
            if by_query:
                send = self._with_cookie(send)
        return await self.app(scope, receive, send)

    def _with_cookie(self, send: Callable) -> Callable:
        cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode("latin-1")

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return sending

    def _capped(self, receive: Callable) -> Callable:
        seen = 0

        async def capped() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise LimitExceeded(f"request body exceeds the limit of {self.max_body} bytes (--max-upload-bytes)",
                                    status=413)
            return message

        return capped


def _status(error: Exception) -> int:
    if isinstance(error, ServeError):
        return error.status
    if isinstance(error, (InputError, ConfigError)):
        return 422
    if isinstance(error, StreamStateError):
        return 409
    if isinstance(error, VideoSourceError):
        return 400
    return 500


def _error_response(error: Exception) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=_status(error))


def _validation_message(error: RequestValidationError) -> tuple[int, str]:
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return 400, "malformed JSON body: " + "; ".join(str(p.get("ctx", {}).get("error", p["msg"])) for p in problems)
    parts = [f"{'.'.join(str(x) for x in p['loc'] if x != 'body') or 'body'}: {p['msg']}" for p in problems]
    return 422, "invalid request: " + "; ".join(parts)


# -- the app ----------------------------------------------------------------------------------------


def build_app(open_backend: Callable[[], Awaitable[Any]], *, token: str | None = None,
              limits: ServeLimits = ServeLimits(), allow_origins: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app; `open_backend()` is awaited at start-up (the model loads then) and the
    backend's `close()` at shutdown (streams closed)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.backend = await open_backend()
        try:
            yield
        finally:
            await app.state.backend.close()

    app = FastAPI(title="streamtc serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.add_middleware(Guard, token=token, max_body=limits.max_upload_bytes,
                       allow_origins=allow_origins)

    def backend() -> Any:
        return app.state.backend

    @app.exception_handler(StreamTCError)
    async def on_streamtc_error(request: Request, error: StreamTCError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(error)
        return JSONResponse({"error": message}, status_code=status)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return await backend().info()

    @app.get("/v1/streams")
    async def list_streams() -> dict[str, Any]:
        return {"streams": await backend().list()}

    @app.post("/v1/streams", status_code=201)
    async def create_stream(body: StreamRequest) -> dict[str, Any]:
        return await backend().create(body.to_spec())

    @app.get("/v1/streams/{stream_id}")
    async def describe_stream(stream_id: str) -> dict[str, Any]:
        return await backend().describe(stream_id)

    @app.delete("/v1/streams/{stream_id}")
    async def delete_stream(stream_id: str) -> dict[str, Any]:
        await backend().delete(stream_id)
        return {"deleted": stream_id}

    @app.post("/v1/streams/{stream_id}/frames")
    async def push_frame(stream_id: str, request: Request, width: int | None = None, height: int | None = None,
                         timestamp: float | None = None) -> dict[str, Any]:
        data = await request.body()
        if not data:
            raise InputError("empty body: send one JPEG/PNG image, or raw RGB bytes with ?width=&height=")
        return await backend().push(stream_id, data, width=width, height=height, timestamp=timestamp)

    @app.post("/v1/streams/{stream_id}/ask")
    async def ask(stream_id: str, body: AskRequest) -> dict[str, Any]:
        return await backend().ask(stream_id, body.question, body.options, max_new_tokens=body.max_new_tokens,
                                   sync=body.sync, top_logprobs=body.top_logprobs)

    @app.get("/v1/streams/{stream_id}/frame.jpg")
    async def latest_frame(stream_id: str) -> Response:
        data = await backend().frame_jpeg(stream_id)
        if data is None:
            return JSONResponse({"error": f"stream {stream_id} has no processed frame yet"}, status_code=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/v1/streams/{stream_id}/events")
    async def events_sse(stream_id: str, after: int = Query(0, ge=0)) -> StreamingResponse:
        await backend().describe(stream_id)  # 404 before the stream starts

        async def lines() -> AsyncIterator[str]:
            last = after
            while True:
                try:
                    events, _ = await backend().events(stream_id, last, EVENT_WAIT_S)
                except StreamTCError as error:
                    yield f"event: end\ndata: {json.dumps({'error': str(error)})}\n\n"
                    return
                for event in events:
                    last = event["seq"]
                    yield f"id: {last}\ndata: {json.dumps(event)}\n\n"
                if not events:
                    yield ": keep-alive\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.websocket("/v1/streams/{stream_id}/events")
    async def events_ws(websocket: WebSocket, stream_id: str, after: int = 0) -> None:
        await websocket.accept()
        last = after
        try:
            while True:
                try:
                    events, _ = await backend().events(stream_id, last, EVENT_WAIT_S)
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

    @app.websocket("/v1/streams/{stream_id}/push")
    async def push_ws(websocket: WebSocket, stream_id: str) -> None:
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
                    result = await backend().push(
                        stream_id, message.get("bytes") or b"", width=header.get("width"), height=header.get("height"),
                        timestamp=header.get("timestamp"),
                    )
                    await websocket.send_json(result)
                except StreamTCError as error:
                    await websocket.send_json({"error": str(error), "status": _status(error)})
                    if _status(error) == 404:
                        await websocket.close(code=4404)
                        return
                header = {}
        except (WebSocketDisconnect, RuntimeError):
            return

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        streams = await backend().list()
        return {"object": "list", "data": [{"id": s["id"], "object": "model", "created": int(s["created"]),
                                            "owned_by": "streamtc"} for s in streams]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, x_stream_id: str | None = Header(default=None)
                               ) -> dict[str, Any] | StreamingResponse:
        stream_id = x_stream_id or (body.model or "").removeprefix("stream:")
        if not stream_id:
            raise InputError("name the stream: the model field (its id) or the X-Stream-Id header")
        question = _chat_question(body.messages)
        requested = body.max_completion_tokens or body.max_tokens
        answer = await backend().ask(stream_id, question, max_new_tokens=requested)
        completion_id, created = f"chatcmpl-{stream_id}-{int(time.time() * 1000)}", int(time.time())
        # an answer that used every token it was allowed was cut short (length), else it ended (stop)
        finish = "length" if len(answer["token_ids"]) >= (requested or DEFAULT_NEW_TOKENS) else "stop"
        if body.stream:
            async def chunks() -> AsyncIterator[str]:
                for delta, reason in (({"role": "assistant", "content": answer["text"]}, None), ({}, finish)):
                    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                             "model": stream_id, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")
        completion_tokens = len(answer["token_ids"])
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": stream_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["text"]},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": answer["prompt_tokens"], "completion_tokens": completion_tokens,
                      "total_tokens": answer["prompt_tokens"] + completion_tokens},
            "streamtc": {k: answer[k] for k in ("timestamp", "frames", "latency_ms", "ttft_ms", "queue_ms")},
        }

    return app


__all__ = ["AskRequest", "ChatRequest", "Guard", "StreamRequest", "build_app"]
