"""`StreamingWindowCache`: StreamingVLM's bounded memory for streams of per-chunk turns.

StreamingVLM (Qwen2.5-VL fine-tuned for endless video) feeds the video in 1-s chunks, each its own
chat turn, on one KV cache, and bounds that cache: the text prefix stays as an attention sink, the
vision tokens of the last `vision_chunks` chunks (16) and the text of the last `text_rounds` rounds
(16) stay, everything older leaves the cache. Its default position mode, "shrink", re-indexes the
survivors so that their positions are contiguous, i.e. exactly what a one-shot prompt holding only
the surviving tokens would give them; "append" keeps every token at the position it was pre-filled
at while the stream's counter runs on.

Here a round is one chunk turn of the per-chunk-turn protocol of the Qwen-VL hosts ("livecc":
"<|im_start|>user Time=t0-t1s" + the chunk's video + "<|im_end|>"); its text is the turn's opening
and closing text (the session marks them on each `CacheBlock` as text_head / text_tail), its vision
the chunk's kept visual tokens. With the defaults (vision_chunks == text_rounds) whole turns leave
together. StreamingVLM also folds older assistant commentary into a bounded "previous text" block
(a 512-token head and tail); a question-answering stream keeps no answers in its cache (each
question is removed after its answer), so there is none here.

Positions. `positions="keep"` leaves every surviving token where it was pre-filled: relative
distances stay those of the original stream, but positions grow without bound (about 30 per second
of LiveCC video: Qwen2-VL's 32,768 trained positions are used up in under 20 minutes), so an
endless stream on a Qwen-VL host needs `"shrink"` (the default, as StreamingVLM): positions stay
within the prefix plus the window.

Shrink without re-encoding. Keys are cached already rotated by their position's RoPE. When a span
of positions leaves, every later token must move down by the number of freed positions, and the
session's position counter with it (`on_append` returns that number). Rotations compose:
R(p - d) = R(-d) R(p), so a cached key is re-rotated in place by -d. For M-RoPE (Qwen2-VL,
Qwen2.5-VL) a token's (t, h, w) rows select the position of each frequency band (the 3
`mrope_section` sections); in a per-chunk-turn stream everything after a freed span moves by the
same d in all three rows (a video's rows are its start plus (t, h, w) offsets, and text rows are
equal), so every band rotates by d times its frequency: the plain RoPE rotation by d over the whole
head dim, whatever the sections. Values carry no position and are only moved. The re-rotation is
computed in float64 and rounded once to the cache dtype; a one-layer model's logits equal a
one-shot forward of the surviving tokens at their new positions to float32 rounding
(tests/test_streaming_window.py). In deeper layers survivors keep what they attended to when they
were pre-filled (the evicted context), in "keep" and "shrink" alike, as in StreamingVLM.

StreamingVLM evicts before each new chunk's pre-fill; this policy evicts right after it (the
`CachePolicy` hook), so a new chunk sees one round more than in StreamingVLM while it is
pre-filled, and a question sees the same window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from ..errors import ConfigError, StreamStateError
from .policies import CacheBlock, FullCache


@dataclass
class _Turn:
    """One chunk turn in the cache. start: position of its first position slot (current
    coordinates); vision_span: positions its video occupies (known once the next turn opens)."""

    number: int
    start: int
    head: int
    vision: int = 0
    tail: int = 0
    closed: bool = False
    text_kept: bool = True
    vision_kept: bool = True
    vision_span: int | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class StreamingWindowCache(FullCache):
    """StreamingVLM's memory (see the module docstring): the chat prefix, the vision of the last
    `vision_chunks` chunk turns and the text of the last `text_rounds`, positions re-indexed
    ("shrink", StreamingVLM's default) or kept. Needs the per-chunk-turn protocol
    (`protocol="livecc"`). Use: `StreamingSession(..., protocol="livecc", cache_policy=StreamingWindowCache)`.
    """

    def __init__(self, vision_chunks: int = 16, text_rounds: int = 16,
                 positions: Literal["shrink", "keep"] = "shrink") -> None:
        for name, value in (("vision_chunks", vision_chunks), ("text_rounds", text_rounds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if positions not in ("shrink", "keep"):
            raise ConfigError(f"positions must be 'shrink' (re-index contiguously) or 'keep', got {positions!r}")
        self.vision_chunks, self.text_rounds, self.positions = vision_chunks, text_rounds, positions
        self._prefix = 0
        self._turns: list[_Turn] = []
        self._next_turn = 0
        self._inv_freq: torch.Tensor | None = None

    def new_cache(self, config: PretrainedConfig) -> Cache:
        self._prefix, self._turns, self._next_turn = 0, [], 0
        self._inv_freq = self._rope_frequencies(config) if self.positions == "shrink" else None
        return super().new_cache(config)

    @staticmethod
    def _rope_frequencies(config: PretrainedConfig) -> torch.Tensor:
        """The LLM's RoPE inverse frequencies [head_dim / 2] (float64), as the model computes them."""
        text = config.get_text_config(decoder=True)
        rope = getattr(text, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"positions='shrink' re-rotates keys with plain RoPE; this model uses "
                              f"{rope.get('rope_type')!r} scaling: use positions='keep'")
        dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    @property
    def visual_tokens(self) -> int:
        """Visual tokens in the cache now."""
        return sum(turn.vision for turn in self._turns if turn.vision_kept)

    def settings(self) -> dict[str, Any]:
        return {"vision_chunks": self.vision_chunks, "text_rounds": self.text_rounds, "positions": self.positions}

    def bookkeeping(self) -> dict[str, Any]:
        return {"prefix": self._prefix, "next_turn": self._next_turn, "turns": [asdict(t) for t in self._turns]}

    def load_bookkeeping(self, state: dict[str, Any]) -> None:
        self._prefix, self._next_turn = int(state["prefix"]), int(state["next_turn"])
        self._turns = [_Turn(**turn) for turn in state["turns"]]

    def on_append(self, cache: Cache, blocks: Sequence[CacheBlock]) -> int:
        for block in blocks:
            self._record(block)
        return self._evict(cache)

    def _record(self, block: CacheBlock) -> None:
        """Fold one pre-filled block into the turn list."""
        if block.kind == "prompt":
            self._prefix += block.length
            return
        if block.text_head:  # a turn opens
            if self._turns and not self._turns[-1].closed:
                raise StreamStateError("a chunk turn opened before the previous one closed")
            if self._turns:
                last = self._turns[-1]
                last.vision_span = block.position - last.start - last.head - last.tail
            self._turns.append(_Turn(self._next_turn, block.position, block.text_head))
            self._next_turn += 1
        elif not self._turns or self._turns[-1].closed:
            raise StreamStateError("StreamingWindowCache needs a stream of per-chunk turns (a Qwen-VL host with "
                                   "protocol='livecc'); this stream appends frames without turns")
        turn = self._turns[-1]
        turn.vision += block.length - block.text_head - block.text_tail
        turn.tail += block.text_tail
        turn.closed = block.text_tail > 0

    def _evict(self, cache: Cache) -> int:
        """Drop what fell out of the window; in "shrink" mode move later positions down (keys
        re-rotated). Returns the positions freed in shrink mode (0 otherwise)."""
        newest = self._turns[-1].number if self._turns else 0
        shrink = self.positions == "shrink"
        keep: list[torch.Tensor] = [torch.arange(self._prefix)]  # cache indices kept, in order
        shifts: list[torch.Tensor] = [torch.zeros(self._prefix, dtype=torch.long)]  # positions each moves down
        offset, freed, dropped = self._prefix, 0, False
        for turn in self._turns:
            age = newest - turn.number
            if shrink:
                turn.start -= freed
            parts = (("head", turn.head, turn.text_kept, age < self.text_rounds, turn.head),
                     ("vision", turn.vision, turn.vision_kept, age < self.vision_chunks, turn.vision_span),
                     ("tail", turn.tail, turn.text_kept, age < self.text_rounds, turn.tail))
            for name, tokens, held, wanted, span in parts:
                if not held:
                    continue
                if wanted:
                    keep.append(torch.arange(offset, offset + tokens))
                    shifts.append(torch.full((tokens,), freed, dtype=torch.long))
                else:
                    dropped = True
                    freed += span
                offset += tokens
            if age >= self.text_rounds and turn.text_kept:
                turn.text_kept = False
                turn.head = turn.tail = 0
            if age >= self.vision_chunks and turn.vision_kept:
                turn.vision_kept, turn.vision, turn.vision_span = False, 0, 0
        self._turns = [t for t in self._turns if t.text_kept or t.vision_kept]
        if not dropped:
            return 0
        index, shift = torch.cat(keep), torch.cat(shifts)
        moved = torch.nonzero(shift).flatten()  # a suffix of the kept tokens: everything after the first gap
        first = int(moved[0]) if shrink and len(moved) else None
        for layer in cache.layers:
            rows = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, rows)
            layer.values = layer.values.index_select(-2, rows)
            if first is not None:
                layer.keys[..., first:, :] = self._rerotate(layer.keys[..., first:, :], shift[first:])
        return freed if shrink else 0

    def _rerotate(self, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Keys [B, H, n, D] rotated by -shift[n] positions (RoPE rotations compose)."""
        angles = -shift.to(torch.float64)[:, None] * self._inv_freq[None, :]  # [n, D/2]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(keys.device), angles.sin().to(keys.device)
        wide = keys.to(torch.float64)
        return (wide * cos + _rotate_half(wide) * sin).to(keys.dtype)


__all__ = ["StreamingWindowCache"]
