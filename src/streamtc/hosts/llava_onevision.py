"""LLaVA-OneVision host (`LlavaOnevisionForConditionalGeneration`, transformers 5.x).

Sequence layout. LLaVA-OneVision's processor expands the `<video>` placeholder of its chat prompt
into every frame's pooled tokens followed by one `image_newline` token, so the one-shot sequence is

    [prefix of the chat prompt] [frame 1 tokens] ... [frame F tokens] [newline] [rest of the prompt]

The stream builds exactly that sequence incrementally: the prefix (system turn and
`<|im_start|>user `) is pre-filled at reset, each frame's tokens are appended as they arrive, and
at question time the newline is prepended *virtually* to the question's tokens, since in a stream
the "last frame" is whatever arrived last. Positions are plain 1-D positions (Qwen2 RoPE), one per
token actually in the sequence: pruned tokens are absent, so the kept tokens of later frames sit on
consecutive positions, as in ReKV + STC.

Video path: the tower at `vision_feature_layer` with the select strategy, the 2-layer projector,
bilinear pooling of the 27x27 grid to 14x14 (`get_video_features`), one frame = one pruner frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlavaOnevisionForConditionalGeneration, SiglipVisionModel
from transformers.cache_utils import Cache

from ..checks import positive_int
from ..errors import InputError, StreamStateError, UnsupportedModelError
from ..preprocess import FramePreprocessor
from ..prompts import split_video_prompt
from ..pruner import KeptTokens
from .base import (
    Deepstack, EncodedChunk, HostStream, Placed, VideoEncoder, VideoHost, frames_in_sequence, no_deepstack,
)


@dataclass(frozen=True)
class LlavaOnevisionVideoLayout:
    """HF LLaVA-OneVision video: F * tokens_per_frame pooled tokens, then one image_newline token.

    `LlavaOnevisionModel.get_video_features(...).pooler_output[b]` is this sequence; the newline is
    not prunable (the stream places it before the question).
    """

    tokens_per_frame: int = 196

    def __post_init__(self) -> None:
        positive_int(self.tokens_per_frame, "tokens_per_frame")

    @classmethod
    def for_config(cls, config: Any) -> LlavaOnevisionVideoLayout:
        """The layout of a LlavaOnevisionConfig: `apply_pooling` halves the ViT grid, rounding up."""
        return cls(tokens_per_frame=cls.pooled_side(config) ** 2)

    @staticmethod
    def pooled_side(config: Any) -> int:
        """Side of the pooled grid of a LlavaOnevisionConfig (14 for SigLIP-so400m at 384 px)."""
        vision = config.vision_config
        return math.ceil(vision.image_size // vision.patch_size / 2)

    def frame_tokens(self, sequence: Tensor) -> Tensor:
        """[F * P + 1, D] -> [F, P, D] (the trailing newline left out)."""
        p = self.tokens_per_frame
        frames = frames_in_sequence(sequence, "LlavaOnevisionVideoLayout", 1, p, f"F * {p} + 1 newline")
        return sequence[:-1].view(frames, p, -1)


class LlavaOnevisionStream(HostStream):
    """One growing video in one user turn; 1-D positions counted token by token."""

    def __init__(self, host: LlavaOnevisionHost, system_prompt: str | None) -> None:
        self.host, self.system_prompt = host, system_prompt
        self.prefix_text = split_video_prompt(host.tokenizer, "?", system_prompt).prefix
        self.next_position = 0

    def prefix_ids(self) -> list[int]:
        ids = self.host.tokenizer(self.prefix_text, add_special_tokens=False)["input_ids"]
        self.next_position += len(ids)
        return ids

    def place(self, chunk: EncodedChunk, kept: KeptTokens | None, first_frame: int,
              timestamps: Sequence[float] | None) -> list[Placed]:
        features = chunk.features
        counts = [features.shape[1]] * features.shape[0] if kept is None else kept.frame_counts()
        pieces = []
        for i, count in enumerate(counts):
            tokens = features[i] if kept is None else kept.tokens[i, :count]  # real tokens come first
            pieces.append(Placed(tokens, self.text_positions(count)))
        return pieces

    def question_embeds(self, question: str, answer_prefix: str = "") -> Tensor:
        """[image_newline] + the prompt after the video + the answer prefix."""
        prompt = split_video_prompt(self.host.tokenizer, question, self.system_prompt)
        if prompt.prefix != self.prefix_text:
            raise StreamStateError(
                "the chat template puts question-dependent text before the video; a stream cannot pre-fill it"
            )
        ids = self.host.tokenizer(prompt.suffix + answer_prefix, add_special_tokens=False)["input_ids"]
        tokens = self.host.embed(ids)
        newline = self.host.model.model.image_newline[None, :].to(tokens.dtype)
        return torch.cat([newline, tokens])[None]


class LlavaOnevisionHost(VideoHost):
    """`LlavaOnevisionForConditionalGeneration`: SigLIP tower, projector, 14x14 pooling, Qwen2 LLM."""

    model_classes = (LlavaOnevisionForConditionalGeneration,)

    @classmethod
    def tower_class(cls, model_class: type) -> type[nn.Module]:
        return SiglipVisionModel  # every LLaVA-OneVision checkpoint has a SigLIP tower

    def __init__(self, model: LlavaOnevisionForConditionalGeneration, tokenizer: Any,
                 protocol: str | None = None) -> None:
        super().__init__(model, tokenizer, protocol)
        self.layout = LlavaOnevisionVideoLayout.for_config(model.config)
        self.pooled_side = LlavaOnevisionVideoLayout.pooled_side(model.config)

    @property
    def tokens_per_frame(self) -> int:
        return self.layout.tokens_per_frame

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def default_preprocessor(self) -> FramePreprocessor:
        return FramePreprocessor.from_model_config(self.model.config)

    @classmethod
    def preprocessor_from_pretrained(cls, path_or_id: str | Path, protocol: str | None = None) -> FramePreprocessor:
        return FramePreprocessor.from_pretrained(path_or_id)

    def encode(self, pixels: Sequence[Tensor], encoder: VideoEncoder | None = None) -> EncodedChunk:
        """The model's own video path on one chunk (newline left out), or the custom encoder's tokens."""
        pixel_values = torch.stack(list(pixels)).to(self.device, self.vision_tower.dtype)  # [F, 3, S, S]
        if encoder is not None:
            return EncodedChunk(encoder(self, pixel_values), len(pixels))
        output = self.model.model.get_video_features(pixel_values_videos=pixel_values[None], return_dict=True)
        return EncodedChunk(self.layout.frame_tokens(output.pooler_output[0]), len(pixels))  # [F, P, D]

    def tower_cells(self, chunk: EncodedChunk) -> tuple[Tensor, tuple[int, int]]:
        """SigLIP's tokens are the patch grid, row-major (no class token)."""
        side = self.vision_tower.config.image_size // self.vision_tower.config.patch_size
        return torch.arange(side * side), (side, side)

    def pruner_grid(self, chunk: EncodedChunk) -> tuple[int, int]:
        """The pooled grid (14 x 14 for 384-px frames)."""
        return self.pooled_side, self.pooled_side

    def tower_hidden_states(self, pixel_values: Tensor) -> Tensor:
        """The tower's tokens at `vision_feature_layer` with the select strategy applied."""
        config = self.model.config
        layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
        if not isinstance(layer, int):
            raise UnsupportedModelError(f"tower tokens come from one layer; this model concatenates layers {layer}")
        hidden = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states[layer]
        return hidden[:, 1:] if strategy == "default" else hidden

    def project(self, hidden: Tensor) -> Tensor:
        return self.projector(hidden)

    def forward(self, embeds: Tensor, positions: Tensor, cache: Cache, deepstack: Deepstack | None = None) -> Tensor:
        no_deepstack(self, deepstack)
        if positions.shape[0] != 1:
            raise InputError(f"LLaVA-OneVision takes 1-D positions [1, n], got {tuple(positions.shape)}")
        output = self.model.model.language_model(
            inputs_embeds=embeds.to(self.model.dtype),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
        )
        return output.last_hidden_state[:, -1]

    def new_stream(self, system_prompt: str | None) -> LlavaOnevisionStream:
        return LlavaOnevisionStream(self, system_prompt)


__all__ = ["LlavaOnevisionHost", "LlavaOnevisionStream", "LlavaOnevisionVideoLayout"]
