"""Server settings, the app they build, and running it (in the foreground, or on a background thread
for tests and the load tool)."""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import positive_int
from ..config import STCConfig
from ..errors import ConfigError
from .settings import RAY_START_TIMEOUT, ServeLimits, ServeMemory, SourcePolicy, origin_of

LOOPBACK_NAMES = {"localhost"}
DEFAULT_CHECKPOINT_EVERY = 30.0  # seconds between a changed stream's checkpoints, with a persist dir


def display_url(host: str, port: int) -> str:
    """The server's address as a browser takes it (an IPv6 host in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def is_loopback(host: str) -> bool:
    """Whether binding `host` only accepts connections from this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_access(host: str, token: str | None) -> None:
    """ConfigError unless the token is sound and a bind address other than loopback has one (the
    command checks this first, before anything heavy is imported)."""
    if token is not None and (len(token) < 8 or token != token.strip()):
        raise ConfigError("--token must be at least 8 characters, with no space at either end")
    if not is_loopback(host) and not token:
        raise ConfigError(f"binding {host} exposes the server to the network: give --token TOKEN "
                          "(bearer auth on every endpoint), or bind 127.0.0.1")


@dataclass(frozen=True)
class ServerSettings:
    """Everything `streamtc serve` is configured with (the CLI builds exactly this).

    model: real weights (path or hub id) or None for `preset` (random weights). default_stc: the
    STC settings of streams that do not choose their own (None: no STC). memory: the streams' LLM
    memory (`ServeMemory`: the default kind and window, and where retrieval offloads). token: bearer token,
    required by `check` for a bind address other than loopback. threads: torch threads of the
    model worker. replicas: None runs in this process; N > 0 runs N Ray Serve replicas
    (ray_address: an existing cluster, else a local one on 127.0.0.1; replica_cpus: CPUs Ray
    reserves per replica). persist_dir: save every stream there at shutdown and resume the saved
    streams at start (in-process serving only).
    """

    model: str | None = None
    preset: str = "tiny-llava-ov"
    num_layers: int | None = None
    text_layers: int | None = None
    device: str = "cpu"
    default_stc: STCConfig | None = field(default_factory=STCConfig)
    limits: ServeLimits = field(default_factory=ServeLimits)
    memory: ServeMemory = field(default_factory=ServeMemory)
    sources: SourcePolicy = field(default_factory=SourcePolicy)
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    threads: int | None = None
    replicas: int | None = None
    ray_address: str | None = None
    replica_cpus: float = 1.0
    persist_dir: Path | None = None
    checkpoint_every: float | None = None
    allow_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_access(self.host, self.token)
        for origin in self.allow_origins:
            if origin_of(origin) is None:
                raise ConfigError(f"--allow-origin {origin!r} is not an origin; give scheme://host[:port], "
                                  "e.g. http://127.0.0.1:9000")
        positive_int(self.replicas, "replicas", optional=True)
        if self.persist_dir is not None and self.replicas is not None:
            raise ConfigError("--persist-dir saves streams of an in-process server; it does not apply with --ray")
        if self.checkpoint_every is not None and (
                isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, (int, float))
                or not math.isfinite(self.checkpoint_every) or self.checkpoint_every < 0):
            raise ConfigError(f"--checkpoint-every must be a number of seconds >= 0, got {self.checkpoint_every!r}")
        if self.checkpoint_every and self.persist_dir is None:
            raise ConfigError("--checkpoint-every saves streams into --persist-dir; give --persist-dir DIR too")

    @property
    def checkpoint_interval(self) -> float | None:
        """Seconds between a changed stream's checkpoints, None when there are none."""
        if self.persist_dir is None or self.checkpoint_every == 0:
            return None
        return DEFAULT_CHECKPOINT_EVERY if self.checkpoint_every is None else float(self.checkpoint_every)

    @property
    def model_name(self) -> str:
        return self.model or self.preset


def make_app(settings: ServerSettings) -> Any:
    """The FastAPI app for `settings` (the model loads when the app starts)."""
    from .app import build_app

    if settings.replicas is None:
        async def opener() -> Any:
            from .backend import open_local_backend

            return await open_local_backend(settings)
    else:
        async def opener() -> Any:
            from .ray_backend import RayBackend

            return await RayBackend.start(settings, settings.model_name)
    return build_app(opener, token=settings.token, limits=settings.limits, allow_origins=settings.allow_origins)


def _uvicorn_config(app: Any, settings: ServerSettings, **kwargs: Any) -> Any:
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, ws_max_size=settings.limits.max_upload_bytes
                          + 64 * 1024, timeout_graceful_shutdown=5, log_level="warning", **kwargs)


def run(settings: ServerSettings) -> None:
    """Serve in the foreground until interrupted; shutdown closes every stream."""
    import uvicorn

    uvicorn.Server(_uvicorn_config(make_app(settings), settings)).run()


class ServerThread:
    """A server on a background thread, on a free port of 127.0.0.1 (or `settings.host`).

        with ServerThread(ServerSettings()) as server:
            httpx.get(server.url + "/v1/info")
    """

    def __init__(self, settings: ServerSettings, app: Any = None) -> None:
        import uvicorn

        self.settings = settings
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((settings.host, 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{settings.host}:{self.port}"
        self.server = uvicorn.Server(_uvicorn_config(app or make_app(settings), settings))
        self._thread = threading.Thread(target=self._serve, daemon=True, name="streamtc-serve")

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self._socket])
        finally:
            self._socket.close()

    def start(self, timeout: float = RAY_START_TIMEOUT + 60) -> ServerThread:
        """Serve, and wait until the app has started (its model loaded). A start that fails or takes
        over `timeout` s raises and stops the server. The default outlasts a Ray start's own limit,
        so a slow Ray start reports its own error."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server failed to start; see the log above")
            if time.monotonic() > deadline:
                self.server.should_exit = True  # it stops once its start ends
                raise TimeoutError(f"the server did not start within {timeout:g} s")
            self._thread.join(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread.ident is None:  # never started
            self._socket.close()
        self._thread.join(timeout=60)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["ServerSettings", "check_access", "ServerThread", "display_url", "is_loopback", "make_app", "run"]
