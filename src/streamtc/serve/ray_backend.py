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
import itertools
import secrets
from collections.abc import AsyncIterator
from typing import Any

from ..errors import StreamTCError
from .backend import LocalBackend, open_local_backend
from .errors import ReplicaUnavailable, ServeError, StreamNotFound, http_status
from .settings import StreamSpec

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
    """Start (or join) Ray, bound to 127.0.0.1 unless `settings.ray_address` names a cluster, and
    deploy the replicas; returns their handles."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if settings.ray_address:
            ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
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

    def __init__(self, handles: list[Any], model_name: str, owns_ray: bool = False) -> None:
        self.handles, self.model_name, self.owns_ray = handles, model_name, owns_ray
        self._next = itertools.cycle(range(len(handles)))

    @classmethod
    async def start(cls, settings: Any, model_name: str) -> RayBackend:
        import ray

        owns_ray = not ray.is_initialized()
        handles = await asyncio.to_thread(deploy, settings)
        backend = cls(handles, model_name, owns_ray)
        await asyncio.gather(*(backend._call(i, "info") for i in range(len(handles))))  # load the models now
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
        """Close every replica's streams, then remove the deployments."""
        from ray import serve

        import ray

        await asyncio.gather(*(h.close.remote() for h in self.handles), return_exceptions=True)
        await asyncio.to_thread(serve.shutdown)
        if self.owns_ray:
            await asyncio.to_thread(ray.shutdown)


__all__ = ["RayBackend", "StreamReplica", "deploy"]
