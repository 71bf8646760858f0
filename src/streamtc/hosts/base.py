"""The host interface: what a `StreamingSession` needs from one VideoLLM family, and nothing more.

A host owns everything specific to its family: frame preprocessing to the model's pixel inputs, the
video feature path (one vision-tower forward = one Cacher chunk, projector/merger, pooling), the
token layout handed to the Pruner, the LLM's embeddings and forward, the positions of kept tokens,
the chat-template pieces around the video, and how a question is appended. The session only pushes
frames, prunes, pre-fills and decodes through it; it never reads `model.model.*` itself.

Two objects per family:

    host = LlavaOnevisionHost(model, tokenizer)       # stateless, shared by every stream on the model
    stream = host.new_stream(system_prompt)          # one stream's prompt and position state

    stream.prefix_ids()                               # the chat prompt pre-filled at reset
    chunk = host.encode(pixels)                       # EncodedChunk: features [F, P, D] for the Pruner
    pieces = stream.place(chunk, kept, frames, stamps)   # per pruner frame: embeds [n, D], positions [R, n]
    embeds = stream.question_embeds(question)         # the prompt after the video, for one question
    positions = stream.text_positions(n)              # positions of n text tokens (advances the stream)

Positions are [R, n]: R = 1 for plain 1-D RoPE, R = 3 for M-RoPE (t, h, w). Qwen3-VL's DeepStack
adds per-level features at the visual rows of the first LLM layers: a chunk carries them
(`EncodedChunk.deepstack`), each piece the rows of its kept tokens (`Placed.deepstack`), and the
pre-fill hands them to `forward`. A stream's
`next_position` is where the next text token goes; the session saves and restores it around each
question, so questions leave no trace.

Adding a family is one module with a `VideoHost` and a `HostStream` subclass, registered in
`streamtc.hosts.HOST_CLASSES`, plus a preset entry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from ..cacher.towers import find_vision_tower
from ..errors import ConfigError, InputError, UnsupportedModelError
from ..pruner import KeptTokens

# (host, pixel_values [F, 3, S, S]) -> visual tokens [F, P, D]: a replacement for the video path.
VideoEncoder = Callable[["VideoHost", Tensor], Tensor]


@dataclass(frozen=True)
class EncodedChunk:
    """One vision-tower forward's output, as the Pruner sees it.

    features: [F, P, D] prunable tokens, one row per pruner frame (a video frame for LLaVA-OV, a
        temporal patch of two frames for Qwen-VL). frames: video frames covered (before padding).
    grid: (T, h, w) of the merged token grid for M-RoPE hosts (T = F), else None.
    deepstack: [L, F, P, D] DeepStack features of the same tokens, one level per extra merger
        (Qwen3-VL), else None. Pruning keeps the same rows of every level as of `features`.
    """

    features: Tensor
    frames: int
    grid: tuple[int, int, int] | None = None
    deepstack: Tensor | None = None


@dataclass(frozen=True)
class Deepstack:
    """DeepStack inputs of n tokens: visual [n] bool marks the visual rows; features [L, v, D]
    (v = visual.sum()) are what LLM layer l < L adds to its output at those rows, in order."""

    visual: Tensor
    features: Tensor

    @staticmethod
    def concat(parts: Sequence[tuple[int, Deepstack | None]]) -> Deepstack | None:
        """The inputs of consecutive pieces (token count, their inputs or None for none) joined;
        None when no piece has any."""
        present = [d for _, d in parts if d is not None]
        if not present:
            return None
        visual = torch.cat([torch.zeros(n, dtype=torch.bool, device=present[0].visual.device) if d is None
                            else d.visual for n, d in parts])
        return Deepstack(visual, torch.cat([d.features for d in present], dim=1))


@dataclass(frozen=True)
class RecomputedTokens:
    """Which vision-tower tokens the Cacher recomputed in one chunk, on each pruner frame's patch grid.

    grid: (rows, cols) of the tower's patch grid (before any pooling or merging).
    cells: [L, F, k] per layer and pruner frame, the row-major grid cells of the recomputed tokens;
        None when the chunk refreshed (every token in every layer).
    """

    grid: tuple[int, int]
    cells: Tensor | None

    def counts(self) -> Tensor | None:
        """[F, rows * cols]: per pruner frame and cell, in how many layers the token was recomputed
        (None for a refresh: every token in every layer)."""
        if self.cells is None:
            return None
        layers, frames, k = self.cells.shape
        counts = torch.zeros(frames, self.grid[0] * self.grid[1], dtype=torch.long)
        return counts.scatter_add_(1, self.cells.transpose(0, 1).reshape(frames, -1),
                                   torch.ones(frames, layers * k, dtype=torch.long))


@dataclass(frozen=True)
class Placed:
    """Tokens to append for one pruner frame: embeds [n, D] and their positions [R, n]; `text`
    of them are prompt text the protocol puts around the chunk (the rest are visual tokens), the
    first `lead` of them before the visual tokens, the others after; `deepstack`: their DeepStack
    inputs (Qwen3-VL), else None."""

    embeds: Tensor
    positions: Tensor
    text: int = 0
    deepstack: Deepstack | None = None
    lead: int = 0


class HostStream(ABC):
    """One stream's prompt and position state on a host (see the module docstring)."""

    next_position: int

    @abstractmethod
    def prefix_ids(self) -> list[int]:
        """Token ids of the chat prompt before the first video token (pre-filled at reset);
        advances `next_position` past them."""

    @abstractmethod
    def place(self, chunk: EncodedChunk, kept: KeptTokens | None, first_frame: int,
              timestamps: Sequence[float] | None) -> list[Placed]:
        """The tokens one encoded chunk appends, one `Placed` per pruner frame, in order: the kept
        tokens (all when kept is None) at their positions, with any text the protocol puts around
        the chunk folded into the first and last piece. Advances the stream."""

    @abstractmethod
    def question_embeds(self, question: str, answer_prefix: str = "") -> Tensor:
        """Embeddings [1, n, D] of everything after the video for one question (the rest of the
        chat prompt and the generation prompt), then `answer_prefix` (text the answer turn starts
        with); pre-filled at `text_positions(n)`."""

    def text_positions(self, count: int) -> Tensor:
        """Positions [R, count] of the next count text tokens; advances `next_position`."""
        positions = torch.arange(self.next_position, self.next_position + count)
        self.next_position += count
        return positions[None].expand(self.position_rows, -1)

    def state_dict(self) -> dict[str, Any]:
        """The stream's protocol and position state as JSON values (a saved stream)."""
        return {"next_position": self.next_position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned (on a fresh stream of the same host and prompt)."""
        self.next_position = int(state["next_position"])

    position_rows: ClassVar[int] = 1


class VideoHost(ABC):
    """A VideoLLM family behind the session (see the module docstring).

    model_classes: the transformers classes this host runs. frames_per_step: video frames one
    vision forward needs at least (2 for a temporal patch). partial_chunks: whether a push may
    encode fewer than `chunk_frames` frames (one growing video) or chunks are fixed turns.
    protocols: the prompt protocols it runs, the default first. default_fps: the rate a stream is
    sampled at by default; fps_in_prompt: whether the prompt is built on that rate (temporal
    positions, time labels), so that a stream sampled at another rate reads wrong times.
    """

    model_classes: ClassVar[tuple[type[PreTrainedModel], ...]] = ()
    frames_per_step: ClassVar[int] = 1
    protocols: ClassVar[tuple[str, ...]] = ("video",)
    default_fps: ClassVar[float] = 1.0  # frames per second a stream is sampled at by default
    fps_in_prompt: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def tower_class(cls, model_class: type[PreTrainedModel]) -> type[nn.Module]:
        """The vision tower class inside `model_class` (what the Cacher would patch)."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, protocol: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.protocol = protocol or self.protocols[0]
        if self.protocol not in self.protocols:
            raise ConfigError(
                f"{type(self).__name__} runs the prompt protocols {', '.join(self.protocols)}; got {protocol!r}"
            )
        self.device = next(model.parameters()).device

    # -- properties the session and tools read -----------------------------------------------

    @property
    def partial_chunks(self) -> bool:
        return True

    @property
    def tokens_per_frame(self) -> int | None:
        """Uncompressed tokens of one pruner frame when fixed by the config, else None."""
        return None

    def chunk_frames(self, requested: int | None, first: bool) -> int:
        """Frames per vision forward: `requested` (default: one step), for the first chunk too."""
        return requested or self.frames_per_step

    def settings(self) -> dict[str, Any]:
        """Keyword options this host was built with beyond model, tokenizer and protocol (JSON
        values; `host_for(model, tokenizer, protocol, **settings)` builds it again)."""
        return {}

    @property
    @abstractmethod
    def vision_tower(self) -> nn.Module:
        """The vision tower module (one forward per chunk; benchmarks time it)."""

    @property
    @abstractmethod
    def projector(self) -> nn.Module:
        """The module whose input is the tower's output tokens (projector or patch merger)."""

    def tower_frames(self, args: tuple, kwargs: dict[str, Any]) -> int:
        """Video frames one vision-tower call (its positional and keyword arguments) encodes."""
        return args[0].shape[0]

    def split_tower_tokens(self, tokens: Tensor, tower_kwargs: dict[str, Any]) -> list[Tensor]:
        """The projector's input (the tower's output tokens) as one [T, C] tensor per pruner frame."""
        return list(tokens)

    @property
    def supports_cacher(self) -> bool:
        """Whether STC-Cacher can attach to this host's vision tower."""
        try:
            find_vision_tower(self.model)
        except UnsupportedModelError:
            return False
        return True

    # -- vision ------------------------------------------------------------------------------

    @abstractmethod
    def default_preprocessor(self) -> Callable[[Any], Any]:
        """frames -> per-frame pixel tensors [F][3, H, W], from the model config's defaults."""

    @classmethod
    @abstractmethod
    def preprocessor_from_pretrained(cls, path_or_id: str | Path, protocol: str | None = None) -> Callable[[Any], Any]:
        """The preprocessor a checkpoint's processor files describe (for that prompt protocol)."""

    @abstractmethod
    def encode(self, pixels: Sequence[Tensor], encoder: VideoEncoder | None = None) -> EncodedChunk:
        """One vision-tower forward on one chunk's per-frame pixels [3, H, W] (equal sizes)."""

    def tower_cells(self, chunk: EncodedChunk) -> tuple[Tensor, tuple[int, int]]:
        """For one pruner frame of `chunk`: the row-major patch-grid cell of each tower token, in the
        order the tower's layers hold them ([T]), and the grid (rows, cols)."""
        raise UnsupportedModelError(f"{type(self).__name__} does not map its tower tokens to the frame")

    def pruner_grid(self, chunk: EncodedChunk) -> tuple[int, int]:
        """(rows, cols) of the token grid the Pruner's positions index, row-major."""
        raise UnsupportedModelError(f"{type(self).__name__} does not describe its pruner grid")

    def recomputed_tokens(self, chunk: EncodedChunk, indices: Tensor | None) -> RecomputedTokens:
        """The Cacher's record of one chunk (`STCCacher.last_recomputed`: [L, F, k] tower token
        positions, None for a refresh) mapped to grid cells."""
        cells, grid = self.tower_cells(chunk)
        return RecomputedTokens(grid, None if indices is None else cells[indices.cpu()])

    def tower_hidden_states(self, pixel_values: Tensor) -> Tensor:
        """The tower's tokens at the layer the projector reads, [F, T, C] (token-merging baselines)."""
        raise UnsupportedModelError(f"{type(self).__name__} does not expose per-layer tower tokens")

    def project(self, hidden: Tensor) -> Tensor:
        """The projector on tower tokens [F, T, C] -> [F, T, D], without pooling."""
        raise UnsupportedModelError(f"{type(self).__name__} does not expose its projector separately")

    # -- language model ----------------------------------------------------------------------

    @property
    def language_model(self) -> nn.Module:
        """The LLM decoder stack (what `forward` runs; cache policies may hook its layers)."""
        return self.model.model.language_model

    def embed(self, ids: Sequence[int]) -> Tensor:
        """Input embeddings [n, D] of token ids."""
        return self.model.get_input_embeddings()(torch.tensor(list(ids), device=self.device))

    @abstractmethod
    def forward(self, embeds: Tensor, positions: Tensor, cache: Cache, deepstack: Deepstack | None = None) -> Tensor:
        """Pre-fill embeds [1, n, D] at positions [R, n] into `cache`, with their DeepStack inputs
        (hosts without DeepStack take None); returns the last hidden state [1, D]."""

    def stop_token_ids(self) -> set[int]:
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

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits [1, V] of a final hidden state [1, D]."""
        return self.model.lm_head(hidden)

    @abstractmethod
    def new_stream(self, system_prompt: str | None) -> HostStream:
        """Fresh prompt and position state for one stream."""


def frames_in_sequence(sequence: Tensor, layout: str, special: int, block: int, description: str) -> int:
    """Number of frames in a visual sequence [F * block + special, D]; InputError naming `layout`
    and the expected `description` if it does not fit."""
    if not isinstance(sequence, Tensor) or sequence.dim() != 2:
        shape = tuple(sequence.shape) if isinstance(sequence, Tensor) else type(sequence).__name__
        raise InputError(f"{layout}: the visual sequence must be a [N, D] tensor, got {shape}")
    n = sequence.shape[0] - special
    if n < block or n % block:
        raise InputError(
            f"{layout}: a sequence of {sequence.shape[0]} tokens does not match the layout "
            f"({description}); check tokens per frame and the number of frames"
        )
    return n // block


def no_deepstack(host: VideoHost, deepstack: Deepstack | None) -> None:
    """Raise for DeepStack inputs handed to a host without DeepStack (a programming error upstream)."""
    if deepstack is not None:
        raise UnsupportedModelError(f"{type(host).__name__} has no DeepStack layers; got DeepStack inputs")


__all__ = ["Deepstack", "EncodedChunk", "HostStream", "Placed", "RecomputedTokens", "VideoEncoder", "VideoHost",
           "frames_in_sequence", "no_deepstack"]
