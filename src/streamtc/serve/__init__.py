"""`streamtc serve`: several live streams on one loaded model, over HTTP/websockets, with a web page.

Layers: `engine` (model side: sessions, scheduler, sources, limits; no web code), `backend` (its
async face), `app` (FastAPI endpoints, auth), `ray_backend` (Ray Serve replicas), `server`
(settings, running), `load` (load generator); the command is `streamtc.cli.serve`. The web page is plain
HTML/JS in `static/`. FastAPI and uvicorn come with the `serve` extra; this package imports them
only where used.
"""

from .engine import Engine, ServeLimits, ServeMemory, SourcePolicy, StreamSpec
from .server import ServerSettings, ServerThread

__all__ = ["Engine", "ServeLimits", "ServeMemory", "ServerSettings", "ServerThread", "SourcePolicy", "StreamSpec"]
