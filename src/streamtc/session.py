"""`StreamingSession`: watch a video stream with a VideoLLM and answer questions at any moment.

    session = StreamingSession.from_preset("tiny-llava-ov", stc=STCConfig())   # or from_pretrained(path)
    session.push(frames, timestamps)          # uint8 [F, H, W, 3] numpy/torch, or a list of PIL images
    answer = session.ask("What is the man holding?")
    answer = session.ask("What is he holding?", options=["a cup", "a phone"])   # answer.letter
    session.reset(); session.stats

Per stream: reset state -> pre-fill the chat prompt up to the video -> for each pushed chunk:
ViT (+ STC-Cacher) -> projector/merger -> pooling -> STC-Pruner -> pre-fill of the kept tokens into
a transformers `DynamicCache`; a question is pre-filled on top, answered greedily, and removed.

Hosts. Everything specific to a model family lives in its host (`streamtc.hosts`): LLaVA-OneVision
(`LlavaOnevisionForConditionalGeneration`), Qwen2-VL / Qwen2.5-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`; LiveCC is a Qwen2-VL-7B) and Qwen3-VL
(`Qwen3VLForConditionalGeneration`, whose DeepStack inputs travel with the kept tokens). The host
builds the one-shot sequence of its processor incrementally, chooses each kept token's position
(1-D, or M-RoPE (t, h, w) as the one-shot sequence gives it), and owns the chat-template pieces
around the video. After an answer the cache is cropped back to the video-only state, so the next
push continues right after the last frame; with stc=None the incremental cache reproduces a
one-shot forward of the same frames and question (tests/test_session.py, tests/test_qwen_vl.py,
tests/test_qwen3_vl.py check the logits).

Frames. A host encodes frames in steps (one frame for LLaVA-OneVision; one temporal patch of two
frames for Qwen-VL). Frames wait in the session until a step is complete, so pushing one frame at a
time works everywhere; a question sees the video up to the last complete step.

Cache handling goes through a small `CachePolicy` (`streamtc.memory`): it makes the cache,
hears about every appended block (prompt or frame) and scopes each question (`with
policy.question(cache)`), restoring the video-only cache on exit, errors included. The host's stream
state counts positions, so positions stay correct when a policy evicts.

Pre-fill batching. The LLM pre-fills more efficiently in larger blocks: its weights are read
once per forward, and small matrix products run below the machine's peak. So kept tokens wait in
a pending buffer until at least `prefill_min_tokens` of them are there (default: one uncompressed
frame's tokens, so the uncompressed baseline still pre-fills every frame as it arrives, and
STC's 59-token frames go in blocks of four; for hosts whose frame size sets the token count,
one uncompressed chunk frame's tokens); a question, or `flush()`, pre-fills what is pending
first. The cache after a flush equals frame-by-frame pre-fill (causal attention; tested), and a
question waits for at most `prefill_min_tokens` of pending pre-fill. `prefill_min_tokens=1`
pre-fills every chunk at once.

Baselines. `selector=` replaces the STC-Pruner by another token selector with the same
interface (`streamtc.baselines`: uniform, random, VidCom2-style, VisionZip-style), and
`encoder=` replaces the model's video path (ToMe merges tokens inside the ViT, so its tokens
skip the grid pooling: `streamtc.baselines.tome_video_features`, LLaVA-OneVision only; on Qwen-VL,
ToMe runs on the merged tokens as a selector, `streamtc.baselines.ToMeTokenMerger`).

STC. The Cacher patches the model's vision tower once (`STCCacher.attach`); the Pruner is a plain
object. Both keep per-stream state in state objects the session owns, made active around each use
with their `stream(state)` context managers, so several sessions can share one model and one
cacher (`session.spawn()`) and still never see each other's references or anchors. Each vision
tower forward is one Cacher chunk, one Pruner call and one pre-fill forward: `chunk_frames` frames
(default: one step of the host): on Qwen-VL one Cacher chunk is one temporal patch (two frames),
and LiveCC's first 6-frame chunk is one tower forward of three temporal patches.

Persistence. `session.save(dir)` writes the stream's whole memory: the KV cache (through its cache
policy), the Cacher's reference and schedule, the Pruner's history, the host stream's positions and
protocol state, frames waiting for their pair, kept tokens waiting for their pre-fill, counters and
stats, with the settings and a fingerprint of the model and tokenizer. `StreamingSession.restore(dir,
model=...)` makes a session with those settings on the same model and loads it (`load` loads into
an existing session made alike, e.g. a `spawn`); the next push and ask then give what the saving
session would have given. Saves are atomic and verified (`streamtc.memory.persist`).

Questions are independent: each one sees the system prompt and the video so far, not the earlier
questions and answers. The session calls the language model with explicit positions and never the
top-level model forward, so transformers' sticky `rope_deltas` of Qwen-VL models is neither read nor
written: streams and questions cannot leak positions into each other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Self

import torch
from transformers import AutoTokenizer, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import cached_file

from .checks import is_positive_int, positive_int
from .measure import peak_memory_bytes, reset_peak_memory, synchronize
from .memory import CacheBlock, CachePolicy, FullCache, SlidingWindowCache
from .memory.persist import (
    join_tensors, model_fingerprint, open_snapshot, read_json, read_tensors, split_tensors, tokenizer_fingerprint,
    write_json, write_tensors, writing_snapshot,
)
from .cacher import STCCacher, attached_cacher
from .config import STCConfig
from .errors import ConfigError, InputError, SnapshotError, StreamStateError, UnsupportedModelError
from .hosts import Deepstack, EncodedChunk, Placed, RecomputedTokens, VideoEncoder, VideoHost, host_class_for, host_for
from .preprocess import FrameInput, FramePreprocessor, QwenVLPreprocessor
from .presets import build_model, get_preset, load_pretrained
from .pruner import KeptTokens, PrunerState, STCPruner, TokenSelector
from .prompts import multiple_choice_question, option_letter_token_ids, parse_option_letter
from .tokenizer import tokenizer_for_config

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


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


# -- the session ------------------------------------------------------------------------------


def _saved_deepstack(saved: dict[str, torch.Tensor] | None, device: torch.device) -> Deepstack | None:
    """A pending piece's DeepStack inputs as `session.save` wrote them (None: it had none)."""
    return None if saved is None else Deepstack(saved["visual"].to(device), saved["features"].to(device))


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


def load_tokenizer(path_or_id: str | Path) -> Any:
    """A checkpoint's tokenizer with its processor's chat template (see `from_pretrained`)."""
    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    tokenizer.chat_template = _load_chat_template(path_or_id) or tokenizer.chat_template
    return tokenizer


class StreamingSession:
    """One video stream on a supported VideoLLM (`streamtc.hosts`), optionally with STC.

    model, tokenizer: an eval-mode model of a supported class and its tokenizer (with a chat template).
    stc: STCConfig enabling the Cacher and/or Pruner; None is the uncompressed baseline (the
        model's own forwards, untouched).
    preprocessor: frames -> per-frame pixel values; default: the host's, from the model config.
    system_prompt: system turn pre-filled at every reset (None: the template's default, if any).
    chunk_frames: frames per vision-tower forward, i.e. per Cacher chunk and Pruner call
        (default: one host step: 1 frame for LLaVA-OneVision, 2 for Qwen-VL; a multiple of it).
    prefill_min_tokens: pre-fill kept tokens once at least this many are pending (None: one
        uncompressed frame's tokens; 1: every chunk at once). See "Pre-fill batching".
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
        self._stop_ids = self._stop_token_ids()

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
        the video. Frames are preprocessed as the checkpoint's processor config says
        (preprocessor_config.json; Qwen-VL: video_preprocessor_config.json when present).
        """
        if (path_or_id is None) == (preset is None):
            raise ConfigError("give exactly one of path_or_id and preset")
        if preset is not None:
            return cls.from_preset(preset, stc, device=device, dtype=dtype,
                                   attn_implementation=attn_implementation, **session_kwargs)
        model = load_pretrained(path_or_id, dtype=dtype, attn_implementation=attn_implementation).to(device)
        tokenizer = load_tokenizer(path_or_id)
        host_class = host_class_for(type(model))
        session_kwargs.setdefault("preprocessor", host_class.preprocessor_from_pretrained(
            path_or_id, session_kwargs.get("protocol")))
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
        """A built-in VideoLLM preset with random weights (answers are meaningless) and the
        built-in tokenizer (`streamtc.tokenizer`). num_layers / text_layers override the vision
        tower's / language model's depth. The preset's prompt protocol and frame settings apply
        unless `protocol=` / `preprocessor=` are given."""
        preset = get_preset(name)
        try:
            host_class_for(preset.model_class)
        except UnsupportedModelError:
            raise ConfigError(f"preset {name!r} is a {preset.model_class.__name__}, not a VideoLLM") from None
        model = build_model(name, num_layers=num_layers, seed=seed, dtype=dtype,
                            attn_implementation=attn_implementation, text_layers=text_layers).to(device)
        if preset.protocol is not None:
            session_kwargs.setdefault("protocol", preset.protocol)
        if preset.preprocessor is not None:
            session_kwargs.setdefault("preprocessor", preset.preprocessor())
        return cls(model, tokenizer_for_config(model.config), stc, **session_kwargs)

    def spawn(self, cache_policy: Callable[[], CachePolicy] | None = None) -> StreamingSession:
        """Another session on the same model, tokenizer, Cacher and Pruner, with its own stream
        state (cache, references, anchors, counters) and this session's cache policy (or
        `cache_policy`). The first session keeps ownership of the attached Cacher. Not with a
        `selector`: baseline selectors keep one stream's state."""
        if self.selector is not None:
            raise StreamStateError("a session with a custom selector cannot spawn; make one session per stream")
        self._check_open()
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

    def _check_open(self) -> None:
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
        self._waiting: list[tuple[torch.Tensor, float | None]] = []  # frames (pixels [3, H, W]) not yet encoded
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

    def push(self, frames: FrameInput, timestamps: Sequence[float] | None = None) -> int:
        """Encode `frames` and append their (kept) visual tokens to the stream; returns the tokens
        kept. They are pre-filled into the cache once enough are pending (`prefill_min_tokens`).
        frames: uint8 [F, H, W, 3] numpy/torch or a list of PIL images; timestamps: seconds, one
        per frame (optional; finite and increasing, also across pushes). Frames short of a host
        step (Qwen-VL: an unpaired frame) wait for the next push."""
        self._check_open()
        pixel_values = self.preprocessor(frames)  # per frame [3, H, W]
        count = len(pixel_values)
        if timestamps is not None and len(timestamps) != count:
            raise InputError(f"got {count} frames but {len(timestamps)} timestamps")
        previous = self.last_timestamp
        for stamp in timestamps if timestamps is not None else ():
            if not math.isfinite(stamp) or (previous is not None and stamp <= previous):
                after = "" if previous is None else f" after {previous}"
                raise InputError(f"timestamps must be finite and increasing; got {stamp}{after}")
            previous = stamp
        stamps = [None] * count if timestamps is None else [float(t) for t in timestamps]
        self._waiting.extend(zip(pixel_values, stamps))
        added = 0
        with torch.inference_mode():
            while chunk := self._next_chunk():
                pixels = [p for p, _ in chunk]
                chunk_stamps = None if any(t is None for _, t in chunk) else [t for _, t in chunk]
                added += self._push_chunk(pixels, chunk_stamps)
        return added

    def _next_chunk(self) -> list[tuple[torch.Tensor, float | None]]:
        """Take the next chunk of waiting frames, or [] when none is ready: `chunk_frames` frames
        (the host's first chunk may differ), fewer at the end of a push when the protocol allows
        it (whole steps), and never across a change of frame size (that closes a chunk early)."""
        size = self.host.chunk_frames(self.chunk_frames, first=self._stats.chunks == 0)
        waiting, step = self._waiting, self.host.frames_per_step
        shape = waiting[0][0].shape if waiting else None
        same = next((i for i, (p, _) in enumerate(waiting) if p.shape != shape), len(waiting))
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

    def _push_chunk(self, pixels: list[torch.Tensor], timestamps: list[float] | None) -> int:
        """ViT (+Cacher) -> projector -> pooling -> Pruner for one chunk; its kept tokens join the
        pending buffer, pre-filled once it holds `prefill_min_tokens`."""
        stats = self._stats
        start = self._clock()
        chunk = self._encode(pixels)
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

    @property
    def _pending_tokens(self) -> int:
        return sum(block.length for _, block in self._pending)

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

    def _encode(self, pixels: list[torch.Tensor]):
        """The host's video path on one chunk (per-frame pixels [3, H, W]) with the Cacher's
        stream state active, or the custom encoder's tokens: an `EncodedChunk`."""
        context = self._cacher.stream(self._cacher_state) if self._cacher is not None else nullcontext()
        with context:
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

    # -- questions ------------------------------------------------------------------------

    def next_token_logits(self, question: str, options: Sequence[str] | None = None,
                          answer_prefix: str = "") -> torch.Tensor:
        """Logits [vocab] (float32, CPU) of the first answer token for `question`; the cache is
        left as before. The prompt is exactly what `ask` pre-fills."""
        self._check_open()
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
        self._check_open()
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
        """Save this stream's whole memory to `directory` (see "Persistence"): an atomic, verified
        save that replaces the directory's previous one only once complete. Returns the directory."""
        self._check_open()
        if self.selector is not None or self.encoder is not None:
            raise StreamStateError("a session with a custom selector or encoder cannot be saved: their per-stream "
                                   "state is not streamtc's to serialise")
        tensors: dict[str, torch.Tensor] = {}
        state = split_tensors(self._state_tree(), tensors)
        with writing_snapshot(directory) as staging:
            write_tensors(staging / "state.safetensors", tensors)
            write_json(staging / "session.json", {"settings": self._settings_record(), "state": state})
            (staging / "memory").mkdir()
            self._policy.save(self._cache, staging / "memory")
        return Path(directory)

    def load(self, directory: str | Path) -> Self:
        """Replace this session's stream by the one saved in `directory`. The session must have been
        made like the saved one (same model and tokenizer, host and protocol, STC settings, chunking,
        system prompt, memory policy class); `restore` makes such a session from the save itself."""
        self._check_open()
        snapshot = open_snapshot(directory)
        record = read_json(snapshot / "session.json")
        _check_same_model(record["settings"], self.model, self.tokenizer)
        return self._load_snapshot(snapshot, record)

    @classmethod
    def restore(cls, directory: str | Path, model: PreTrainedModel, tokenizer: Any = None, *,
                preprocessor: Callable[[FrameInput], Sequence[torch.Tensor]] | None = None,
                cache_policy: Callable[[], CachePolicy] | None = None, **session_kwargs: Any) -> Self:
        """A new session on `model` that resumes the stream saved in `directory`: the settings come
        from the save, and the next push and ask behave as in the session that saved it.
        tokenizer: default the built-in one (presets); real weights need theirs. preprocessor /
        cache_policy: default as saved (a custom preprocessor or an unimported policy class must be
        given). Raises SnapshotError for a damaged save or one made on another model or tokenizer."""
        snapshot = open_snapshot(directory)
        record = read_json(snapshot / "session.json")
        settings = record["settings"]
        tokenizer = tokenizer if tokenizer is not None else tokenizer_for_config(model.config)
        _check_same_model(settings, model, tokenizer)
        host_record = settings["host"]
        session = cls(
            model, tokenizer, None if settings["stc"] is None else STCConfig.from_dict(settings["stc"]),
            preprocessor=preprocessor or _preprocessor_from_record(settings["preprocessor"]),
            system_prompt=settings["system_prompt"], chunk_frames=settings["chunk_frames"],
            prefill_min_tokens=settings["prefill_min_tokens"],
            cache_policy=cache_policy or _policy_factory(settings["cache_policy"]),
            host=host_for(model, tokenizer, host_record["protocol"], **host_record["settings"]), **session_kwargs,
        )
        try:
            return session._load_snapshot(snapshot, record)
        except BaseException:
            session.close()
            raise

    def _settings_record(self) -> dict[str, Any]:
        """What a save must match to be loaded into a session (JSON): the model and tokenizer, and
        the stream settings."""
        return {"model": model_fingerprint(self.model), "tokenizer": tokenizer_fingerprint(self.tokenizer),
                **self._stream_settings()}

    def _stream_settings(self) -> dict[str, Any]:
        """The settings a saved stream and the session it loads into must share (JSON-ready)."""
        policy = self._policy
        return {
            "host": {"class": type(self.host).__name__, "protocol": self.host.protocol,
                     "settings": self.host.settings()},
            "stc": None if self.stc is None else self.stc.to_dict(),
            "system_prompt": self.system_prompt,
            "chunk_frames": self.chunk_frames,
            "prefill_min_tokens": self.prefill_min_tokens,
            "preprocessor": _preprocessor_record(self.preprocessor),
            "cache_policy": {"class": f"{type(policy).__module__}.{type(policy).__qualname__}",
                             "settings": policy.settings()},
        }

    def _state_tree(self) -> dict[str, Any]:
        """The stream's state outside the KV cache: counters, protocol state, frames waiting for
        their pair, kept tokens waiting for their pre-fill, the Cacher's and Pruner's state."""
        return {
            "frames": self._frames,
            "last_timestamp": self._last_timestamp,
            "last_kept": self._last_kept,
            "stream": self._stream.state_dict(),
            "stats": asdict(self._stats),
            "waiting": [{"pixels": pixels, "timestamp": stamp} for pixels, stamp in self._waiting],
            "pending": [{"embeds": piece.embeds, "positions": piece.positions, "text": piece.text,
                         "lead": piece.lead, "block": asdict(block),
                         "deepstack": None if piece.deepstack is None else {
                             "visual": piece.deepstack.visual, "features": piece.deepstack.features}}
                        for piece, block in self._pending],
            "cacher": None if self._cacher_state is None else self._cacher_state.state_dict(),
            "pruner": None if self._pruner_state is None else self._pruner_state.state_dict(),
        }

    def _load_snapshot(self, snapshot: Path, record: dict[str, Any]) -> Self:
        """Load a verified snapshot, saved on this session's model and tokenizer (checked by the
        caller), into this session; nothing changes unless all of it loads."""
        settings = record["settings"]
        expected = json.loads(json.dumps(self._stream_settings(), default=str))
        for key in ("host", "stc", "system_prompt", "chunk_frames", "prefill_min_tokens"):
            if settings[key] != expected[key]:
                raise SnapshotError(f"the stream was saved with {key}={settings[key]!r}, this session has "
                                    f"{expected[key]!r}; make the session with the saved settings "
                                    "(StreamingSession.restore does)")
        if None not in (settings["preprocessor"], expected["preprocessor"]) and \
                settings["preprocessor"] != expected["preprocessor"]:
            raise SnapshotError(f"the stream was saved with preprocessor {settings['preprocessor']}, this session "
                                f"has {expected['preprocessor']}")
        if settings["cache_policy"]["class"] != expected["cache_policy"]["class"]:
            raise SnapshotError(f"the stream was saved with cache policy {settings['cache_policy']['class']}, this "
                                f"session makes {expected['cache_policy']['class']}")
        tree = join_tensors(record["state"], read_tensors(snapshot / "state.safetensors"))
        policy = self._cache_policy_factory()
        policy.bind(self.host.language_model)
        try:
            cache, stream, stats, pending = self._read_snapshot_state(snapshot, tree, policy)
        except BaseException:
            policy.close()  # what the new policy made outside the cache (a disk store's directory)
            raise
        # everything read: switch the session over
        if self._cacher_state is not None:
            self._cacher_state.load_state_dict(tree["cacher"], self._device)
        if self._pruner_state is not None:
            self._pruner_state.load_state_dict(tree["pruner"], self._device)
        previous = self._policy
        self._policy, self._cache, self._stream = policy, cache, stream
        previous.close()  # the replaced stream's offloaded files
        self._frames, self._last_timestamp = int(tree["frames"]), tree["last_timestamp"]
        self._last_kept = tree["last_kept"]
        self._waiting = [(item["pixels"], item["timestamp"]) for item in tree["waiting"]]
        self._pending, self._stats = pending, stats
        return self

    def _read_snapshot_state(self, snapshot: Path, tree: dict[str, Any], policy: CachePolicy
                             ) -> tuple[Cache, Any, SessionStats, list[tuple[Placed, CacheBlock]]]:
        """The saved cache (through `policy`), protocol stream, stats and pending pieces, checked
        against this session; the session itself is not touched."""
        cache = policy.restore(self.model.config, snapshot / "memory")
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.device != self._device:
                layer.keys, layer.values, layer.device = layer.keys.to(self._device), layer.values.to(self._device), self._device
        stream = self.host.new_stream(self.system_prompt)
        stream.load_state_dict(tree["stream"])
        if (tree["cacher"] is None) != (self._cacher_state is None) or (tree["pruner"] is None) != (self._pruner_state is None):
            raise SnapshotError("the saved STC state does not fit this session's STC settings")
        stats = SessionStats(**tree["stats"])
        stats.memory_kind = "cuda" if self._device.type == "cuda" else "rss"
        pending = [(Placed(item["embeds"].to(self._device), item["positions"], item["text"],
                           _saved_deepstack(item.get("deepstack"), self._device), lead=item["lead"]),
                    CacheBlock(**item["block"])) for item in tree["pending"]]
        return cache, stream, stats, pending

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
    def last_timestamp(self) -> float | None:
        """Timestamp of the last frame pushed, a frame waiting for its pair included (None when it
        carried none, or before a push): where a resumed source continues."""
        return next((t for _, t in reversed(self._waiting) if t is not None), self._last_timestamp)

    @property
    def last_kept_indices(self) -> list[list[int]] | None:
        """Per frame of the latest pushed chunk, the positions (ascending, in the frame's pooled token
        grid) the Pruner or selector kept; None when every token is kept (no pruning) or before a push."""
        return self._last_kept

    @property
    def last_recomputed(self) -> RecomputedTokens | None:
        """Which vision-tower tokens the Cacher recomputed in the latest pushed chunk, per layer and
        pruner frame, as cells of the frame's patch grid (`cells` None: the chunk refreshed, every
        token); None without a Cacher or before a push."""
        if self._cacher is None or self._last_chunk is None:
            return None
        return self.host.recomputed_tokens(self._last_chunk, self._cacher.last_recomputed(self._cacher_state))

    @property
    def last_pruner_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the token grid `last_kept_indices` index (row-major); None before a push."""
        return None if self._last_chunk is None else self.host.pruner_grid(self._last_chunk)

    @property
    def stats(self) -> SessionStats:
        """A snapshot of the stream's counters, with the peak memory read now."""
        stats = dataclasses.replace(self._stats)
        stats.peak_memory_bytes = peak_memory_bytes(self._device)
        if self._cacher_state is not None:
            stats.cacher = self._cacher_state.stats.to_dict()
        stats.pending_tokens = self._pending_tokens
        stats.memory = self._policy.memory_stats() or None
        stats.cache_tokens = self._cache.get_seq_length()
        stats.kv_cache_bytes = sum(
            layer.keys.nbytes + layer.values.nbytes
            for layer in self._cache.layers if getattr(layer, "keys", None) is not None
        )
        return stats


# -- persistence helpers ------------------------------------------------------------------------

_PREPROCESSORS = {cls.__name__: cls for cls in (FramePreprocessor, QwenVLPreprocessor)}


def _preprocessor_record(preprocessor: Any) -> dict[str, Any] | None:
    """A built-in preprocessor's class and fields (JSON); None for a custom one."""
    if type(preprocessor) not in _PREPROCESSORS.values():
        return None
    return json.loads(json.dumps({"class": type(preprocessor).__name__, "fields": asdict(preprocessor)}))


def _preprocessor_from_record(record: dict[str, Any] | None) -> Callable[[FrameInput], Sequence[torch.Tensor]] | None:
    if record is None:
        raise SnapshotError("the stream was saved with a custom preprocessor; pass the same one as preprocessor=")
    return _PREPROCESSORS[record["class"]](**record["fields"])


def _policy_factory(record: dict[str, Any]) -> Callable[[], CachePolicy]:
    """A factory of the saved cache policy: its class (among the imported `CachePolicy` subclasses)
    with its saved settings."""
    classes, found = [CachePolicy], None
    while classes:
        cls = classes.pop()
        if f"{cls.__module__}.{cls.__qualname__}" == record["class"]:
            found = cls
        classes.extend(cls.__subclasses__())
    if found is None:
        raise SnapshotError(f"the stream was saved with cache policy {record['class']}, which is not imported; "
                            "import its module or pass cache_policy=")
    settings = record["settings"]
    return lambda: found(**settings)


def _check_same_model(settings: dict[str, Any], model: PreTrainedModel, tokenizer: Any) -> None:
    """SnapshotError unless `model` and `tokenizer` are the ones the stream was saved with."""
    saved, now = settings["model"], model_fingerprint(model)
    for key, what in (("class", "a"), ("dtype", "dtype"), ("config_sha256", "config"), ("weights_sha256", "weights")):
        if saved[key] != now[key]:
            detail = f"{saved[key]}, this model is {now[key]}" if key in ("class", "dtype") else "differ"
            raise SnapshotError(f"the stream was saved on another model ({key.removesuffix('_sha256')}: {detail}); "
                                "restore it on the model it was saved with")
    if settings["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise SnapshotError("the stream was saved with another tokenizer (vocabulary, special tokens or chat "
                            "template differ); pass the model's own tokenizer")


__all__ = ["Answer", "CacheBlock", "CachePolicy", "FullCache", "SessionStats", "SlidingWindowCache", "StreamingSession"]
