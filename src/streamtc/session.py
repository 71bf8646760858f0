"""`StreamingSession`: watch a video stream with a VideoLLM and answer questions at any moment.

    session = StreamingSession.from_preset("tiny-llava-ov", stc=STCConfig())   # or from_pretrained(path)
    session.push(frames, timestamps)          # uint8 [F, H, W, 3] numpy/torch, or a list of PIL images
    answer = session.ask("What is the man holding?")
    answer = session.ask("What is he holding?", options=["a cup", "a phone"])   # answer.letter
    session.reset(); session.stats

Per stream: reset state -> pre-fill the chat prompt up to the video -> for each pushed chunk:
ViT (+ STC-Cacher) -> projector/merger -> pooling -> STC-Pruner -> pre-fill of the kept tokens into
a transformers `DynamicCache`; a question is pre-filled on top, answered greedily, and removed.

How it works (hosts, frames waiting for a host step, cache policies, pre-fill batching,
baselines, STC state per stream, independent questions): docs/session.md. Saving and resuming a
stream: `streamtc.session_persist`, docs/persistence.md. Read-only views of the stream (`cache`,
`memory`, `host_stream`, `cacher_state`, `pruner_state`, ...) serve tools and tests.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Self

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from .cacher import STCCacher, attached_cacher
from .cacher.hints import ChunkHints, FrameHint
from .checks import frame_timestamps, is_positive_int, positive_int
from .config import STCConfig
from .errors import ConfigError, InputError, SnapshotError, StreamStateError, UnsupportedModelError
from .hosts import Deepstack, EncodedChunk, Placed, VideoEncoder, VideoHost, host_for
from .measure import reset_peak_memory, synchronize
from .memory import CacheBlock, CachePolicy, FullCache, SlidingWindowCache
from .preprocess import FrameInput
from .presets import load_checkpoint, load_preset
from .prompts import multiple_choice_question, option_letter_token_ids, parse_option_letter
from .pruner import KeptTokens, PrunerState, STCPruner, TokenSelector
from .session_persist import load_session, restore_session, save_session
from .session_types import Answer, SessionStats
from .session_views import SessionViews

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def _saved_deepstack(saved: dict[str, torch.Tensor] | None, device: torch.device) -> Deepstack | None:
    """A pending piece's DeepStack inputs as `state_dict` holds them (None: it had none)."""
    return None if saved is None else Deepstack(saved["visual"].to(device), saved["features"].to(device))


class StreamingSession(SessionViews):
    """One video stream on a supported VideoLLM (`streamtc.hosts`), optionally with STC.

    model, tokenizer: an eval-mode model of a supported class and its tokenizer (with a chat template).
    stc: STCConfig enabling the Cacher and/or Pruner; None is the uncompressed baseline (the
        model's own forwards, untouched).
    preprocessor: frames -> per-frame pixel values; default: the host's, from the model config.
    system_prompt: system turn pre-filled at every reset (None: the template's default, if any).
    chunk_frames: frames per vision-tower forward, i.e. per Cacher chunk and Pruner call
        (default: one host step: 1 frame for LLaVA-OneVision, 2 for Qwen-VL; a multiple of it).
    prefill_min_tokens: pre-fill kept tokens once at least this many are pending (None: one
        uncompressed frame's tokens; 1: every chunk at once); docs/session.md, "Pre-fill batching".
    cache_policy: factory of the per-session `CachePolicy` (default `FullCache`).
    selector: a token selector in place of the STC-Pruner (a baseline; `prune(features)`,
        `reset()`); not with `stc.pruner`. It serves this session's stream only (no `spawn`).
    encoder: (host, pixel_values [F, 3, S, S]) -> visual tokens [F, P, D] in place of the
        model's video path (a baseline such as ToMe); not with `stc.cacher`.
    protocol: the host's prompt protocol (Qwen-VL: "video", one growing video in one user turn, or
        "livecc", one user turn "Time=t0-t1s" per chunk); default: the host's first.
    host: a prebuilt host for this model (`streamtc.hosts.host_for`); overrides `protocol`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        stc: STCConfig | None = None,
        *,
        preprocessor: Callable[[FrameInput], Sequence[torch.Tensor]] | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        chunk_frames: int | None = None,
        prefill_min_tokens: int | None = None,
        cache_policy: Callable[[], CachePolicy] = FullCache,
        selector: TokenSelector | None = None,
        encoder: VideoEncoder | None = None,
        protocol: str | None = None,
        host: VideoHost | None = None,
        _shared_stc: tuple[STCCacher | None, STCPruner | None] | None = None,
    ) -> None:
        host = host if host is not None else host_for(model, tokenizer, protocol)
        if host.model is not model:
            raise ConfigError("host was built for another model")
        if stc is not None and not isinstance(stc, STCConfig):
            raise ConfigError(f"stc must be an STCConfig or None, got {type(stc).__name__}")
        if chunk_frames is not None and (not is_positive_int(chunk_frames) or chunk_frames % host.frames_per_step):
            raise ConfigError(f"chunk_frames must be a multiple of {host.frames_per_step} (one vision step of "
                              f"{type(host).__name__}), got {chunk_frames!r}")
        positive_int(prefill_min_tokens, "prefill_min_tokens", optional=True)
        if selector is not None and not isinstance(selector, TokenSelector):
            raise ConfigError(f"selector needs prune(features) and reset(), got {type(selector).__name__}")
        if selector is not None and stc is not None and stc.pruner is not None:
            raise ConfigError("give either stc.pruner or selector, not both (set STCConfig(pruner=None))")
        if encoder is not None and stc is not None and stc.cacher is not None:
            raise ConfigError("a custom encoder replaces the vision path the Cacher patches; set STCConfig(cacher=None)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.host = host
        self.stc = stc
        self.system_prompt = system_prompt
        self.chunk_frames = chunk_frames or host.chunk_frames(None, first=False)
        self.preprocessor = preprocessor or host.default_preprocessor()
        self._cache_policy_factory = cache_policy
        self._device = host.device
        # None: one uncompressed pruner frame's tokens, known from the config or from each chunk
        self.prefill_min_tokens = prefill_min_tokens or host.tokens_per_frame
        self.selector = selector
        self.encoder = encoder
        self._stop_ids = self.host.stop_token_ids()

        if _shared_stc is None and host.supports_cacher and attached_cacher(model) is not None:
            raise StreamStateError(
                "this model's vision tower already has an STCCacher attached (another session?); "
                "share it with that session's spawn(), or close() that session (and those spawned from it) first"
            )
        self._cacher, self._pruner = _shared_stc if _shared_stc is not None else self._build_stc(stc)
        # Sessions using the attached Cacher (the owner and those spawned from it), shared among
        # them: the last one to close detaches it.
        self._cacher_users = [1]
        self._closed = False
        self._cacher_state = self._cacher.new_state() if self._cacher is not None else None
        self._pruner_state = PrunerState() if self._pruner is not None else None
        reset_peak_memory(self._device)
        self._policy: CachePolicy | None = None
        self.reset()

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path | None = None, stc: STCConfig | None = STCConfig(), *,
                        preset: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        attn_implementation: str = "sdpa", **session_kwargs: Any) -> Self:
        """Real weights and their tokenizer/chat template from one path or hub id (or `preset=`),
        loaded by `streamtc.presets.load_checkpoint` (the processor's chat template; frames
        preprocessed as the checkpoint's processor config says unless `preprocessor=` is given)."""
        if (path_or_id is None) == (preset is None):
            raise ConfigError("give exactly one of path_or_id and preset")
        if preset is not None:
            return cls.from_preset(preset, stc, device=device, dtype=dtype,
                                   attn_implementation=attn_implementation, **session_kwargs)
        model, tokenizer, preprocessor = load_checkpoint(path_or_id, device=device, dtype=dtype,
                                                         attn_implementation=attn_implementation,
                                                         protocol=session_kwargs.get("protocol"))
        session_kwargs.setdefault("preprocessor", preprocessor)
        return cls(model, tokenizer, stc, **session_kwargs)

    @classmethod
    def from_preset(cls, name: str, stc: STCConfig | None = STCConfig(), *, num_layers: int | None = None,
                    text_layers: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **session_kwargs: Any) -> Self:
        """A built-in VideoLLM preset with random weights (answers are meaningless) and the
        built-in tokenizer (`streamtc.presets.load_preset`). num_layers / text_layers override the
        vision tower's / language model's depth. The preset's prompt protocol and frame settings
        apply unless `protocol=` / `preprocessor=` are given."""
        model, tokenizer, settings = load_preset(name, num_layers=num_layers, text_layers=text_layers, seed=seed,
                                                 device=device, dtype=dtype, attn_implementation=attn_implementation)
        return cls(model, tokenizer, stc, **{**settings, **session_kwargs})

    def spawn(self, cache_policy: Callable[[], CachePolicy] | None = None) -> StreamingSession:
        """Another session on the same model, tokenizer, Cacher and Pruner, with its own stream
        state (cache, references, anchors, counters) and this session's cache policy (or
        `cache_policy`). The first session keeps ownership of the attached Cacher. Not with a
        `selector`: baseline selectors keep one stream's state."""
        if self.selector is not None:
            raise StreamStateError("a session with a custom selector cannot spawn; make one session per stream")
        self.check_open()
        spawned = StreamingSession(
            self.model, self.tokenizer, self.stc, preprocessor=self.preprocessor,
            system_prompt=self.system_prompt, chunk_frames=self.chunk_frames,
            prefill_min_tokens=self.prefill_min_tokens, cache_policy=cache_policy or self._cache_policy_factory,
            encoder=self.encoder, host=self.host, _shared_stc=(self._cacher, self._pruner),
        )
        spawned._cacher_users = self._cacher_users
        self._cacher_users[0] += 1
        return spawned

    def _build_stc(self, stc: STCConfig | None) -> tuple[STCCacher | None, STCPruner | None]:
        """Attach an STCCacher to the model and build an STCPruner, as `stc` enables them."""
        if stc is None:
            return None, None
        if stc.cacher is not None and not self.host.supports_cacher:
            raise UnsupportedModelError(
                f"STC-Cacher does not support the vision tower of {type(self.model).__name__} "
                f"({type(self.host.vision_tower).__name__}); use STCConfig(cacher=None) for the Pruner alone"
            )
        cacher = STCCacher(stc.cacher).attach(self.model) if stc.cacher is not None else None
        pruner = STCPruner(stc.pruner) if stc.pruner is not None else None
        return cacher, pruner

    def close(self) -> None:
        """End this session (push and ask then raise). The Cacher is detached, leaving the model's
        forwards untouched, when the last of the sessions sharing it (the one that attached it and
        those spawned from it) closes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._policy.close()
        self._cacher_users[0] -= 1
        if self._cacher is not None and self._cacher_users[0] == 0:
            self._cacher.detach()

    def check_open(self) -> None:
        """Raise StreamStateError if this session is closed."""
        if self._closed:
            raise StreamStateError("this session is closed; make a new session (or spawn() one before closing)")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stream ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new stream: empty cache, fresh STC state and counters, chat prefix pre-filled."""
        if self._policy is not None:
            self._policy.close()  # the previous stream's offloaded files
        self._policy = self._cache_policy_factory()
        self._policy.bind(self.host.language_model)
        self._cache = self._policy.new_cache(self.model.config)
        self._stream = self.host.new_stream(self.system_prompt)
        self._frames = 0
        self._last_timestamp: float | None = None
        self._last_kept: list[list[int]] | None = None
        self._last_chunk: EncodedChunk | None = None
        # frames not yet encoded: pixels [3, H, W], timestamp, codec hint on the tower's grid
        self._waiting: list[tuple[torch.Tensor, float | None, FrameHint | None]] = []
        self._pending: list[tuple[Placed, CacheBlock]] = []  # per pruner frame: its tokens and block
        if self._cacher_state is not None:
            self._cacher_state.reset()
        if self._pruner_state is not None:
            self._pruner_state.reset()
        if self.selector is not None:
            self.selector.reset()
        self._stats = SessionStats(memory_kind="cuda" if self._device.type == "cuda" else "rss")
        with torch.inference_mode():
            ids = self._stream.prefix_ids()
            positions = torch.arange(len(ids))[None].expand(self._stream.position_rows, -1)
            self._append(self.host.embed(ids)[None], positions, [CacheBlock("prompt", 0, len(ids), 0)])
        self._stats.prompt_tokens = len(ids)

    def push(self, frames: FrameInput, timestamps: Sequence[float] | None = None,
             codec: Sequence[Any] | None = None) -> int:
        """Encode `frames` and append their (kept) visual tokens to the stream; returns the tokens
        kept. They are pre-filled into the cache once enough are pending (`prefill_min_tokens`).
        frames: uint8 [F, H, W, 3] numpy/torch or a list of PIL images; timestamps: seconds, one
        per frame (optional; finite and increasing, also across pushes); codec: per frame, the
        decoder's side data (`streamtc.codec.CodecSideData`, a source's `Frame.codec`) or None, which
        a budget Cacher uses to find cuts and changed patches (frames without it: pixel change).
        Frames short of a host step (Qwen-VL: an unpaired frame) wait for the next push."""
        self.check_open()
        pixel_values = self.preprocessor(frames)  # per frame [3, H, W]
        stamps = frame_timestamps(timestamps, len(pixel_values), after=self.last_timestamp)
        self._waiting.extend(zip(pixel_values, stamps, self._frame_hints(codec, pixel_values)))
        added = 0
        with torch.inference_mode():
            while chunk := self._next_chunk():
                pixels = [p for p, _, _ in chunk]
                chunk_stamps = None if any(t is None for _, t, _ in chunk) else [t for _, t, _ in chunk]
                hints = ChunkHints.from_frames([h for _, _, h in chunk], self.host.frames_per_step)
                added += self._push_chunk(pixels, chunk_stamps, hints)
        return added

    def _frame_hints(self, codec: Sequence[Any] | None, pixel_values: Sequence[torch.Tensor]) -> list[FrameHint | None]:
        """Each frame's codec side data on the tower's patch grid (None for frames without it, and
        for every frame when no Cacher would read it)."""
        if codec is None or self._cacher is None:
            return [None] * len(pixel_values)
        if len(codec) != len(pixel_values):
            raise InputError(f"got {len(pixel_values)} frames but codec side data for {len(codec)}")
        patch = self.host.vision_tower.config.patch_size
        return [None if data is None else FrameHint.from_side_data(data, (p.shape[-2] // patch, p.shape[-1] // patch))
                for data, p in zip(codec, pixel_values)]

    def _next_chunk(self) -> list[tuple[torch.Tensor, float | None]]:
        """Take the next chunk of waiting frames, or [] when none is ready: `chunk_frames` frames
        (the host's first chunk may differ), fewer at the end of a push when the protocol allows
        it (whole steps), and never across a change of frame size (that closes a chunk early)."""
        size = self.host.chunk_frames(self.chunk_frames, first=self._stats.chunks == 0)
        waiting, step = self._waiting, self.host.frames_per_step
        shape = waiting[0][0].shape if waiting else None
        same = next((i for i, (p, _, _) in enumerate(waiting) if p.shape != shape), len(waiting))
        if same >= size:
            take = size
        elif same < len(waiting):
            take = same  # the frame size changes: the frames before it end their chunk
        elif self.host.partial_chunks:
            take = same - same % step
        else:
            take = 0
        chunk, self._waiting = waiting[:take], waiting[take:]
        return chunk

    def _push_chunk(self, pixels: list[torch.Tensor], timestamps: list[float] | None,
                    hints: ChunkHints | None = None) -> int:
        """ViT (+Cacher, given the chunk's codec hints) -> projector -> pooling -> Pruner for one
        chunk; its kept tokens join the pending buffer, pre-filled once it holds `prefill_min_tokens`."""
        stats = self._stats
        start = self._clock()
        chunk = self._encode(pixels, hints)
        stats.vit_ms += self._clock() - start
        self._last_chunk = chunk
        frames, per_frame, width = chunk.features.shape
        stats.visual_tokens_encoded += frames * per_frame
        start = self._clock()
        kept = self._select(chunk.features)
        stats.prune_ms += self._clock() - start
        step = max(1, chunk.frames // frames)  # video frames per pruner frame
        self._last_kept = None if kept is None else [
            kept.indices[i, :n].tolist() for i, n in enumerate(kept.frame_counts())]
        pieces = self._stream.place(chunk, kept, self._frames, timestamps)
        for i, piece in enumerate(pieces):
            stamp = None if timestamps is None else timestamps[min(i * step, len(timestamps) - 1)]
            block = CacheBlock("frame", 0, piece.embeds.shape[0], 0, frame=self._frames + i * step, timestamp=stamp,
                               text_head=piece.lead, text_tail=piece.text - piece.lead)
            self._pending.append((piece, block))
        self._frames += chunk.frames
        stats.frames = self._frames
        stats.chunks += 1
        self._last_timestamp = timestamps[-1] if timestamps else None
        if self._pending_tokens >= (self.prefill_min_tokens or per_frame):
            self.flush()
        return sum(piece.embeds.shape[0] - piece.text for piece in pieces)

    def _select(self, features: torch.Tensor) -> KeptTokens | None:
        """The Pruner's (or the replacing selector's) kept tokens of features [F, P, D]; None: keep all."""
        if self._pruner is not None:
            with self._pruner.stream(self._pruner_state):
                return self._pruner.prune(features)
        if self.selector is not None:
            return self.selector.prune(features)
        return None

    def flush(self) -> int:
        """Pre-fill the pending kept tokens now (one forward); returns how many. `ask` calls it."""
        if not self._pending:
            return 0
        start = self._clock()
        index = self._cache.get_seq_length()
        blocks = []
        for piece, block in self._pending:
            blocks.append(dataclasses.replace(block, start=index, position=int(piece.positions[0, 0])))
            index += block.length
        text = sum(piece.text for piece, _ in self._pending)
        with torch.inference_mode():
            tokens = torch.cat([piece.embeds for piece, _ in self._pending])[None]
            deepstack = Deepstack.concat([(piece.embeds.shape[0], piece.deepstack) for piece, _ in self._pending])
            self._append(tokens, torch.cat([piece.positions for piece, _ in self._pending], dim=1), blocks, deepstack)
        self._pending = []
        count = index - blocks[0].start
        self._stats.prefill_ms += self._clock() - start
        self._stats.visual_tokens += count - text
        self._stats.prompt_tokens += text  # per-chunk turn text (LiveCC protocol) is chat prompt
        return count

    def _encode(self, pixels: list[torch.Tensor], hints: ChunkHints | None = None):
        """The host's video path on one chunk (per-frame pixels [3, H, W]) with the Cacher's
        stream state active and the chunk's hints handed to it, or the custom encoder's tokens: an
        `EncodedChunk`."""
        if self._cacher is None:
            return self.host.encode(pixels, self.encoder)
        with self._cacher.stream(self._cacher_state):
            self._cacher.hint(hints)
            return self.host.encode(pixels, self.encoder)

    def _append(self, embeds: torch.Tensor, positions: torch.Tensor, blocks: Sequence[CacheBlock],
                deepstack: Deepstack | None = None) -> None:
        """Pre-fill blocks of the stream (embeds [1, n, D] at positions [R, n] with their DeepStack
        inputs, one forward) into the video cache and tell the cache policy (which may move the next
        positions down)."""
        extra = {} if deepstack is None else {"deepstack": deepstack}  # hosts without DeepStack: as before
        self.host.forward(embeds, positions, self._cache, **extra)
        self._stream.next_position -= self._policy.on_append(self._cache, blocks) or 0

    def _forward_text(self, embeds: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Pre-fill text embeds [1, n, D] at the stream's next text positions; last hidden state [1, D]."""
        return self.host.forward(embeds, self._stream.text_positions(embeds.shape[1]), cache)

    def _clock(self) -> float:
        """Milliseconds on a monotonic clock, after the device finished queued work."""
        synchronize(self._device)
        return time.perf_counter() * 1e3

    # -- questions ------------------------------------------------------------------------

    def next_token_logits(self, question: str, options: Sequence[str] | None = None,
                          answer_prefix: str = "") -> torch.Tensor:
        """Logits [vocab] (float32, CPU) of the first answer token for `question`; the cache is
        left as before. The prompt is exactly what `ask` pre-fills."""
        self.check_open()
        with torch.inference_mode():
            embeds = self._question_embeds(question, options, answer_prefix)
        self.flush()
        with torch.inference_mode(), self._question_scope() as cache:
            hidden = self._forward_text(embeds, cache)
            return self.host.logits(hidden)[0].float().cpu()

    def option_logprobs(self, question: str, options: Sequence[str] | None = None, *, letters: int | None = None,
                        answer_prefix: str = "") -> dict[str, float]:
        """Log-probability of each option letter (A, B, ...) as the first answer token, on the prompt
        `ask` pre-fills for the same arguments (the cache is left as before); letters: how many
        (default len(options); give it when `question` already lists its options). A letter the
        tokenizer splits into several tokens is left out."""
        count = len(options or ()) if letters is None else letters
        log_softmax = torch.log_softmax(self.next_token_logits(question, options, answer_prefix), dim=-1)
        return {letter: float(log_softmax[i]) for letter, i in option_letter_token_ids(self.tokenizer, count).items()}

    def ask(self, question: str, options: Sequence[str] | None = None, max_new_tokens: int = 64,
            answer_prefix: str = "", on_token: Callable[[int], None] | None = None) -> Answer:
        """Answer `question` about the video so far, greedily; with options, a multiple-choice
        prompt and the parsed letter. answer_prefix: text the answer turn starts with (pre-filled,
        not part of `text`; e.g. a benchmark's "Best option: ("). on_token: called with each answer
        token id as soon as it is generated (streamed answers). The cache is restored to the
        video-only state afterwards. Pending visual tokens are pre-filled first (`flush`); that
        time counts in ttft_ms."""
        self.check_open()
        positive_int(max_new_tokens, "max_new_tokens", error=InputError)
        start = self._clock()
        with torch.inference_mode():
            embeds = self._question_embeds(question, options, answer_prefix)
        self.flush()
        generated: list[int] = []
        decode_steps = 0
        with torch.inference_mode(), self._question_scope() as cache:
            prefill_start = self._clock()
            hidden = self._forward_text(embeds, cache)
            prefill_done = self._clock()
            token = int(self.host.logits(hidden)[0].argmax())
            first_token = self._clock()
            while token not in self._stop_ids:
                generated.append(token)
                if on_token is not None:
                    on_token(token)
                if len(generated) == max_new_tokens:
                    break
                hidden = self._forward_text(self.host.embed([token])[None], cache)
                token = int(self.host.logits(hidden)[0].argmax())
                decode_steps += 1
            end = self._clock()
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        answer = Answer(
            question=question,
            text=text,
            letter=parse_option_letter(text, options) if options else None,
            token_ids=generated,
            prompt_tokens=embeds.shape[1],
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

    def _question_embeds(self, question: str, options: Sequence[str] | None, answer_prefix: str = "") -> torch.Tensor:
        """Embeddings [1, n, D] of the prompt after the video for this question (the host's), then
        the answer prefix."""
        if self._frames == 0:
            raise InputError("no frame has been pushed yet: push(frames) before asking a question"
                             + (f" (this host encodes {self.host.frames_per_step} frames at a time)"
                                if self._waiting else ""))
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"question must be a non-empty string, got {question!r}")
        text = multiple_choice_question(question, options) if options else question
        return self._stream.question_embeds(text, answer_prefix)

    @contextmanager
    def _question_scope(self) -> Iterator[Cache]:
        """The cache policy's question scope, with the stream's position counter restored as well."""
        position = self._stream.next_position
        try:
            with self._policy.question(self._cache) as cache:
                yield cache
        finally:
            self._stream.next_position = position

    # -- persistence ----------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Save this stream's whole memory to `directory` (`streamtc.session_persist`): an atomic,
        verified save that replaces the directory's previous one only once complete. Returns the
        directory."""
        return save_session(self, directory)

    def load(self, directory: str | Path) -> Self:
        """Replace this session's stream by the one saved in `directory`. The session must have been
        made like the saved one (same model and tokenizer, host and protocol, STC settings, chunking,
        system prompt, memory policy class); `restore` makes such a session from the save itself."""
        return load_session(self, directory)

    @classmethod
    def restore(cls, directory: str | Path, model: PreTrainedModel, tokenizer: Any = None, *,
                preprocessor: Callable[[FrameInput], Sequence[torch.Tensor]] | None = None,
                cache_policy: Callable[[], CachePolicy] | None = None, **session_kwargs: Any) -> Self:
        """A new session on `model` that resumes the stream saved in `directory`: the settings come
        from the save, and the next push and ask behave as in the session that saved it.
        tokenizer: default the built-in one (presets); real weights need theirs. preprocessor /
        cache_policy: default as saved (a custom preprocessor or an unimported policy class must be
        given). Raises SnapshotError for a damaged save or one made on another model or tokenizer."""
        return restore_session(cls, directory, model, tokenizer, preprocessor=preprocessor,
                               cache_policy=cache_policy, **session_kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The stream's state outside the KV cache (tensors as they are): counters, protocol state,
        frames waiting for their pair, kept tokens waiting for their pre-fill, the Cacher's and
        Pruner's state. With the cache (`memory.save(cache, ...)`) it is the whole stream."""
        self.check_open()
        return {
            "frames": self._frames,
            "last_timestamp": self._last_timestamp,
            "last_kept": self._last_kept,
            "stream": self._stream.state_dict(),
            "stats": asdict(self._stats),
            "waiting": [{"pixels": pixels, "timestamp": stamp, "hint": hint} for pixels, stamp, hint in self._waiting],
            "pending": [{"embeds": piece.embeds, "positions": piece.positions, "text": piece.text,
                         "lead": piece.lead, "block": asdict(block),
                         "deepstack": None if piece.deepstack is None else {
                             "visual": piece.deepstack.visual, "features": piece.deepstack.features}}
                        for piece, block in self._pending],
            "cacher": None if self._cacher_state is None else self._cacher_state.state_dict(),
            "pruner": None if self._pruner_state is None else self._pruner_state.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], memory: CachePolicy, cache: Cache) -> None:
        """Continue the stream of `state` (a `state_dict()`) over the KV cache `cache` held by
        `memory` (made by this session's `cache_policy` and bound to its language model). All of it
        is checked against this session first and nothing changes unless it fits; then `memory` is
        this session's and the replaced stream's memory is closed."""
        self.check_open()
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.device != self._device:
                layer.keys, layer.values, layer.device = layer.keys.to(self._device), layer.values.to(self._device), self._device
        stream = self.host.new_stream(self.system_prompt)
        stream.load_state_dict(state["stream"])
        if (state["cacher"] is None) != (self._cacher_state is None) or (state["pruner"] is None) != (self._pruner_state is None):
            raise SnapshotError("the saved STC state does not fit this session's STC settings")
        stats = SessionStats(**state["stats"])
        stats.memory_kind = "cuda" if self._device.type == "cuda" else "rss"
        pending = [(Placed(item["embeds"].to(self._device), item["positions"], item["text"],
                           _saved_deepstack(item.get("deepstack"), self._device), lead=item["lead"]),
                    CacheBlock(**item["block"])) for item in state["pending"]]
        # everything read: switch the session over
        if self._cacher_state is not None:
            self._cacher_state.load_state_dict(state["cacher"], self._device)
        if self._pruner_state is not None:
            self._pruner_state.load_state_dict(state["pruner"], self._device)
        previous = self._policy
        self._policy, self._cache, self._stream = memory, cache, stream
        previous.close()  # the replaced stream's offloaded files
        self._frames, self._last_timestamp = int(state["frames"]), state["last_timestamp"]
        self._last_kept = state["last_kept"]
        self._waiting = [(item["pixels"], item["timestamp"], None if item.get("hint") is None else FrameHint(*item["hint"]))
                         for item in state["waiting"]]
        self._pending, self._stats = pending, stats


__all__ = ["Answer", "CacheBlock", "CachePolicy", "FullCache", "SessionStats", "SlidingWindowCache", "StreamingSession"]
