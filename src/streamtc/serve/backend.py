"""The async face of an `Engine`, which the HTTP front (and each Ray Serve replica) awaits.

`LocalBackend` turns the engine's futures into awaitables, decodes uploads off the event loop, and
wakes event subscribers: the engine's listener (called on the model or a reader thread) hands a
tick to the event loop, and every waiter re-reads its stream's events after a tick.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from ..factory import SessionSpec
from ..session import StreamingSession
from .engine import Engine
from .frames import decode_frame, encode_jpeg
from .settings import StreamSpec


def resident_memory_bytes() -> int:
    """The process's resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class TextDeltas:
    """Token ids to text deltas that add up to the decoded answer (`StreamingSession.ask`'s text:
    special tokens skipped, stripped): whitespace at the end and an incomplete UTF-8 character wait
    for the next token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def add(self, token: int) -> str:
        """The text token `token` adds (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        return self._advance(text.rstrip("\ufffd"))

    def finish(self, text: str) -> str:
        """What is left of the answer's final `text`."""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding more tokens changed earlier text: send nothing more early
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


class LocalBackend:
    """An `Engine` in this process. Create it inside the running event loop (`start`)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self._loop = asyncio.get_running_loop()
        self._tick: asyncio.Future = self._loop.create_future()
        engine.listener = self._on_event

    @classmethod
    async def start(cls, session_factory: Any, model_name: str, **engine_kwargs: Any) -> LocalBackend:
        """Load the model (off the event loop) and start an engine on it."""
        base: StreamingSession = await asyncio.to_thread(session_factory)
        return cls(Engine(base, **engine_kwargs), model_name)

    def _on_event(self, stream_id: str, event: dict[str, Any]) -> None:
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        tick, self._tick = self._tick, self._loop.create_future()
        tick.set_result(None)

    async def info(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "model": self.model_name, "replicas": 1, "streams": len(engine.list()),
            "default_stc": None if engine.default_stc is None else engine.default_stc.to_dict(),
            "limits": engine.limits.__dict__, "rss_bytes": resident_memory_bytes(),
            "allow_schemes": sorted(engine.sources.allow_schemes),
            "allow_dirs": [str(d) for d in engine.sources.allow_dirs],
        }

    async def create(self, spec: StreamSpec) -> dict[str, Any]:
        return await asyncio.wrap_future(self.engine.create_stream(spec))

    async def push(self, stream_id: str, data: bytes, *, width: int | None = None, height: int | None = None,
                   timestamp: float | None = None) -> dict[str, Any]:
        self.engine.describe(stream_id)  # 404 before decoding
        image = await asyncio.to_thread(decode_frame, data, self.engine.limits, width=width, height=height)
        return self.engine.push_frame(stream_id, image, timestamp)

    async def ask(self, stream_id: str, question: str, options: list[str] | None = None, *, max_new_tokens: int | None = None,
                  sync: bool = False, top_logprobs: int | None = None) -> dict[str, Any]:
        future = self.engine.ask(stream_id, question, options, max_new_tokens=max_new_tokens, sync=sync,
                                 top_logprobs=top_logprobs)
        return await asyncio.wrap_future(future)  # cancelled with the request: the engine skips it

    async def ask_stream(self, stream_id: str, question: str, *, max_new_tokens: int | None = None
                         ) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
        """The answer as it is generated: (text delta, None) per token that adds text, then ("", the
        answer's dict). The deltas add up to the answer's text."""
        tokens: asyncio.Queue = asyncio.Queue()

        def hand_over(token: int | None) -> None:  # on the model worker
            self._loop.call_soon_threadsafe(tokens.put_nowait, token)

        future = self.engine.ask(stream_id, question, max_new_tokens=max_new_tokens, on_token=hand_over)
        future.add_done_callback(lambda _: hand_over(None))
        text = TextDeltas(self.engine.base.tokenizer)
        while (token := await tokens.get()) is not None:
            if delta := text.add(token):
                yield delta, None
        answer = await asyncio.wrap_future(future)
        yield text.finish(answer["text"]), answer

    async def list(self) -> list[dict[str, Any]]:
        return self.engine.list()

    async def describe(self, stream_id: str) -> dict[str, Any]:
        return self.engine.describe(stream_id)

    async def delete(self, stream_id: str) -> None:
        await asyncio.to_thread(self.engine.delete, stream_id)

    async def events(self, stream_id: str, after: int, timeout: float = 15.0) -> tuple[list[dict[str, Any]], int]:
        """Events of a stream numbered above `after`, waiting up to `timeout` s for the first one."""
        deadline = self._loop.time() + timeout
        while True:
            tick = self._tick  # taken before reading, so an event in between still wakes us
            events, last = self.engine.events_after(stream_id, after)
            remaining = deadline - self._loop.time()
            if events or remaining <= 0:
                return events, last
            try:
                await asyncio.wait_for(asyncio.shield(tick), remaining)
            except TimeoutError:
                pass

    async def frame_jpeg(self, stream_id: str) -> bytes | None:
        image = self.engine.latest_frame(stream_id)
        return None if image is None else await asyncio.to_thread(encode_jpeg, image)

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.close)


def load_base_session(settings: Any) -> StreamingSession:
    """The loaded model of `settings` (a `ServerSettings`), as a session without STC (the engine
    adds STC per stream)."""
    spec = SessionSpec(model=settings.model, preset=settings.preset, num_layers=settings.num_layers,
                       text_layers=settings.text_layers)
    return spec.load(settings.device)


async def open_local_backend(settings: Any, id_prefix: str = "") -> LocalBackend:
    """Load the model of `settings` (a `ServerSettings`) and start an engine on it, in this process,
    resuming the streams saved in `settings.persist_dir`."""
    backend = await LocalBackend.start(
        lambda: load_base_session(settings), settings.model_name, default_stc=settings.default_stc,
        limits=settings.limits, sources=settings.sources, memory=settings.memory, threads=settings.threads,
        id_prefix=id_prefix, persist_dir=settings.persist_dir, checkpoint_every=settings.checkpoint_interval,
    )
    backend.engine.resume()
    return backend


__all__ = ["LocalBackend", "TextDeltas", "load_base_session", "open_local_backend", "resident_memory_bytes"]
