"""The server's gate, as ASGI middleware: browser origin, bearer token and body size, checked
before any route runs."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from fastapi.responses import JSONResponse

from .errors import LimitExceeded
from .settings import origin_of

COOKIE = "streamtc_token"


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


__all__ = ["COOKIE", "Guard"]
