"""`streamtc serve`: several live streams on one loaded model, over HTTP/websockets, with a web page.

Modules: `settings` (limits, memory, source policy, a stream's settings) and `errors` (typed errors
and their HTTP statuses); the model side without web code: `engine` (scheduler, model views,
checkpoints), `streams` (one stream's state), `reader` (server-read sources), `frames` (the frame
codec), `events`, `store` (saved streams), `offload` (the server's offload folder); `backend` (the
engine's async face), `guard` (origin, token, body size), `routes` (the HTTP and websocket
handlers), `app` (the FastAPI app), `ray_backend` (Ray Serve replicas), `server` (settings,
running), `load` (load generator); the command is `streamtc.cli.serve`. The web page is plain
HTML/JS in `static/`. FastAPI and uvicorn come with the `serve` extra; this package imports them
only where used.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .engine import Engine
    from .server import ServerSettings, ServerThread
    from .settings import ServeLimits, ServeMemory, SourcePolicy, StreamSpec

# name -> module it is imported from when first used: the engine imports torch, which
# `streamtc serve --help` and the argument checks must not wait for
_LAZY = {"Engine": "engine", "ServerSettings": "server", "ServerThread": "server", "ServeLimits": "settings",
         "ServeMemory": "settings", "SourcePolicy": "settings", "StreamSpec": "settings"}


__getattr__ = lazy_names(__name__, _LAZY)


__all__ = ["Engine", "ServeLimits", "ServeMemory", "ServerSettings", "ServerThread", "SourcePolicy", "StreamSpec"]
