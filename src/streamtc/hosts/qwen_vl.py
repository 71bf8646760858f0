"""Qwen2-VL and Qwen2.5-VL hosts (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`,
transformers 5.x); LiveCC-7B is a Qwen2-VL-7B and runs here with its own prompt protocol.

Video path. Frames are resized per frame (`QwenVLPreprocessor`, no torchvision), grouped into
temporal patches of two frames (the Conv3d patch embedding fuses them), and one chunk of frames is
one tower forward (`get_video_features` with its `video_grid_thw` row): one Cacher chunk, one Pruner
call, one pre-fill. The 2x2 patch merger gives h x w LLM tokens per temporal patch, and each temporal
patch is one pruner frame. Qwen2.5-VL's window attention and its window permutation stay inside
transformers' tower; the merged tokens come out in row-major order.

Positions (M-RoPE, as transformers 5.23's `get_rope_index` computes them for the one-shot sequence):
a video that starts at text position s gives the merged token (k, i, j) of temporal patch k the
position (s + floor(k * interval), s + i, s + j), interval = 1 for Qwen2-VL and
tokens_per_second * temporal_patch_size / fps for Qwen2.5-VL; the text after the video continues at
s + max(h, w) (transformers advances by the spatial extent, not by the largest temporal position).
A kept token keeps exactly that position; pruned tokens are simply absent. The session only calls
the language model with these explicit positions: transformers' sticky `model.model.rope_deltas` is
never read or written.

Prompt protocols:
    "video"   one growing video in one user turn (the ReKV-style protocol): the prefix up to
              `<|vision_start|>` is pre-filled at reset, temporal patches are appended as they
              arrive, and a question appends `<|vision_end|>`, the question and the generation
              prompt. A change of frame size closes the video and opens a second one in the same
              turn (`<|vision_end|><|vision_start|>`, positions restarting after the first video, as
              for a one-shot prompt with two videos): a new grid.
    "livecc"  LiveCC's: 2 fps, one user turn per chunk, "Time=t0-t1s" followed by the chunk's
              video, continuing one KV cache; the first chunk holds 6 frames (3 s), later chunks 2
              (one temporal patch, 1 s). A question is its own user turn followed by the generation
              prompt. (LiveCC's commentary mode also generates after each chunk; a question-answering
              stream does not, so consecutive user turns are what the one-shot prompt contains.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_window_index

from ..checks import positive_int
from ..errors import ConfigError, InputError, StreamStateError, UnsupportedModelError
from ..prompts import split_video_prompt
from ..pruner import KeptTokens
from .base import (
    Deepstack, EncodedChunk, HostStream, Placed, VideoEncoder, VideoHost, frames_in_sequence, no_deepstack,
)
from .qwen_preprocess import QwenVLPreprocessor, patchify_video

VIDEO_PLACEHOLDER = "<|video_pad|>"
DEFAULT_FPS = 2.0  # Qwen2.5-VL's processor default and LiveCC's sampling rate
LIVECC_FIRST_CHUNK_FRAMES = 6  # LiveCC's first turn: 3 s at 2 fps
LIVECC_MAX_PIXELS = 384 * 28 * 28  # LiveCC's per-frame pixel bound
_MARK = "\ue000"  # a private-use character standing for per-turn text while the template renders


# -- where a chunk's merged tokens sit -------------------------------------------------------------


def _valid_mask(indices: Tensor, lengths: Tensor | None, tokens_per_frame: int) -> Tensor:
    """[F, k] mask of real kept indices; InputError if indices are not [F, k] within [0, P)."""
    if not isinstance(indices, Tensor) or indices.dim() != 2:
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise InputError(f"kept indices must be a [frames, k] tensor, got {shape}")
    mask = torch.ones_like(indices, dtype=torch.bool)
    if lengths is not None:
        mask = torch.arange(indices.shape[1], device=indices.device)[None, :] < lengths[:, None]
    real = indices[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= tokens_per_frame):
        raise InputError(
            f"kept indices must lie in [0, {tokens_per_frame}) for this layout, "
            f"got values in [{int(real.min())}, {int(real.max())}]"
        )
    return mask


def _flat_positions(local: Tensor, mask: Tensor, frame_stride: int) -> Tensor:
    """Positions f * frame_stride + local[f, i] of the real kept tokens, frame by frame."""
    offsets = torch.arange(local.shape[0], device=local.device)[:, None] * frame_stride
    return (local + offsets)[mask]



@dataclass(frozen=True)
class QwenVLLayout:
    """Qwen2-VL / Qwen2.5-VL video tokens after the 2x2 patch merger.

    grid_thw is the video's `video_grid_thw` row (temporal patches, height and width in ViT
    patches). The LLM sees T = grid_t blocks of (grid_h / m) * (grid_w / m) merged tokens
    (m = spatial_merge_size), row-major, no separators; the pruner treats each temporal patch as
    one frame.
    """

    grid_thw: tuple[int, int, int]
    spatial_merge_size: int = 2

    def __post_init__(self) -> None:
        if len(self.grid_thw) != 3:
            raise ConfigError(f"grid_thw must be (t, h, w), got {self.grid_thw!r}")
        for name, value in zip(("grid_t", "grid_h", "grid_w"), self.grid_thw):
            positive_int(value, name)
        positive_int(self.spatial_merge_size, "spatial_merge_size")
        _, h, w = self.grid_thw
        if h % self.spatial_merge_size or w % self.spatial_merge_size:
            raise ConfigError(f"grid {h}x{w} is not divisible by spatial_merge_size {self.spatial_merge_size}")

    @property
    def merged_hw(self) -> tuple[int, int]:
        return self.grid_thw[1] // self.spatial_merge_size, self.grid_thw[2] // self.spatial_merge_size

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.merged_hw
        return h * w

    def frame_tokens(self, sequence: Tensor) -> Tensor:
        """[T * h * w, D] -> [T, h * w, D]."""
        p, t = self.tokens_per_frame, self.grid_thw[0]
        frames = frames_in_sequence(sequence, "QwenVLLayout", 0, p, f"{t} temporal patches * {p} merged tokens")
        if frames != t:
            raise InputError(f"QwenVLLayout: the sequence holds {frames} temporal patches but grid_thw says {t}")
        return sequence.view(t, p, -1)

    def kept_positions(self, indices: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Ascending positions of the kept merged tokens in the video's token block."""
        mask = _valid_mask(indices, lengths, self.tokens_per_frame)
        if indices.shape[0] != self.grid_thw[0]:
            raise InputError(
                f"QwenVLLayout: indices cover {indices.shape[0]} temporal patches, grid_thw says {self.grid_thw[0]}"
            )
        return _flat_positions(indices, mask, self.tokens_per_frame)

    def mrope_positions(
        self,
        indices: Tensor,
        lengths: Tensor | None = None,
        start_position: int = 0,
        time_interval: float | Tensor = 1.0,
        first_patch: int = 0,
    ) -> Tensor:
        """[3, M] (t, h, w) M-RoPE positions of the kept tokens, in `kept_positions` order.

        Same values the model gives these tokens in the unpruned sequence
        (`get_vision_position_ids` in transformers 5.x): t = start + floor(t_patch * time_interval),
        h = start + row, w = start + column. time_interval is 1 for Qwen2-VL and
        tokens_per_second * second_per_grid_t for Qwen2.5-VL. first_patch: index of this grid's
        first temporal patch in its video (a stream appends a video's patches chunk by chunk).
        """
        positions = self.kept_positions(indices, lengths)
        p = self.tokens_per_frame
        w = self.merged_hw[1]
        t_patch = torch.div(positions, p, rounding_mode="floor") + first_patch
        within = positions % p
        temporal = (t_patch * time_interval).long() + start_position
        return torch.stack([temporal, within // w + start_position, within % w + start_position])


# -- prompts and streams ---------------------------------------------------------------------------


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _system(system_prompt: str | None) -> list[dict[str, Any]]:
    return [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []


class _QwenStream(HostStream):
    """Shared M-RoPE bookkeeping: token ids, embeddings and the positions of one chunk's tokens."""

    position_rows = 3

    def __init__(self, host: QwenVLHost) -> None:
        self.host = host
        self.next_position = 0

    def _ids(self, text: str) -> list[int]:
        return self.host.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _text_piece(self, text: str) -> Placed:
        ids = self._ids(text)
        return Placed(self.host.embed(ids), self.text_positions(len(ids)), len(ids))

    def _video(self, chunk: EncodedChunk, kept: KeptTokens | None, start: int, first_patch: int) -> list[Placed]:
        """One piece per temporal patch: its kept tokens at (start + t, start + i, start + j), with
        the same rows of every DeepStack level when the chunk has them."""
        frames, h, w = chunk.grid
        layout = QwenVLLayout((frames, h * self.host.merge, w * self.host.merge), self.host.merge)
        if kept is None:
            indices, lengths, counts = torch.arange(h * w).expand(frames, -1), None, [h * w] * frames
        else:
            indices, lengths, counts = kept.indices.cpu(), kept.lengths, kept.frame_counts()
        lengths = None if lengths is None else lengths.cpu()
        positions = layout.mrope_positions(indices, lengths, start, self.host.time_interval, first_patch)
        tokens = chunk.features if kept is None else kept.tokens
        return [Placed(tokens[f, :count], part, 0, self._deepstack(chunk, f, indices[f, :count]))
                for f, (count, part) in enumerate(zip(counts, positions.split(counts, dim=1)))]

    @staticmethod
    def _deepstack(chunk: EncodedChunk, frame: int, kept: Tensor) -> Deepstack | None:
        """DeepStack inputs of temporal patch `frame`'s kept rows `kept` [n]: the same rows of every
        level as of the main features, in the same order."""
        if chunk.deepstack is None:
            return None
        features = chunk.deepstack[:, frame].index_select(1, kept.to(chunk.deepstack.device))  # [L, n, D]
        return Deepstack(torch.ones(kept.numel(), dtype=torch.bool, device=features.device), features)

    @staticmethod
    def _fold(lead: Placed | None, pieces: list[Placed], tail: Placed | None) -> list[Placed]:
        """Text before / after a chunk joins its first / last piece (one cache block each)."""
        if lead is not None:
            first = pieces[0]
            pieces[0] = Placed(torch.cat([lead.embeds.to(first.embeds.dtype), first.embeds]),
                               torch.cat([lead.positions, first.positions], dim=1), first.text + lead.text,
                               Deepstack.concat([(lead.text, None), (first.embeds.shape[0], first.deepstack)]),
                               lead=first.lead + lead.text)
        if tail is not None:
            last = pieces[-1]
            pieces[-1] = Placed(torch.cat([last.embeds, tail.embeds.to(last.embeds.dtype)]),
                                torch.cat([last.positions, tail.positions], dim=1), last.text + tail.text,
                                Deepstack.concat([(last.embeds.shape[0], last.deepstack), (tail.text, None)]),
                                lead=last.lead)
        return pieces


class QwenVideoStream(_QwenStream):
    """Protocol "video": one growing video in one user turn (see the module docstring)."""

    def __init__(self, host: QwenVLHost, system_prompt: str | None) -> None:
        super().__init__(host)
        self.system_prompt = system_prompt
        self.prefix_text = split_video_prompt(host.tokenizer, "?", system_prompt, VIDEO_PLACEHOLDER).prefix
        two_videos = _render(host.tokenizer, _system(system_prompt) + [{"role": "user", "content": [
            {"type": "video"}, {"type": "video"}, {"type": "text", "text": "?"}]}], True)
        parts = two_videos.split(VIDEO_PLACEHOLDER)
        if len(parts) != 3:
            raise ConfigError(f"the chat template must render one {VIDEO_PLACEHOLDER} per video, got {two_videos!r}")
        self.separator = parts[1]  # between two videos of one turn: <|vision_end|><|vision_start|>
        self.video_start = 0
        self.patches = 0  # temporal patches of the current video
        self.grid: tuple[int, int] | None = None

    def prefix_ids(self) -> list[int]:
        ids = self._ids(self.prefix_text)
        self.next_position = self.video_start = len(ids)
        return ids

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "video_start": self.video_start, "patches": self.patches,
                "grid": None if self.grid is None else list(self.grid)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.video_start, self.patches = int(state["video_start"]), int(state["patches"])
        self.grid = None if state["grid"] is None else (int(state["grid"][0]), int(state["grid"][1]))

    def place(self, chunk: EncodedChunk, kept: KeptTokens | None, first_frame: int,
              timestamps: Sequence[float] | None) -> list[Placed]:
        _, h, w = chunk.grid
        lead = None
        if self.grid is not None and self.grid != (h, w):  # a new frame size: a second video
            lead = self._text_piece(self.separator)
            self.video_start, self.patches = self.next_position, 0
        pieces = self._video(chunk, kept, self.video_start, self.patches)
        self.patches += chunk.grid[0]
        self.grid = (h, w)
        self.next_position = self.video_start + max(h, w)
        return self._fold(lead, pieces, None)

    def question_embeds(self, question: str, answer_prefix: str = "") -> Tensor:
        prompt = split_video_prompt(self.host.tokenizer, question, self.system_prompt, VIDEO_PLACEHOLDER)
        if prompt.prefix != self.prefix_text:
            raise StreamStateError(
                "the chat template puts question-dependent text before the video; a stream cannot pre-fill it"
            )
        return self.host.embed(self._ids(prompt.suffix + answer_prefix))[None]


class LiveCCStream(_QwenStream):
    """Protocol "livecc": one user turn "Time=t0-t1s" + video per chunk (see the module docstring)."""

    def __init__(self, host: QwenVLHost, system_prompt: str | None) -> None:
        super().__init__(host)
        chunk_turn = {"role": "user", "content": [{"type": "text", "text": _MARK}, {"type": "video"}]}
        system = _system(system_prompt)
        one = _render(host.tokenizer, system + [chunk_turn], False)
        two = _render(host.tokenizer, system + [chunk_turn, chunk_turn], False)
        turn = two[len(one):]
        if not one.endswith(turn) or turn.count(VIDEO_PLACEHOLDER) != 1 or _MARK not in turn:
            raise ConfigError("the chat template does not render each chunk turn the same way; "
                              "the LiveCC protocol needs repeatable user turns")
        self.prefix_text = one[: len(one) - len(turn)]
        self.turn_open, self.turn_close = turn.split(VIDEO_PLACEHOLDER)
        question_turn = {"role": "user", "content": [{"type": "text", "text": _MARK}]}
        self.question_turn = _render(host.tokenizer, system + [chunk_turn, question_turn], True)[len(one):]

    def prefix_ids(self) -> list[int]:
        ids = self._ids(self.prefix_text)
        self.next_position = len(ids)
        return ids

    def place(self, chunk: EncodedChunk, kept: KeptTokens | None, first_frame: int,
              timestamps: Sequence[float] | None) -> list[Placed]:
        fps = self.host.fps
        begin = timestamps[0] if timestamps else first_frame / fps
        end = (timestamps[-1] if timestamps else (first_frame + chunk.frames - 1) / fps) + 1 / fps
        lead = self._text_piece(self.turn_open.replace(_MARK, f"Time={begin:.1f}-{end:.1f}s"))
        start = self.next_position
        pieces = self._video(chunk, kept, start, 0)
        _, h, w = chunk.grid
        self.next_position = start + max(h, w)
        return self._fold(lead, pieces, self._text_piece(self.turn_close))

    def question_embeds(self, question: str, answer_prefix: str = "") -> Tensor:
        return self.host.embed(self._ids(self.question_turn.replace(_MARK, question) + answer_prefix))[None]


class QwenVLHost(VideoHost):
    """Qwen2-VL / Qwen2.5-VL: per-frame resolution, temporal patches of 2 frames, 2x2 merger, M-RoPE.

    fps: the frame rate the stream is sampled at (Qwen2.5-VL's temporal positions and LiveCC's
    time labels depend on it; Qwen2-VL's positions do not).
    """

    model_classes: ClassVar = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    frames_per_step = 2
    protocols = ("video", "livecc")
    default_fps = DEFAULT_FPS
    fps_in_prompt = True

    @classmethod
    def tower_class(cls, model_class: type) -> type[nn.Module]:
        if issubclass(model_class, Qwen2_5_VLForConditionalGeneration):
            return Qwen2_5_VisionTransformerPretrainedModel
        return Qwen2VisionTransformerPretrainedModel

    def __init__(self, model: Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration, tokenizer: Any,
                 protocol: str | None = None, fps: float = DEFAULT_FPS) -> None:
        super().__init__(model, tokenizer, protocol)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise ConfigError(f"fps must be > 0, got {fps!r}")
        vision = model.config.vision_config
        self.fps = float(fps)
        self.merge = int(vision.spatial_merge_size)
        self.frames_per_step = int(vision.temporal_patch_size)
        tokens_per_second = getattr(vision, "tokens_per_second", None)
        if isinstance(model, Qwen2_5_VLForConditionalGeneration):
            # as transformers: tokens_per_second * second_per_grid_t, the latter a float32 tensor
            self.time_interval: float | Tensor = tokens_per_second * torch.tensor(
                self.frames_per_step / self.fps, dtype=torch.float32)
        else:
            self.time_interval = 1.0

    @property
    def partial_chunks(self) -> bool:
        return self.protocol == "video"

    def settings(self) -> dict[str, Any]:
        return {"fps": self.fps}

    def chunk_frames(self, requested: int | None, first: bool) -> int:
        if self.protocol == "livecc" and first:
            return LIVECC_FIRST_CHUNK_FRAMES
        return requested or self.frames_per_step

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def projector(self) -> nn.Module:
        return self.model.model.visual.merger

    def tower_frames(self, args: tuple, kwargs: dict[str, Any]) -> int:
        return int(kwargs["grid_thw"][:, 0].sum()) * self.frames_per_step

    def split_tower_tokens(self, tokens: Tensor, tower_kwargs: dict[str, Any]) -> list[Tensor]:
        """Merger input [T * gh * gw, C] (Qwen2.5-VL: in window order) -> one [gh * gw, C] per temporal patch."""
        return list(tokens.view(int(tower_kwargs["grid_thw"][:, 0].sum()), -1, tokens.shape[-1]))

    def tower_cells(self, chunk: EncodedChunk) -> tuple[Tensor, tuple[int, int]]:
        """A temporal patch's tower tokens come in 2x2 merge-block order (block row-major, then the
        patch within the block), and in Qwen2.5-VL permuted into window order by whole merge blocks."""
        _, h, w = chunk.grid
        m = self.merge
        token = torch.arange(h * w * m * m)
        block, inner = token // (m * m), token % (m * m)
        cells = ((block // w) * m + inner // m) * (w * m) + (block % w) * m + inner % m
        if isinstance(self.vision_tower, Qwen2_5_VisionTransformerPretrainedModel):
            vision = self.model.config.vision_config
            window_index, _ = get_vision_window_index(torch.tensor([[1, h * m, w * m]]), m, vision.window_size,
                                                      vision.patch_size)
            cells = cells.view(-1, m * m)[window_index].flatten()
        return cells, (h * m, w * m)

    def pruner_grid(self, chunk: EncodedChunk) -> tuple[int, int]:
        """The merged grid: one LLM token per 2x2 merge block."""
        return chunk.grid[1], chunk.grid[2]

    def default_preprocessor(self) -> QwenVLPreprocessor:
        preprocessor = QwenVLPreprocessor.from_model_config(self.model.config)
        if self.protocol == "livecc":
            return dataclasses.replace(preprocessor, max_pixels=LIVECC_MAX_PIXELS)
        return preprocessor

    @classmethod
    def preprocessor_from_pretrained(cls, path_or_id: str | Path, protocol: str | None = None) -> QwenVLPreprocessor:
        overrides = {"max_pixels": LIVECC_MAX_PIXELS} if protocol == "livecc" else {}
        return QwenVLPreprocessor.from_pretrained(path_or_id, **overrides)

    def encode(self, pixels: Sequence[Tensor], encoder: VideoEncoder | None = None) -> EncodedChunk:
        """Patchify the chunk (an odd last frame repeated), one tower forward, merged tokens [T, h * w, D]."""
        if encoder is not None:
            raise UnsupportedModelError("custom video encoders (ToMe) run on LLaVA-OneVision hosts only; on Qwen-VL "
                                        "use ToMe on the merged tokens: selector=ToMeTokenMerger(...)")
        vision = self.model.config.vision_config
        rows, (t, gh, gw) = patchify_video(torch.stack(list(pixels)), vision.patch_size, vision.temporal_patch_size,
                                           self.merge)
        grid = torch.tensor([[t, gh, gw]], device=self.device)
        output = self.model.model.get_video_features(
            pixel_values_videos=rows.to(self.device, self.vision_tower.dtype), video_grid_thw=grid, return_dict=True)
        h, w = gh // self.merge, gw // self.merge
        levels = getattr(output, "deepstack_features", None)  # Qwen3-VL: per level, one tensor per video
        deepstack = torch.stack([level[0].view(t, h * w, -1) for level in levels]) if levels else None
        return EncodedChunk(output.pooler_output[0].view(t, h * w, -1), len(pixels), (t, h, w), deepstack)

    def forward(self, embeds: Tensor, positions: Tensor, cache: Cache, deepstack: Deepstack | None = None) -> Tensor:
        if positions.shape[0] != 3:
            raise InputError(f"Qwen-VL takes M-RoPE positions [3, n], got {tuple(positions.shape)}")
        output = self.model.model.language_model(
            inputs_embeds=embeds.to(self.model.dtype),
            position_ids=positions[:, None, :].to(self.device),
            past_key_values=cache,
            use_cache=True,
            **self._deepstack_inputs(deepstack),
        )
        return output.last_hidden_state[:, -1]

    def _deepstack_inputs(self, deepstack: Deepstack | None) -> dict[str, Any]:
        """The language model's DeepStack keyword arguments: none for Qwen2-VL / Qwen2.5-VL."""
        no_deepstack(self, deepstack)
        return {}

    def new_stream(self, system_prompt: str | None) -> HostStream:
        if self.protocol == "livecc":
            return LiveCCStream(self, system_prompt)
        return QwenVideoStream(self, system_prompt)


__all__ = ["DEFAULT_FPS", "LIVECC_FIRST_CHUNK_FRAMES", "LIVECC_MAX_PIXELS", "LiveCCStream", "QwenVLHost",
           "QwenVLLayout", "QwenVideoStream"]
