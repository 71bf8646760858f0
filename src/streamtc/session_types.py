"""What a `StreamingSession` reports: an `Answer` per question, `SessionStats` for the stream."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Answer:
    """One answered question.

    text: the decoded answer (special tokens removed). letter: the parsed option letter when the
    question had options (None if the text names none). token_ids: generated ids, stop token
    excluded. prefill_ms: pre-fill of the newline and question; ttft_ms: from the start of `ask`
    (question tokenisation included) to the first token; decode_ms_per_token: each further token
    (0 with one token).
    """

    question: str
    text: str
    letter: str | None
    token_ids: list[int]
    prompt_tokens: int
    frames: int
    timestamp: float | None
    prefill_ms: float
    ttft_ms: float
    decode_ms_per_token: float
    total_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SessionStats:
    """Counters of the current stream (since the last reset).

    vit_ms: vision encoding (ViT + projector + pooling, with the Cacher when enabled);
    prune_ms: the Pruner (or the selector replacing it); prefill_ms: pre-fill of the visual
    tokens. visual_tokens: visual tokens pre-filled (a bounded cache policy may have evicted some
    since; cache_tokens and kv_cache_bytes are what is held); pending_tokens: kept tokens waiting for
    their pre-fill; visual_tokens_encoded: tokens the encoder produced (before pruning).
    prompt_tokens: chat-prompt text pre-filled into the video cache (the prefix, and in the LiveCC
    protocol every chunk's turn text). frames: frames encoded (a frame waiting for its pair is not).
    cache_tokens: tokens in the video-only cache now (the chat prefix and the visual tokens the
    cache policy holds). kv_cache_bytes: keys and values held by the cache now. The last_* fields
    are the latest answer's timings. peak_memory_bytes: CUDA max allocated on a GPU, the
    process's peak RSS on CPU (memory_kind says which), since the session started (process-wide:
    another session's start resets it too; see `measure.reset_peak_memory`). memory: the cache
    policy's own counters (`RetrievalCache`: window, offloaded blocks, bytes, retrieval time), or None.
    """

    frames: int = 0
    chunks: int = 0
    visual_tokens: int = 0
    pending_tokens: int = 0
    visual_tokens_encoded: int = 0
    prompt_tokens: int = 0
    vit_ms: float = 0.0
    prune_ms: float = 0.0
    prefill_ms: float = 0.0
    questions: int = 0
    last_prefill_ms: float | None = None
    last_ttft_ms: float | None = None
    last_decode_ms_per_token: float | None = None
    peak_memory_bytes: int = 0
    kv_cache_bytes: int = 0
    cache_tokens: int = 0
    memory_kind: Literal["rss", "cuda"] = "rss"
    cacher: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None

    @property
    def vit_ms_per_frame(self) -> float:
        return self.vit_ms / self.frames if self.frames else 0.0

    @property
    def prefill_ms_per_frame(self) -> float:
        return self.prefill_ms / self.frames if self.frames else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "vit_ms_per_frame": self.vit_ms_per_frame,
            "prefill_ms_per_frame": self.prefill_ms_per_frame,
        }


__all__ = ["Answer", "SessionStats"]
