"""The JSON bodies the HTTP API takes (pydantic models: unknown fields refused where a typo would
silently change a setting)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import STCConfig
from ..errors import InputError
from .settings import StreamSpec


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


def chat_question(messages: list[ChatMessage]) -> str:
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


__all__ = ["AskRequest", "ChatMessage", "ChatRequest", "StreamRequest", "chat_question"]
