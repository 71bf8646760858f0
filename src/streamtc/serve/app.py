"""The HTTP front of `streamtc serve`: a FastAPI app over a backend (`LocalBackend` in this process,
`RayBackend` over Ray Serve replicas), behind the `Guard` (origin, bearer token, body size), with
the handlers of `routes.py` and the web page.

Endpoints (JSON unless noted; every one, websockets included, needs the token when one is set,
given as `Authorization: Bearer TOKEN`, or for browsers `?token=` (which also sets a cookie)):

    GET    /                              the web page (static HTML/JS, no build step); /favicon.ico
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
                                          the X-Stream-Id header); stream: true sends tokens as generated
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from ..errors import StreamTCError
from .errors import http_status
from .guard import Guard
from .routes import STATIC_DIR, router
from .settings import ServeLimits


async def on_streamtc_error(request: Request, error: StreamTCError) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=http_status(error))


async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body or parameter that does not parse: 400 for malformed JSON, else 422 naming the fields."""
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        message = "malformed JSON body: " + "; ".join(str(p.get("ctx", {}).get("error", p["msg"])) for p in problems)
        return JSONResponse({"error": message}, status_code=400)
    parts = [f"{'.'.join(str(x) for x in p['loc'] if x != 'body') or 'body'}: {p['msg']}" for p in problems]
    return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)


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
    app.add_middleware(Guard, token=token, max_body=limits.max_upload_bytes, allow_origins=allow_origins)
    app.add_exception_handler(StreamTCError, on_streamtc_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    return app


__all__ = ["build_app", "on_streamtc_error", "on_validation_error"]
