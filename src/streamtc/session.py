"""`StreamingSession`: watch a video stream with LLaVA-OneVision and answer questions at any moment.

    session = StreamingSession.from_preset("tiny-llava-ov", stc=STCConfig())   # or from_pretrained(path)
    session.push(frames, timestamps)          # uint8 [F, H, W, 3] numpy/torch, or a list of PIL images
    answer = session.ask("What is the man holding?")
    answer = session.ask("What is he holding?", options=["a cup", "a phone"])   # answer.letter
    session.reset(); session.stats

Per stream (SPEC §4): reset state -> pre-fill the chat prompt up to the video -> for each pushed
chunk: ViT (+ STC-Cacher) -> projector -> pooling -> STC-Pruner -> pre-fill of the kept tokens into
a transformers `DynamicCache`; a question is pre-filled on top, answered greedily, and removed.

Sequence layout. LLaVA-OneVision's processor expands the `<video>` placeholder of its chat prompt
into every frame's pooled tokens followed by one `image_newline` token, so the one-shot sequence is

    [prefix of the chat prompt] [frame 1 tokens] ... [frame F tokens] [newline] [rest of the prompt]

The session builds exactly that sequence incrementally: the prefix (system turn and
`<|im_start|>user `) is pre-filled at reset, each frame's tokens are appended as they arrive, and
at question time the newline is appended *virtually*, just before the question's tokens, since in
a stream the "last frame" is whatever arrived last. After the answer the cache is cropped back to
the video-only state (newline, question and answer removed), so the next push continues right after
the last frame. Positions are plain 1-D positions (Qwen2 RoPE) counted by the session, one per
token actually in the sequence: pruned tokens are absent, so the kept tokens of later frames sit on
consecutive positions, as in ReKV + STC. With stc=None the incremental cache therefore reproduces a
one-shot pre-fill of the same frames and question (tests/test_session.py checks the logits).

Cache handling goes through a small `CachePolicy`: it makes the cache, hears about every appended
block (prompt or frame) and scopes each question (`with policy.question(cache)`), restoring the
video-only cache on exit, errors included. `FullCache` keeps everything; a bounded policy (sliding
window with sink tokens, ReKV-style retrieval of frame blocks) evicts in `on_append` and serves a
question a reduced view, without changes to the session. The session counts positions itself, so
positions stay correct when a policy evicts.

Pre-fill batching. The LLM pre-fills more efficiently in larger blocks: its weights are read
once per forward, and small matrix products run below the machine's peak. So kept tokens wait in
a pending buffer until at least `prefill_min_tokens` of them are there (default: one uncompressed
frame's tokens, so the uncompressed baseline still pre-fills every frame as it arrives, and
STC's 59-token frames go in blocks of four); a question, or `flush()`, pre-fills what is pending
first. The cache after a flush equals frame-by-frame pre-fill (causal attention; tested), and a
question waits for at most `prefill_min_tokens` of pending pre-fill. `prefill_min_tokens=1`
pre-fills every chunk at once.

Baselines. `selector=` replaces the STC-Pruner by another token selector with the same
interface (`streamtc.baselines`: uniform, random, VidCom2-style, VisionZip-style), and
`encoder=` replaces the model's video path (ToMe merges tokens inside the ViT, so its tokens
skip the grid pooling: `streamtc.baselines.tome_video_features`).

STC. The Cacher patches the model's vision tower once (`STCCacher.attach`); the Pruner is a plain
object. Both keep per-stream state in state objects the session owns, made active around each use
with their `stream(state)` context managers, so several sessions can share one model and one
cacher (`session.spawn()`) and still never see each other's references or anchors. Each vision
tower forward is one Cacher chunk, one Pruner call and one pre-fill forward: `chunk_frames` frames
(default 1).

Questions are independent: each one sees the system prompt and the video so far, not the earlier
questions and answers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Self

import torch
from transformers import AutoTokenizer, DynamicCache, LlavaOnevisionForConditionalGeneration, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.utils import cached_file

from .bench.timing import peak_memory_bytes, reset_peak_memory, synchronize
from .cacher import STCCacher, attached_cacher
from .config import STCConfig
from .errors import ConfigError, InputError, StreamStateError, UnsupportedModelError
from .preprocess import FrameInput, FramePreprocessor
from .presets import build_model, get_preset, load_pretrained
from .pruner import KeptTokens, LlavaOnevisionVideoLayout, PrunerState, STCPruner, TokenSelector
from .prompts import multiple_choice_question, parse_option_letter, split_video_prompt
from .tokenizer import tokenizer_for_config

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# (model, pixel_values [F, 3, S, S]) -> visual tokens [F, P, D]: a replacement for the video path.
VideoEncoder = Callable[[LlavaOnevisionForConditionalGeneration, torch.Tensor], torch.Tensor]


# -- cache policies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheBlock:
    """A run of tokens appended to the cache in one pre-fill.

    kind: "prompt" (the chat prompt before the video) or "frame" (one frame's kept tokens).
    Frame blocks pending together (see "Pre-fill batching") are pre-filled in one forward.
    start: index of its first token in the cache when appended; length: its token count.
    position: RoPE position of its first token. frame/timestamp: which frame, for frame blocks.
    """

    kind: Literal["prompt", "frame"]
    start: int
    length: int
    position: int
    frame: int | None = None
    timestamp: float | None = None


class CachePolicy(ABC):
    """How one stream's KV cache is made, bounded, and restored after a question.

    One instance per session (it may keep per-stream bookkeeping); `new_cache` starts a stream.
    """

    @abstractmethod
    def new_cache(self, config: PretrainedConfig) -> Cache:
        """A fresh cache for a new stream (and forget the previous stream's bookkeeping)."""

    def on_append(self, cache: Cache, blocks: Sequence[CacheBlock]) -> None:
        """Called after `blocks` (the chat prefix, or pending frames) were pre-filled into
        `cache`, in one forward; bounded policies evict here."""

    @abstractmethod
    def question(self, cache: Cache) -> AbstractContextManager[Cache]:
        """Scope one question: yield the cache it is pre-filled and decoded on; on exit (errors
        included) leave `cache` exactly as it was on entry."""


class FullCache(CachePolicy):
    """Keep every token (the uncompressed baseline's memory; grows with the stream)."""

    def new_cache(self, config: PretrainedConfig) -> Cache:
        return DynamicCache(config=config)

    @contextmanager
    def question(self, cache: Cache) -> Iterator[Cache]:
        length = cache.get_seq_length()
        try:
            yield cache
        finally:
            extra = cache.get_seq_length() - length
            if extra > 0:
                cache.crop(-extra)


class SlidingWindowCache(FullCache):
    """Bound a stream's memory: keep the chat prefix and the newest frames, at most
    `max_visual_tokens` visual tokens (whole frames evicted oldest first; the newest frame is kept
    even when it alone is larger).

    The prefix stays as the attention sink (StreamingLLM); kept keys keep the positions they were
    pre-filled at (they are stored rotated), and the session's position counter runs on, so
    nothing is re-encoded. Frames pre-filled after an eviction attend only to the window, as in
    ReKV's local window. ReKV additionally retrieves evicted frame blocks per question; that
    retrieval is not built here. Use: `StreamingSession(..., cache_policy=lambda: SlidingWindowCache(15_000))`.
    """

    def __init__(self, max_visual_tokens: int) -> None:
        if isinstance(max_visual_tokens, bool) or not isinstance(max_visual_tokens, int) or max_visual_tokens < 1:
            raise ConfigError(f"max_visual_tokens must be an int >= 1, got {max_visual_tokens!r}")
        self.max_visual_tokens = max_visual_tokens
        self._prefix_tokens = 0
        self._frame_tokens: deque[int] = deque()  # token count of each frame in the cache, oldest first
        self.visual_tokens = 0  # visual tokens in the cache now

    def new_cache(self, config: PretrainedConfig) -> Cache:
        self._prefix_tokens, self._frame_tokens, self.visual_tokens = 0, deque(), 0
        return super().new_cache(config)

    def on_append(self, cache: Cache, blocks: Sequence[CacheBlock]) -> None:
        for block in blocks:
            if block.kind == "prompt":
                self._prefix_tokens += block.length
            else:
                self._frame_tokens.append(block.length)
                self.visual_tokens += block.length
        evicted = 0
        while len(self._frame_tokens) > 1 and self.visual_tokens > self.max_visual_tokens:
            oldest = self._frame_tokens.popleft()
            evicted += oldest
            self.visual_tokens -= oldest
        if evicted:
            start, stop = self._prefix_tokens, self._prefix_tokens + evicted
            for layer in cache.layers:
                layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys[..., stop:, :]], dim=-2)
                layer.values = torch.cat([layer.values[..., :start, :], layer.values[..., stop:, :]], dim=-2)


# -- results ----------------------------------------------------------------------------------


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
    since; kv_cache_bytes is what is held); pending_tokens: kept tokens waiting for
    their pre-fill; visual_tokens_encoded: tokens the encoder produced (before pruning).
    kv_cache_bytes: keys and values held by the cache now. The last_* fields
    are the latest answer's timings. peak_memory_bytes: CUDA max allocated on a GPU, the
    process's peak RSS on CPU (memory_kind says which), since the session started (process-wide:
    another session's start resets it too; see `bench.timing.reset_peak_memory`).
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
    memory_kind: Literal["rss", "cuda"] = "rss"
    cacher: dict[str, Any] | None = None

    @property
    def cache_tokens(self) -> int:
        """Tokens pre-filled into the video-only cache: the chat prompt prefix plus the visual tokens."""
        return self.prompt_tokens + self.visual_tokens

    @property
    def vit_ms_per_frame(self) -> float:
        return self.vit_ms / self.frames if self.frames else 0.0

    @property
    def prefill_ms_per_frame(self) -> float:
        return self.prefill_ms / self.frames if self.frames else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "cache_tokens": self.cache_tokens,
            "vit_ms_per_frame": self.vit_ms_per_frame,
            "prefill_ms_per_frame": self.prefill_ms_per_frame,
        }


# -- the session ------------------------------------------------------------------------------


def _load_chat_template(path_or_id: str | Path) -> str | None:
    """The processor's chat template saved with a checkpoint (chat_template.jinja/.json), if any."""
    for name in ("chat_template.jinja", "chat_template.json"):
        resolved = cached_file(
            str(path_or_id), name, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if resolved:
            text = Path(resolved).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


class StreamingSession:
    """One video stream on a `LlavaOnevisionForConditionalGeneration`, optionally with STC.

    model, tokenizer: an eval-mode LLaVA-OneVision model and its tokenizer (with a chat template).
    stc: STCConfig enabling the Cacher and/or Pruner; None is the uncompressed baseline (the
        model's own forwards, untouched).
    preprocessor: frames -> pixel values; default: from the model config (`FramePreprocessor`).
    system_prompt: system turn pre-filled at every reset (None: no system turn).
    chunk_frames: frames per vision-tower forward, i.e. per Cacher chunk and Pruner call.
    prefill_min_tokens: pre-fill kept tokens once at least this many are pending (None: one
        uncompressed frame's tokens; 1: every chunk at once). See "Pre-fill batching".
    cache_policy: factory of the per-session `CachePolicy` (default `FullCache`).
    selector: a token selector in place of the STC-Pruner (a baseline; `prune(features)`,
        `reset()`); not with `stc.pruner`. It serves this session's stream only (no `spawn`).
    encoder: (model, pixel_values [F, 3, S, S]) -> visual tokens [F, P, D] in place of the
        model's video path (a baseline such as ToMe); not with `stc.cacher`.
    """

    def __init__(
        self,
        model: LlavaOnevisionForConditionalGeneration,
        tokenizer: Any,
        stc: STCConfig | None = None,
        *,
        preprocessor: FramePreprocessor | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        chunk_frames: int = 1,
        prefill_min_tokens: int | None = None,
        cache_policy: Callable[[], CachePolicy] = FullCache,
        selector: TokenSelector | None = None,
        encoder: VideoEncoder | None = None,
        _shared_stc: tuple[STCCacher | None, STCPruner | None] | None = None,
    ) -> None:
        if not isinstance(model, LlavaOnevisionForConditionalGeneration):
            raise UnsupportedModelError(
                f"StreamingSession runs LlavaOnevisionForConditionalGeneration, got {type(model).__name__}"
            )
        if stc is not None and not isinstance(stc, STCConfig):
            raise ConfigError(f"stc must be an STCConfig or None, got {type(stc).__name__}")
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ConfigError(f"chunk_frames must be an int >= 1, got {chunk_frames!r}")
        if prefill_min_tokens is not None and (
            isinstance(prefill_min_tokens, bool) or not isinstance(prefill_min_tokens, int) or prefill_min_tokens < 1
        ):
            raise ConfigError(f"prefill_min_tokens must be None or an int >= 1, got {prefill_min_tokens!r}")
        if selector is not None and not isinstance(selector, TokenSelector):
            raise ConfigError(f"selector needs prune(features) and reset(), got {type(selector).__name__}")
        if selector is not None and stc is not None and stc.pruner is not None:
            raise ConfigError("give either stc.pruner or selector, not both (set STCConfig(pruner=None))")
        if encoder is not None and stc is not None and stc.cacher is not None:
            raise ConfigError("a custom encoder replaces the vision path the Cacher patches; set STCConfig(cacher=None)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stc = stc
        self.system_prompt = system_prompt
        self.chunk_frames = chunk_frames
        self.preprocessor = preprocessor or FramePreprocessor.from_model_config(model.config)
        self._cache_policy_factory = cache_policy
        self._device = next(model.parameters()).device
        self._language_model = model.model.language_model
        self._embed = model.get_input_embeddings()
        self._layout = LlavaOnevisionVideoLayout.for_config(model.config)
        self.prefill_min_tokens = prefill_min_tokens or self._layout.tokens_per_frame
        self.selector = selector
        self.encoder = encoder

        prompt = split_video_prompt(tokenizer, "?", system_prompt)
        self._prefix_text = prompt.prefix
        self._prefix_ids = tokenizer(prompt.prefix, add_special_tokens=False)["input_ids"]
        self._stop_ids = self._stop_token_ids()

        if _shared_stc is None and attached_cacher(model) is not None:
            raise StreamStateError(
                "this model's vision tower already has an STCCacher attached (another session?); "
                "share it with that session's spawn(), or close() that session first"
            )
        self._cacher, self._pruner = _shared_stc if _shared_stc is not None else self._build_stc(stc)
        self._owns_cacher = _shared_stc is None and self._cacher is not None
        self._cacher_state = self._cacher.new_state() if self._cacher is not None else None
        self._pruner_state = PrunerState() if self._pruner is not None else None
        reset_peak_memory(self._device)
        self.reset()

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path | None = None,
        stc: STCConfig | None = STCConfig(),
        *,
        preset: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        **session_kwargs: Any,
    ) -> Self:
        """Real weights and their tokenizer/chat template from one path or hub id (or `preset=`).

        The chat template is the processor's (chat_template.jinja/.json beside the weights; the
        tokenizer's own template only when there is none): a text-only LLM template would not place
        the video. Frames are preprocessed as the checkpoint's preprocessor_config.json says.
        """
        if (path_or_id is None) == (preset is None):
            raise ConfigError("give exactly one of path_or_id and preset")
        if preset is not None:
            return cls.from_preset(preset, stc, device=device, dtype=dtype,
                                   attn_implementation=attn_implementation, **session_kwargs)
        model = load_pretrained(path_or_id, dtype=dtype, attn_implementation=attn_implementation).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        tokenizer.chat_template = _load_chat_template(path_or_id) or tokenizer.chat_template
        session_kwargs.setdefault("preprocessor", FramePreprocessor.from_pretrained(path_or_id))
        return cls(model, tokenizer, stc, **session_kwargs)

    @classmethod
    def from_preset(
        cls,
        name: str,
        stc: STCConfig | None = STCConfig(),
        *,
        num_layers: int | None = None,
        text_layers: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        **session_kwargs: Any,
    ) -> Self:
        """A built-in LLaVA-OneVision preset with random weights (answers are meaningless) and the
        built-in tokenizer (`streamtc.tokenizer`). num_layers / text_layers override the vision
        tower's / language model's depth."""
        if get_preset(name).model_class is not LlavaOnevisionForConditionalGeneration:
            raise ConfigError(f"preset {name!r} is not a LLaVA-OneVision model")
        model = build_model(name, num_layers=num_layers, seed=seed, dtype=dtype,
                            attn_implementation=attn_implementation, text_layers=text_layers).to(device)
        return cls(model, tokenizer_for_config(model.config), stc, **session_kwargs)

    def spawn(self) -> StreamingSession:
        """Another session on the same model, tokenizer, Cacher and Pruner, with its own stream
        state (cache, references, anchors, counters). The first session keeps ownership of the
        attached Cacher. Not with a `selector`: baseline selectors keep one stream's state."""
        if self.selector is not None:
            raise StreamStateError("a session with a custom selector cannot spawn; make one session per stream")
        return StreamingSession(
            self.model, self.tokenizer, self.stc, preprocessor=self.preprocessor,
            system_prompt=self.system_prompt, chunk_frames=self.chunk_frames,
            prefill_min_tokens=self.prefill_min_tokens, cache_policy=self._cache_policy_factory,
            encoder=self.encoder, _shared_stc=(self._cacher, self._pruner),
        )

    def _build_stc(self, stc: STCConfig | None) -> tuple[STCCacher | None, STCPruner | None]:
        """Attach an STCCacher to the model and build an STCPruner, as `stc` enables them."""
        if stc is None:
            return None, None
        cacher = STCCacher(stc.cacher).attach(self.model) if stc.cacher is not None else None
        pruner = STCPruner(stc.pruner) if stc.pruner is not None else None
        return cacher, pruner

    def _stop_token_ids(self) -> set[int]:
        """Ids that end an answer: the generation config's eos, the tokenizer's eos and <|im_end|>."""
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return ids

    def close(self) -> None:
        """Detach the Cacher this session attached (the model's forwards are then untouched)."""
        if self._owns_cacher and self._cacher is not None:
            self._cacher.detach()
            self._owns_cacher = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stream ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new stream: empty cache, fresh STC state and counters, chat prefix pre-filled."""
        self._policy = self._cache_policy_factory()
        self._cache = self._policy.new_cache(self.model.config)
        self._next_position = 0
        self._frames = 0
        self._last_timestamp: float | None = None
        self._last_kept: list[list[int]] | None = None
        self._pending: list[tuple[torch.Tensor, CacheBlock]] = []  # kept tokens [n, D] of one frame each
        if self._cacher_state is not None:
            self._cacher_state.reset()
        if self._pruner_state is not None:
            self._pruner_state.reset()
        if self.selector is not None:
            self.selector.reset()
        self._stats = SessionStats(memory_kind="cuda" if self._device.type == "cuda" else "rss")
        with torch.inference_mode():
            ids = torch.tensor([self._prefix_ids], device=self._device)
            self._append(self._embed(ids), [CacheBlock("prompt", 0, len(self._prefix_ids), 0)])
        self._stats.prompt_tokens = len(self._prefix_ids)

    def push(self, frames: FrameInput, timestamps: Sequence[float] | None = None) -> int:
        """Encode `frames` and append their (kept) visual tokens to the stream; returns the tokens
        kept. They are pre-filled into the cache once enough are pending (`prefill_min_tokens`).
        frames: uint8 [F, H, W, 3] numpy/torch or a list of PIL images; timestamps: seconds, one
        per frame (optional)."""
        pixel_values = self.preprocessor(frames)  # [F, 3, S, S]
        count = pixel_values.shape[0]
        if timestamps is not None and len(timestamps) != count:
            raise InputError(f"got {count} frames but {len(timestamps)} timestamps")
        added = 0
        with torch.inference_mode():
            for start in range(0, count, self.chunk_frames):
                chunk = pixel_values[start : start + self.chunk_frames]
                stamps = None if timestamps is None else list(timestamps[start : start + self.chunk_frames])
                added += self._push_chunk(chunk, stamps)
        return added

    def _push_chunk(self, pixel_values: torch.Tensor, timestamps: list[float] | None) -> int:
        """ViT (+Cacher) -> projector -> pooling -> Pruner for one chunk; its kept tokens join the
        pending buffer, pre-filled once it holds `prefill_min_tokens`."""
        stats = self._stats
        start = self._clock()
        features = self._encode(pixel_values)  # [F, P, D]
        stats.vit_ms += self._clock() - start
        frames, per_frame, width = features.shape
        stats.visual_tokens_encoded += frames * per_frame
        start = self._clock()
        kept = self._select(features)
        stats.prune_ms += self._clock() - start
        counts = [per_frame] * frames if kept is None else kept.frame_counts()
        self._last_kept = None if kept is None else [kept.indices[i, :n].tolist() for i, n in enumerate(counts)]
        for i, count in enumerate(counts):
            tokens = features[i] if kept is None else kept.tokens[i, :count]  # real tokens come first
            stamp = None if timestamps is None else float(timestamps[i])
            self._pending.append((tokens, CacheBlock("frame", 0, count, 0, frame=self._frames + i, timestamp=stamp)))
        self._frames += frames
        stats.frames = self._frames
        stats.chunks += 1
        self._last_timestamp = float(timestamps[-1]) if timestamps else None
        if self._pending_tokens >= self.prefill_min_tokens:
            self.flush()
        return sum(counts)

    def _select(self, features: torch.Tensor) -> KeptTokens | None:
        """The Pruner's (or the replacing selector's) kept tokens of features [F, P, D]; None: keep all."""
        if self._pruner is not None:
            with self._pruner.stream(self._pruner_state):
                return self._pruner.prune(features)
        if self.selector is not None:
            return self.selector.prune(features)
        return None

    @property
    def _pending_tokens(self) -> int:
        return sum(block.length for _, block in self._pending)

    def flush(self) -> int:
        """Pre-fill the pending kept tokens now (one forward); returns how many. `ask` calls it."""
        if not self._pending:
            return 0
        start = self._clock()
        index, position = self._cache.get_seq_length(), self._next_position
        blocks = []
        for _, block in self._pending:
            blocks.append(dataclasses.replace(block, start=index, position=position))
            index, position = index + block.length, position + block.length
        with torch.inference_mode():
            self._append(torch.cat([tokens for tokens, _ in self._pending])[None], blocks)
        self._pending = []
        count = index - blocks[0].start
        self._stats.prefill_ms += self._clock() - start
        self._stats.visual_tokens += count
        return count

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's own video path (tower at vision_feature_layer, select strategy, projector,
        bilinear pooling) on one chunk [F, 3, S, S], newline left out: [F, P, D]; or the custom
        encoder's tokens."""
        pixel_values = pixel_values.to(self._device, self.model.model.vision_tower.dtype)
        if self.encoder is not None:
            return self.encoder(self.model, pixel_values)
        context = self._cacher.stream(self._cacher_state) if self._cacher is not None else nullcontext()
        with context:
            output = self.model.model.get_video_features(pixel_values_videos=pixel_values[None], return_dict=True)
        return self._layout.frame_tokens(output.pooler_output[0])  # [F * P + 1, D] -> [F, P, D]

    def _forward(self, embeds: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Pre-fill embeds [1, n, D] into `cache` at the next positions; returns the last hidden
        state [1, D]."""
        length = embeds.shape[1]
        positions = torch.arange(self._next_position, self._next_position + length, device=self._device)
        output = self._language_model(
            inputs_embeds=embeds.to(self.model.dtype),
            position_ids=positions[None],
            past_key_values=cache,
            use_cache=True,
        )
        self._next_position += length
        return output.last_hidden_state[:, -1]

    def _append(self, embeds: torch.Tensor, blocks: Sequence[CacheBlock]) -> None:
        """Pre-fill blocks of the stream (embeds [1, n, D], one forward) into the video cache and
        tell the cache policy."""
        self._forward(embeds, self._cache)
        self._policy.on_append(self._cache, blocks)

    # -- questions ------------------------------------------------------------------------

    def next_token_logits(self, question: str, options: Sequence[str] | None = None,
                          answer_prefix: str = "") -> torch.Tensor:
        """Logits [vocab] (float32, CPU) of the first answer token for `question`; the cache is
        left as before. The prompt is exactly what `ask` pre-fills."""
        ids = self._question_ids(question, options, answer_prefix)
        self.flush()
        with torch.inference_mode(), self._question_scope() as cache:
            hidden = self._prefill_question(ids, cache)
            return self.model.lm_head(hidden)[0].float().cpu()

    def ask(self, question: str, options: Sequence[str] | None = None, max_new_tokens: int = 64,
            answer_prefix: str = "") -> Answer:
        """Answer `question` about the video so far, greedily; with options, a multiple-choice
        prompt and the parsed letter. answer_prefix: text the answer turn starts with (pre-filled,
        not part of `text`; e.g. a benchmark's "Best option: ("). The cache is restored to the
        video-only state afterwards. Pending visual tokens are pre-filled first (`flush`); that
        time counts in ttft_ms."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        start = self._clock()
        ids = self._question_ids(question, options, answer_prefix)
        self.flush()
        generated: list[int] = []
        decode_steps = 0
        with torch.inference_mode(), self._question_scope() as cache:
            prefill_start = self._clock()
            hidden = self._prefill_question(ids, cache)
            prefill_done = self._clock()
            token = int(self.model.lm_head(hidden)[0].argmax())
            first_token = self._clock()
            while token not in self._stop_ids:
                generated.append(token)
                if len(generated) == max_new_tokens:
                    break
                hidden = self._forward(self._embed(torch.tensor([[token]], device=self._device)), cache)
                token = int(self.model.lm_head(hidden)[0].argmax())
                decode_steps += 1
            end = self._clock()
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        answer = Answer(
            question=question,
            text=text,
            letter=parse_option_letter(text, options) if options else None,
            token_ids=generated,
            prompt_tokens=len(ids) + 1,
            frames=self._frames,
            timestamp=self._last_timestamp,
            prefill_ms=prefill_done - prefill_start,
            ttft_ms=first_token - start,
            decode_ms_per_token=(end - first_token) / decode_steps if decode_steps else 0.0,
            total_ms=end - start,
        )
        stats = self._stats
        stats.questions += 1
        stats.last_prefill_ms, stats.last_ttft_ms = answer.prefill_ms, answer.ttft_ms
        stats.last_decode_ms_per_token = answer.decode_ms_per_token
        logger.debug("answered %r after %d frames in %.1f ms", question, self._frames, answer.total_ms)
        return answer

    def _question_ids(self, question: str, options: Sequence[str] | None, answer_prefix: str = "") -> list[int]:
        """Token ids of the prompt after the video (newline excluded) for this question, then the
        answer prefix."""
        if self._frames == 0:
            raise InputError("no frame has been pushed yet: push(frames) before asking a question")
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"question must be a non-empty string, got {question!r}")
        text = multiple_choice_question(question, options) if options else question
        prompt = split_video_prompt(self.tokenizer, text, self.system_prompt)
        if prompt.prefix != self._prefix_text:
            raise StreamStateError(
                "the chat template puts question-dependent text before the video; a stream cannot pre-fill it"
            )
        return self.tokenizer(prompt.suffix + answer_prefix, add_special_tokens=False)["input_ids"]

    @contextmanager
    def _question_scope(self) -> Iterator[Cache]:
        """The cache policy's question scope, with the position counter restored as well."""
        position = self._next_position
        try:
            with self._policy.question(self._cache) as cache:
                yield cache
        finally:
            self._next_position = position

    def _prefill_question(self, ids: list[int], cache: Cache) -> torch.Tensor:
        """Pre-fill [image_newline] + question tokens on `cache`; returns the last hidden state."""
        newline = self.model.model.image_newline[None, None, :]
        tokens = self._embed(torch.tensor([ids], device=self._device))
        return self._forward(torch.cat([newline.to(tokens.dtype), tokens], dim=1), cache)

    # -- measurements ---------------------------------------------------------------------

    def _clock(self) -> float:
        """Milliseconds on a monotonic clock, after the device finished queued work."""
        synchronize(self._device)
        return time.perf_counter() * 1e3

    @property
    def frames(self) -> int:
        """Frames pushed since the last reset."""
        return self._frames

    @property
    def last_kept_indices(self) -> list[list[int]] | None:
        """Per frame of the latest pushed chunk, the positions (ascending, in the frame's pooled token
        grid) the Pruner or selector kept; None when every token is kept (no pruning) or before a push."""
        return self._last_kept

    @property
    def stats(self) -> SessionStats:
        """A snapshot of the stream's counters, with the peak memory read now."""
        stats = dataclasses.replace(self._stats)
        stats.peak_memory_bytes = peak_memory_bytes(self._device)
        if self._cacher_state is not None:
            stats.cacher = self._cacher_state.stats.to_dict()
        stats.pending_tokens = self._pending_tokens
        stats.kv_cache_bytes = sum(
            layer.keys.nbytes + layer.values.nbytes
            for layer in self._cache.layers if getattr(layer, "keys", None) is not None
        )
        return stats


__all__ = ["Answer", "CacheBlock", "CachePolicy", "FullCache", "SessionStats", "SlidingWindowCache", "StreamingSession"]
