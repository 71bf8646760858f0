"""VisionZip-style selection: dominant tokens by ViT attention received, plus merged context tokens.

Follows VisionZip (Yang et al., CVPR 2025): keep the tokens that receive the most attention in a
late ViT layer ("dominant"), then merge the rest into a few "contextual" tokens: evenly spaced
remaining tokens act as targets and every other remaining token joins its most similar target.

How it gets the attention: `prune(features, attention)` takes one attention-received score per
token, [F, P], in the same token order as features. In a host, `attach(model, pooled_size=14)`
records it on every tower forward from the penultimate layer's queries and keys (any attention
backend), pools it as the host pools tokens, and `prune(features)` uses the latest record.
By hand, two helpers build it from a tower run with eager attention and
`output_attentions=True` (SDPA does not return weights):
`attention_received(attentions[layer])` reduces [F, heads, T, T] weights to [F, T] (mean over
heads and queries for SigLIP, the class token's row for CLIP, as VisionZip does), and
`pool_scores(scores, size)` applies LLaVA-OneVision's bilinear pooling (27x27 -> 14x14) so
scores line up with the pooled tokens the pruner sees. VisionZip reads the penultimate layer.

Qwen2-VL and Qwen2.5-VL towers (no class token, fused qkv, 2-D RoPE, attention per temporal patch
or per window) take the SigLIP rule on their own attention: in the recorded block, each token's
attention received is the mean over heads and over the queries of its attention segment (RoPE
applied to q and k as the block does); a merged LLM token's score is the mean of its 2x2 merge
block's four tokens, in the merged grid's row-major order, one row per temporal patch. The block
is the penultimate one (Qwen2-VL), and in Qwen2.5-VL the last full-attention block before the final
block: its windowed blocks normalise attention within 8x8-patch windows, so received attention is
not comparable across windows there.

Simplifications: selection runs on the projector outputs the other pruners see (VisionZip works
on ViT tokens); target/token similarity uses those features instead of the layer's keys; a
contextual token is the mean of its group, target included (VisionZip adds the target to the
mean of the others). A contextual token's index is its target's position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_window_index

from ..cacher import find_vision_tower
from ..cacher.patch_qwen_vl import rotate
from ..errors import ConfigError, InputError, StreamStateError
from ..pruner import Budget, KeptTokens
from ..pruner.functional import check_features
from ..tokens import gather_tokens

QWEN_TOWERS = (Qwen2VisionTransformerPretrainedModel, Qwen2_5_VisionTransformerPretrainedModel)

# VisionZip's default split: 54 dominant + 10 contextual tokens of 64.
DEFAULT_CONTEXTUAL_SHARE = 10 / 64


def attention_received(attentions: Tensor, class_token: bool = False) -> Tensor:
    """Per-token attention received, [F, heads, T, T] -> [F, T'].

    class_token=False (SigLIP): mean over heads and queries, all T tokens. class_token=True
    (CLIP): the class token's attention to each patch, mean over heads; the class token itself is
    dropped (T' = T - 1) to match features taken with the "default" strategy.
    """
    if attentions.dim() != 4:
        raise InputError(f"attentions must be [frames, heads, T, T], got shape {tuple(attentions.shape)}")
    if class_token:
        return attentions[:, :, 0, 1:].mean(dim=1)
    return attentions.mean(dim=(1, 2))


def pool_scores(scores: Tensor, size: int) -> Tensor:
    """Bilinear-pool per-token scores [F, s * s] to [F, size * size], as LLaVA-OneVision pools tokens."""
    side = math.isqrt(scores.shape[-1])
    if side * side != scores.shape[-1]:
        raise InputError(f"scores of {scores.shape[-1]} tokens do not form a square grid")
    grid = scores.view(-1, 1, side, side)
    return F.interpolate(grid, size=(size, size), mode="bilinear").flatten(1)


def qwen_attention_received(block: nn.Module, hidden_states: Tensor, cu_seqlens: Tensor, cos: Tensor,
                            sin: Tensor) -> Tensor:
    """Attention each token receives in a Qwen-VL vision block, [S]: softmax(q k^T * scale) of the
    block's RoPE-rotated queries and keys within each `cu_seqlens` segment, mean over heads and
    over the segment's queries. hidden_states [S, C] is the block's input; cos/sin its RoPE rows."""
    attn = block.attn
    length = hidden_states.shape[0]
    q, k, _ = attn.qkv(block.norm1(hidden_states)).view(length, 3, attn.num_heads, -1).unbind(1)
    q, k = rotate(q, cos, sin).transpose(0, 1), rotate(k, cos, sin).transpose(0, 1)  # [H, S, D]
    received = torch.empty(length, dtype=torch.float32, device=hidden_states.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        scores = q[:, start:end] @ k[:, start:end].transpose(-1, -2) * attn.scaling
        received[start:end] = scores.float().softmax(dim=-1).mean(dim=(0, 1))
    return received


def visionzip_select(features: Tensor, attention: Tensor, dominant: int, contextual: int) -> KeptTokens:
    """Keep `dominant` top-attention tokens and `contextual` merged tokens per frame, in original order."""
    num_frames, num_tokens, dim = features.shape
    order = attention.argsort(dim=-1, descending=True)
    dominant_idx = order[:, :dominant]
    rest = order[:, dominant:].sort(dim=-1).values  # [F, R] remaining positions, ascending
    indices, tokens = [dominant_idx], [gather_tokens(features, dominant_idx)]
    if contextual > 0:
        num_rest = rest.shape[1]
        step = max(1, num_rest // contextual)
        slot = torch.arange(num_rest, device=features.device)
        is_target = (slot % step == 0) & (slot < step * contextual)
        targets, others = rest[:, is_target], rest[:, ~is_target]  # [F, c], [F, R - c]
        target_feats, other_feats = gather_tokens(features, targets), gather_tokens(features, others)
        similarity = F.normalize(other_feats, dim=-1) @ F.normalize(target_feats, dim=-1).transpose(1, 2)
        assign = similarity.argmax(dim=-1, keepdim=True)  # [F, R - c, 1]
        sums = target_feats.clone().scatter_add_(1, assign.expand(-1, -1, dim), other_feats)
        counts = torch.ones(num_frames, contextual, 1, dtype=features.dtype, device=features.device)
        counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=features.dtype))
        indices.append(targets)
        tokens.append(sums / counts)
    indices_cat, tokens_cat = torch.cat(indices, dim=1), torch.cat(tokens, dim=1)
    order_back = indices_cat.argsort(dim=-1)
    return KeptTokens(gather_tokens(tokens_cat, order_back), torch.gather(indices_cat, 1, order_back))


class VisionZipPruner:
    """VisionZip-style baseline (see module docstring): `prune(features, attention)`, `reset()`.

    contextual_share: share of the k kept tokens that are merged contextual tokens (default
    10/64, VisionZip's split); at least one dominant token is kept.
    """

    def __init__(
        self,
        tokens_per_frame: int | None = None,
        keep_ratio: float | None = None,
        contextual_share: float = DEFAULT_CONTEXTUAL_SHARE,
    ) -> None:
        valid = not isinstance(contextual_share, bool) and isinstance(contextual_share, (int, float))
        if not valid or not 0.0 <= contextual_share < 1.0:
            raise ConfigError(f"contextual_share must lie in [0, 1), got {contextual_share!r}")
        self.budget = Budget(tokens_per_frame, keep_ratio)
        self.contextual_share = float(contextual_share)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._queries: Tensor | None = None
        self._recorded: Tensor | None = None  # [F, P] attention received in the latest tower forward

    def attach(self, model: nn.Module, layer: int | None = None, pooled_size: int | None = None) -> VisionZipPruner:
        """Record the attention each token receives in `layer` of the vision tower inside `model`
        (default: the penultimate, as VisionZip; the only one of a 1-layer tower) on every forward,
        pooled to pooled_size x pooled_size when the host pools its grid, as LLaVA-OneVision does
        to 14 x 14. Qwen2-VL / Qwen2.5-VL towers record one score per merged token (see the module
        docstring for the block and the rule; pooled_size does not apply). Returns self; `detach()`
        removes the hooks."""
        if self._hooks:
            raise StreamStateError("this VisionZipPruner is already attached; detach() first")
        tower = find_vision_tower(model)
        if isinstance(tower, QWEN_TOWERS):
            self._hooks = self._attach_qwen(tower, layer)
            return self
        layers = tower.encoder.layers
        if layer is None:
            layer = -2 if len(layers) > 1 else -1
        if not -len(layers) <= layer < len(layers):
            raise ConfigError(f"layer {layer} does not exist in a {len(layers)}-layer tower")
        attention = layers[layer].self_attn
        class_token = isinstance(tower.config, CLIPVisionConfig)

        def keep_queries(module: nn.Module, args: tuple, output: Tensor) -> None:
            self._queries = output

        def record(module: nn.Module, args: tuple, keys: Tensor) -> None:
            frames, tokens, _ = keys.shape
            heads = attention.num_heads
            q = self._queries.view(frames, tokens, heads, -1).transpose(1, 2)
            k = keys.view(frames, tokens, heads, -1).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) * attention.scale).float().softmax(dim=-1)
            scores = attention_received(probs, class_token)
            self._recorded = pool_scores(scores, pooled_size) if pooled_size else scores
            self._queries = None

        self._hooks = [
            attention.q_proj.register_forward_hook(keep_queries),
            attention.k_proj.register_forward_hook(record),
        ]
        return self

    def _attach_qwen(self, tower: nn.Module, layer: int | None) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks recording, per tower forward, the merged tokens' attention received [U, h * w]."""
        blocks, config = tower.blocks, tower.config
        if layer is None:
            full = getattr(tower, "fullatt_block_indexes", None)
            candidates = range(len(blocks) - 1) if full is None else [i for i in full if i < len(blocks) - 1]
            layer = max(candidates, default=len(blocks) - 1)
        if not -len(blocks) <= layer < len(blocks):
            raise ConfigError(f"layer {layer} does not exist in a {len(blocks)}-block tower")
        block, merge = blocks[layer], config.spatial_merge_size
        grid: list[torch.Tensor] = []

        def keep_grid(module: nn.Module, args: tuple, kwargs: dict) -> None:
            grid[:] = [kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]]

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            received = qwen_attention_received(block, hidden, kwargs["cu_seqlens"], cos, sin)
            per_block = received.view(-1, merge * merge).mean(dim=1)  # the block's token order, whole merge blocks
            if isinstance(tower, Qwen2_5_VisionTransformerPretrainedModel):  # window order -> row-major
                window_index, _ = get_vision_window_index(grid[0].cpu(), merge, config.window_size, config.patch_size)
                per_block = torch.empty_like(per_block).index_copy_(0, window_index.to(per_block.device), per_block)
            units = int(grid[0][:, 0].sum())
            self._recorded = per_block.view(units, -1)

        return [tower.register_forward_pre_hook(keep_grid, with_kwargs=True),
                block.register_forward_pre_hook(record, with_kwargs=True)]

    def detach(self) -> None:
        """Remove the hooks `attach` placed."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._queries, self._recorded = [], None, None

    def prune(self, features: Tensor, attention: Tensor | None = None) -> KeptTokens:
        """Keep k tokens of each frame of features [F, P, D] given attention received [F, P]
        (default: the record of the latest tower forward, when attached)."""
        check_features(features)
        attention = self._recorded if attention is None else attention
        if attention is None:
            raise InputError(
                "VisionZip needs the ViT attention each token receives: pass attention [F, P] "
                "(see attention_received and pool_scores) or attach() it to the model"
            )
        if attention.shape != features.shape[:2]:
            raise InputError(
                f"attention must be [frames, tokens] = {tuple(features.shape[:2])}, got {tuple(attention.shape)}"
            )
        num_tokens = features.shape[1]
        k = self.budget.resolve(num_tokens)
        contextual = min(round(k * self.contextual_share), k - 1, num_tokens - k)
        return visionzip_select(features, attention.to(features.device), k - contextual, max(contextual, 0))

    def reset(self) -> None:
        """Stateless: nothing to forget."""


__all__ = [
    "DEFAULT_CONTEXTUAL_SHARE", "attention_received", "pool_scores", "qwen_attention_received", "visionzip_select",
    "VisionZipPruner",
]
