"""Qwen3-VL host (`Qwen3VLForConditionalGeneration`, transformers 5.x): the Qwen2-VL host's video
path and prompt handling with Qwen3-VL's three differences.

1. Text timestamps instead of temporal positions. transformers' `Qwen3VLProcessor` writes each
   temporal patch (two frames) of a video as `<t seconds><|vision_start|>` + its merged tokens +
   `<|vision_end|>`, t = the mean time of the patch's first and last frame (an odd last frame is
   repeated, so its patch's time is that frame's), formatted with one decimal. The chat template's
   own `<|vision_start|>` / `<|vision_end|>` stay around the whole video: transformers 5.x replaces
   only the `<|video_pad|>` between them. `get_rope_index` splits the video's grid into one grid per
   temporal patch, so each patch is its own M-RoPE group: its token (i, j) at (s, s + i, s + j) with
   s the position the patch starts at, the text after it continuing at s + max(h, w).
2. DeepStack. Three extra mergers read the vision tower's hidden states after blocks 5, 11, 17
   (2B, 4B) or 8, 16, 24 (8B); their outputs are added to the outputs of LLM layers 0, 1, 2 at the
   visual positions. A chunk carries them (`EncodedChunk.deepstack` [L, T, h * w, D]); a kept token
   keeps the same row of every level (`Placed.deepstack`), and the pre-fill passes them with a mask
   of the visual rows (`visual_pos_masks`, `deepstack_visual_embeds` of the language model).
3. Preprocessing: 16-px patches, mean = std = 0.5, per-frame pixel bounds (see `streamtc.preprocess`).

Protocol "video" only (one growing video in one user turn, as for Qwen2-VL): the prefix up to the
template's `<|vision_start|>` is pre-filled at reset, temporal patches are appended as they arrive,
and a question appends the template's `<|vision_end|>`, the question and the generation prompt. A
change of frame size opens a second video in the same turn (`<|vision_end|><|vision_start|>`).
Timestamps are the stream's (`push(frames, timestamps)`), else frame index / fps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from .qwen_preprocess import (
    QWEN3_VL_MEAN,
    QWEN3_VL_STD,
    QWEN3_VL_VIDEO_MAX_PIXELS,
    QWEN3_VL_VIDEO_MIN_PIXELS,
    QwenVLPreprocessor,
)
from ..pruner import KeptTokens
from .base import Deepstack, EncodedChunk, Placed
from .qwen_vl import QwenVideoStream, QwenVLHost

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


def timestamp_text(seconds: float) -> str:
    """A temporal patch's time label as Qwen3-VL's processor writes it."""
    return f"<{seconds:.1f} seconds>"


def patch_times(timestamps: Sequence[float], temporal_patch_size: int = 2) -> list[float]:
    """Per temporal patch, the mean of its first and last frame's time (an odd last frame repeated)."""
    return [(timestamps[i] + timestamps[min(i + temporal_patch_size, len(timestamps)) - 1]) / 2
            for i in range(0, len(timestamps), temporal_patch_size)]


class Qwen3VideoStream(QwenVideoStream):
    """Protocol "video" with Qwen3-VL's per-patch timestamps and M-RoPE groups."""

    def place(self, chunk: EncodedChunk, kept: KeptTokens | None, first_frame: int,
              timestamps: Sequence[float] | None) -> list[Placed]:
        host = self.host
        _, h, w = chunk.grid
        stamps = timestamps or [(first_frame + i) / host.fps for i in range(chunk.frames)]
        separator = self.grid is not None and self.grid != (h, w)  # a new frame size: a second video
        self.grid = (h, w)
        pieces = []
        for f, seconds in enumerate(patch_times(stamps, host.frames_per_step)):
            lead = (self.separator if separator and f == 0 else "") + timestamp_text(seconds) + VISION_START
            lead_piece = self._text_piece(lead)
            patch = dataclasses.replace(chunk, features=chunk.features[f : f + 1], grid=(1, h, w), deepstack=(
                None if chunk.deepstack is None else chunk.deepstack[:, f : f + 1]))
            patch_kept = None if kept is None else KeptTokens(
                kept.tokens[f : f + 1], kept.indices[f : f + 1],
                None if kept.lengths is None else kept.lengths[f : f + 1])
            start = self.next_position
            video = self._video(patch, patch_kept, start, 0)
            self.next_position = start + max(h, w)
            pieces += self._fold(lead_piece, video, self._text_piece(VISION_END))
        return pieces


class Qwen3VLHost(QwenVLHost):
    """Qwen3-VL: Qwen-VL's video path with text timestamps and DeepStack (see the module docstring)."""

    model_classes: ClassVar = (Qwen3VLForConditionalGeneration,)
    protocols = ("video",)

    @classmethod
    def tower_class(cls, model_class: type) -> type[nn.Module]:
        return Qwen3VLVisionModel

    @staticmethod
    def _frame_settings(preprocessor: QwenVLPreprocessor, **overrides: Any) -> QwenVLPreprocessor:
        """Per-frame bounds and Qwen3-VL's small-frame rule (explicit overrides win)."""
        bounds = {"min_pixels": QWEN3_VL_VIDEO_MIN_PIXELS, "max_pixels": QWEN3_VL_VIDEO_MAX_PIXELS}
        return dataclasses.replace(preprocessor, **{**bounds, **overrides}, upscale_small_frames=True)

    def default_preprocessor(self) -> QwenVLPreprocessor:
        return self._frame_settings(QwenVLPreprocessor.from_model_config(self.model.config),
                                    image_mean=QWEN3_VL_MEAN, image_std=QWEN3_VL_STD)

    @classmethod
    def preprocessor_from_pretrained(cls, path_or_id: str | Path, protocol: str | None = None) -> QwenVLPreprocessor:
        """The checkpoint's processor settings with per-frame bounds: its video processor's `size`
        bounds a whole clip (frames x pixels), which a stream does not have."""
        return cls._frame_settings(QwenVLPreprocessor.from_pretrained(path_or_id))

    def _deepstack_inputs(self, deepstack: Deepstack | None) -> dict[str, Any]:
        if deepstack is None:
            return {}
        dtype = self.model.dtype
        return {"visual_pos_masks": deepstack.visual[None].to(self.device),
                "deepstack_visual_embeds": list(deepstack.features.to(self.device, dtype))}

    def new_stream(self, system_prompt: str | None) -> Qwen3VideoStream:
        return Qwen3VideoStream(self, system_prompt)


__all__ = ["Qwen3VLHost", "Qwen3VideoStream", "patch_times", "timestamp_text"]
