"""Scale-out for `streamtc serve --ray --replicas N`: N Ray Serve replicas, each holding the model and
an `Engine`, behind the same HTTP front.

A stream's state (KV cache, STC references) lives in one replica's memory, so every request of a
stream must reach that replica. Ray Serve routes a deployment's requests to any of its replicas and
offers no way to address one, so each replica is its own one-replica deployment
(`streamtc-replica-0` ... `-{N-1}`), all from the same `StreamReplica` class; the front pins a
stream to its replica by the replica number in the stream id (`r1-3fa2-...`) and spreads new
streams round robin. A replica that fails makes requests for its streams answer 503 naming the
replica: while it is down, and after Ray Serve restarted it empty (the id's incarnation tag no
longer matches); the other replicas' streams carry on.

Replica methods return envelopes, ("ok", value) or ("error", status, message), so the front
reports a replica's typed errors with their own status and message, not as a Ray traceback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import ExitStack, suppress
from typing import Any

from ..errors import StreamTCError
from ..ray_cluster import LOCAL, ray_connection
from .backend import LocalBackend, open_local_backend
from .errors import ReplicaUnavailable, ServeError, StreamNotFound, http_status
from .settings import RAY_START_TIMEOUT, StreamSpec

REPLICA_PREFIX = "streamtc-replica-"


class StreamReplica:
    """One replica: a `LocalBackend` on its own copy of the model (wrapped as a Ray Serve
    deployment by `deploy`). `settings` is the server's `ServerSettings`."""

    def __init__(self, settings: Any, index: int) -> None:
        self.settings, self.index = settings, index
        # stream ids carry the replica number (routing) and this incarnation (a restarted replica
        # tells a lost stream from an unknown one)
        self.prefix = f"r{index}-{secrets.token_hex(2)}-"
        self._backend: LocalBackend | None = None
        self._starting = asyncio.Lock()

    async def _local(self) -> LocalBackend:
        async with self._starting:
            if self._backend is None:
                self._backend = await open_local_backend(self.settings, id_prefix=self.prefix)
        return self._backend

    async def call(self, method: str, *args: Any, **kwargs: Any) -> tuple:
        stream_id = args[0] if args and method not in ("create", "info", "list") else None
        if stream_id is not None and not stream_id.startswith(self.prefix):
            return ("error", 503, f"replica {self.index} failed and was restarted; stream {stream_id} was lost with "
                                  "it (other replicas' streams are unaffected)")
        try:
            backend = await self._local()
            return ("ok", await getattr(backend, method)(*args, **kwargs))
        except StreamTCError as error:
            return ("error", http_status(error), str(error))

    async def close(self) -> None:
        if self._backend is not None:
            await self._backend.close()
            self._backend = None


def deploy(settings: Any) -> list[Any]:
    """Deploy the replicas on the connected Ray cluster; returns their handles."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    deployment = serve.deployment(StreamReplica, max_ongoing_requests=256,
                                  ray_actor_options={"num_cpus": settings.replica_cpus})
    handles = []
    for index in range(settings.replicas):
        name = f"{REPLICA_PREFIX}{index}"
        app = deployment.options(name=name).bind(settings, index)
        handles.append(serve.run(app, name=name, route_prefix=None))
    return handles


class RayBackend:
    """The front's view of the replicas: the `LocalBackend` interface, routed by stream id."""

    def __init__(self, handles: list[Any], model_name: str) -> None:
        self.handles, self.model_name = handles, model_name
        self._next = itertools.cycle(range(len(handles)))
        self._closing = threading.Event()
        self._closed: concurrent.futures.Future = concurrent.futures.Future()

    @classmethod
    async def start(cls, settings: Any, model_name: str, timeout: float = RAY_START_TIMEOUT) -> RayBackend:
        """Connect to Ray (`settings.ray_address`, else a local cluster on 127.0.0.1), deploy the
        replicas and load their models, all within `timeout` s.

        One daemon thread holds Ray from start to shutdown: the processes of a local cluster die
        with the thread that started them, a Ray start can block for ever (a process it starts
        may never run), and a daemon thread cannot keep the process from exiting."""
        started: concurrent.futures.Future = concurrent.futures.Future()
        threading.Thread(target=cls._hold_ray, args=(settings, model_name, started), daemon=True,
                         name="streamtc-ray").start()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(started), timeout)
        except TimeoutError:
            raise ServeError(f"Ray did not bring up {settings.replicas} replica(s) within {timeout:g} s; Ray's "
                             "logs are in its session folder (e.g. /tmp/ray/session_latest/logs)") from None

    @classmethod
    def _hold_ray(cls, settings: Any, model_name: str, started: concurrent.futures.Future) -> None:
        """The thread that holds Ray: brings it up, waits until the backend closes (at once when
        the start was given up), then removes the deployments and disconnects."""
        connection = ExitStack()
        try:
            backend = cls._bring_up(settings, model_name, connection)
        except BaseException as error:
            connection.close()
            with suppress(concurrent.futures.InvalidStateError):  # the start was given up
                started.set_exception(error)
            return
        try:
            started.set_result(backend)
        except concurrent.futures.InvalidStateError:  # it came up after the start was given up
            backend._closing.set()
        backend._closing.wait()
        try:
            with connection:
                backend._shutdown()
        except BaseException as error:
            backend._closed.set_exception(error)
        else:
            backend._closed.set_result(None)

    @classmethod
    def _bring_up(cls, settings: Any, model_name: str, connection: ExitStack) -> RayBackend:
        connection.enter_context(ray_connection(settings.ray_address or LOCAL))
        backend = cls(deploy(settings), model_name)
        for handle in backend.handles:  # each replica loads its model now
            handle.call.remote("info").result()
        return backend

    async def _call(self, index: int, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            envelope = await self.handles[index].call.remote(method, *args, **kwargs)
        except Exception as error:  # the replica's process died or Ray lost it
            raise ReplicaUnavailable(f"replica {index} failed ({type(error).__name__}); the streams it held are "
                                     "lost, other replicas' streams are unaffected") from None
        if envelope[0] == "error":
            error = ServeError(envelope[2])
            error.status = envelope[1]
            raise error
        return envelope[1]

    def _replica(self, stream_id: str) -> int:
        head, _, _ = stream_id.partition("-")
        if head.startswith("r") and head[1:].isdigit() and int(head[1:]) < len(self.handles):
            return int(head[1:])
        raise StreamNotFound(f"no stream {stream_id!r}; GET /v1/streams lists the open ones")

    async def info(self) -> dict[str, Any]:
        infos = await asyncio.gather(*(self._call(i, "info") for i in range(len(self.handles))),
                                     return_exceptions=True)
        first = next((i for i in infos if isinstance(i, dict)), {})
        return {**first, "model": self.model_name, "replicas": len(self.handles),
                "streams": sum(i["streams"] for i in infos if isinstance(i, dict)),
                "rss_bytes": sum(i["rss_bytes"] for i in infos if isinstance(i, dict)),
                "replica_errors": [str(i) for i in infos if isinstance(i, Exception)]}

    async def create(self, spec: StreamSpec) -> dict[str, Any]:
        index = next(self._next)
        return {**await self._call(index, "create", spec), "replica": index}

    async def push(self, stream_id: str, data: bytes, **kwargs: Any) -> dict[str, Any]:
        return await self._call(self._replica(stream_id), "push", stream_id, data, **kwargs)

    async def ask(self, stream_id: str, question: str, options: list[str] | None = None, **kwargs: Any) -> dict:
        return await self._call(self._replica(stream_id), "ask", stream_id, question, options, **kwargs)

    async def ask_stream(self, stream_id: str, question: str, **kwargs: Any
                         ) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
        """The answer in one delta: a replica's tokens do not stream back through Ray Serve calls."""
        answer = await self.ask(stream_id, question, **kwargs)
        yield answer["text"], answer

    async def list(self) -> list[dict[str, Any]]:
        lists = await asyncio.gather(*(self._call(i, "list") for i in range(len(self.handles))),
                                     return_exceptions=True)
        return [{**s, "replica": i} for i, streams in enumerate(lists) if isinstance(streams, list) for s in streams]

    async def describe(self, stream_id: str) -> dict[str, Any]:
        index = self._replica(stream_id)
        return {**await self._call(index, "describe", stream_id), "replica": index}

    async def delete(self, stream_id: str) -> None:
        await self._call(self._replica(stream_id), "delete", stream_id)

    async def events(self, stream_id: str, after: int, timeout: float = 15.0) -> tuple[list[dict[str, Any]], int]:
        return tuple(await self._call(self._replica(stream_id), "events", stream_id, after, timeout))

    async def frame_jpeg(self, stream_id: str) -> bytes | None:
        return await self._call(self._replica(stream_id), "frame_jpeg", stream_id)

    async def close(self) -> None:
        """Close every replica's streams, then remove the deployments and disconnect (a local
        cluster stops)."""
        await asyncio.gather(*(h.close.remote() for h in self.handles), return_exceptions=True)
        self._closing.set()
        await asyncio.wait_for(asyncio.wrap_future(self._closed), RAY_START_TIMEOUT)

    def _shutdown(self) -> None:
        from ray import serve

        serve.shutdown()


__all__ = ["RayBackend", "StreamReplica", "deploy"]
