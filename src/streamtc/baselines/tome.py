"""ToMe: token merging inside the ViT blocks of SigLIP / CLIP towers (transformers 5.x), reversibly.

Follows ToMe (Bolya et al., ICLR 2023; `tome/merge.py`, `tome/patch/timm.py`): in every layer,
after attention, split tokens alternately into sets A and B, match each A token to its most
similar B token by cosine of the layer's keys (mean over heads), and merge the r best-matched
pairs by size-weighted average. Attention is proportional: log(token size) is added to the
attention logits, so a merged token counts as the tokens it stands for. The class token (CLIP)
is never merged.

    tome = ToMe(keep_tokens=182).apply(vision_tower)   # or ToMe(r=21), or a per-layer list
    out = vision_tower(pixel_values)                   # last_hidden_state: [B, 182, C]
    tome.remove()                                      # the original forward is back

Modifications relative to SiglipEncoderLayer / CLIPEncoderLayer.forward (transformers 5.x), whose
body the patched forward follows step by step:
- the attention mask gets + log(size) of each key token (proportional attention);
- between the attention residual and the MLP, r tokens are merged (size-weighted average);
- unmerged A tokens are kept in their original order (ToMe sorts them only when a class token
  exists), then the B tokens, in order.
Same arguments, tensor out, and the layer still calls its own `self_attn` module, so hooks and
`output_hidden_states` / `output_attentions` keep working (with fewer tokens after each layer).
Attention backends with an additive mask only: eager and sdpa.

The merged token count depends on no input, so the tower's output length is fixed by the
schedule; hosts that pool a fixed grid afterwards (LLaVA-OneVision's 27x27 -> 14x14) cannot
pool ToMe's output and must feed it to the projector unpooled.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionConfig, SiglipVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from ..errors import ConfigError, StreamStateError, UnsupportedModelError
from ..pruner import Budget, KeptTokens
from ..pruner.functional import check_features
from ..tokens import gather_tokens

# Supported layer classes, and whether their tower prepends a class token that must not merge.
CLASS_TOKEN_BY_LAYER: dict[type[nn.Module], bool] = {SiglipEncoderLayer: False, CLIPEncoderLayer: True}
VISION_CONFIGS = (SiglipVisionConfig, CLIPVisionConfig)  # text towers use the same layer classes
SUPPORTED_ATTENTION = ("eager", "sdpa")

Merge = Callable[[Tensor, str], Tensor]


def bipartite_merge(metric: Tensor, r: int, class_token: bool) -> Merge:
    """ToMe's bipartite soft matching on metric [B, T, C]; returns merge(x [B, T, D], reduce) -> [B, T - r, D].

    r is capped at (T - protected) // 2; with nothing to merge the identity is returned.
    """
    protected = int(class_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return lambda x, reduce="sum": x
    with torch.no_grad():
        metric = F.normalize(metric, dim=-1)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(1, 2)
        if class_token:
            scores[:, 0, :] = -math.inf
        best, best_dst = scores.max(dim=-1)  # [B, Ta]
        edge_order = best.argsort(dim=-1, descending=True)[..., None]
        unmerged = edge_order[:, r:].sort(dim=1).values  # keep A tokens in original order
        merged = edge_order[:, :r]
        dst = best_dst[..., None].gather(dim=1, index=merged)

    def merge(x: Tensor, reduce: str = "sum") -> Tensor:
        src, dst_tokens = x[:, ::2], x[:, 1::2]
        n, ta, c = src.shape
        kept_src = src.gather(dim=1, index=unmerged.expand(n, ta - r, c))
        moved = src.gather(dim=1, index=merged.expand(n, r, c))
        dst_tokens = dst_tokens.scatter_reduce(1, dst.expand(n, r, c), moved, reduce=reduce)
        return torch.cat([kept_src, dst_tokens], dim=1)

    return merge


def merge_weighted(merge: Merge, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge of x [B, T, D] with token sizes [B, T, 1] -> (x, size) after merging."""
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def min_keep_tokens(num_tokens: int, num_layers: int, class_token: bool = False) -> int:
    """The fewest tokens ToMe can leave after num_layers layers (each merges at most half)."""
    for _ in range(num_layers):
        num_tokens -= (num_tokens - class_token) // 2
    return num_tokens


def tome_schedule(num_tokens: int, num_layers: int, keep_tokens: int, class_token: bool = False) -> list[int]:
    """Tokens to merge per layer so that exactly keep_tokens remain after num_layers layers.

    Uses the smallest constant r that reaches the target under ToMe's per-layer cap
    ((T - protected) // 2), trimming the last merging layer; ConfigError if no schedule can.
    """
    valid = not isinstance(keep_tokens, bool) and isinstance(keep_tokens, int)
    if not valid or not 1 + class_token <= keep_tokens <= num_tokens:
        raise ConfigError(f"keep_tokens must be an int in [{1 + class_token}, {num_tokens}], got {keep_tokens!r}")
    to_merge = num_tokens - keep_tokens
    for r in range(math.ceil(to_merge / num_layers), num_tokens // 2 + 1):
        schedule, tokens, left = [], num_tokens, to_merge
        for _ in range(num_layers):
            step = min(r, (tokens - class_token) // 2, left)
            schedule.append(step)
            tokens, left = tokens - step, left - step
        if left == 0:
            return schedule
    raise ConfigError(
        f"ToMe cannot merge {num_tokens} tokens down to {keep_tokens} in {num_layers} layers "
        "(each layer merges at most half of its tokens); keep more tokens"
    )


def _forward_attr(layer: nn.Module) -> str:
    """The attribute holding a layer's real forward: accelerate hooks move it to `_old_forward`."""
    return "_old_forward" if hasattr(layer, "_hf_hook") else "forward"


def _is_patched(layer: nn.Module) -> bool:
    """True if the layer's forward was already replaced on the instance (by ToMe or another patch)."""
    if _forward_attr(layer) == "_old_forward":
        return getattr(layer._old_forward, "patched_by_tome", False)
    return "forward" in vars(layer)


class ToMe:
    """Token merging for SigLIP / CLIP encoder layers; `apply(model)` then `remove()`.

    Give r (merged per layer: an int, or one int per layer) or keep_tokens (tokens left after
    the last layer; the schedule is computed from the tower's token count).
    """

    def __init__(self, r: int | Sequence[int] | None = None, keep_tokens: int | None = None) -> None:
        if (r is None) == (keep_tokens is None):
            raise ConfigError("give exactly one of r (tokens merged per layer) or keep_tokens")
        per_layer = [r] if isinstance(r, int) else list(r or [])
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in per_layer):
            raise ConfigError(f"r must be an int >= 0 or a list of them, got {r!r}")
        self.r = r
        self.keep_tokens = keep_tokens
        self.schedule: list[int] = []
        self._layers: list[tuple[nn.Module, str, object | None]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._class_token = False
        self._size: Tensor | None = None  # [B, T, 1] token sizes of the running forward
        self._keys: Tensor | None = None  # k_proj output of the layer running now

    @property
    def applied(self) -> bool:
        return bool(self._layers)

    @property
    def sizes(self) -> Tensor | None:
        """[B, T, 1] how many input tokens each output token of the last forward stands for (None: none merged)."""
        return self._size

    def apply(self, model: nn.Module) -> ToMe:
        """Patch every SigLIP / CLIP encoder layer of model in place; returns self."""
        if self.applied:
            raise StreamStateError("this ToMe is already applied; call remove() first")
        layers = [
            m for m in model.modules()
            if type(m) in CLASS_TOKEN_BY_LAYER and isinstance(m.self_attn.config, VISION_CONFIGS)
        ]
        if not layers:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no supported ViT layers; ToMe supports the vision towers' "
                f"{', '.join(c.__name__ for c in CLASS_TOKEN_BY_LAYER)}"
            )
        config = layers[0].self_attn.config
        if config._attn_implementation not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"ToMe needs an attention backend that takes an additive mask ({', '.join(SUPPORTED_ATTENTION)}), "
                f"got {config._attn_implementation!r}"
            )
        class_token = CLASS_TOKEN_BY_LAYER[type(layers[0])]
        if self.keep_tokens is not None:
            num_tokens = (config.image_size // config.patch_size) ** 2 + class_token
            schedule = tome_schedule(num_tokens, len(layers), self.keep_tokens, class_token)
        elif isinstance(self.r, int):
            schedule = [self.r] * len(layers)
        else:
            schedule = list(self.r)
            if len(schedule) != len(layers):
                raise ConfigError(f"r lists {len(schedule)} values but the model has {len(layers)} layers")
        for layer in layers:
            if _is_patched(layer):
                raise StreamStateError(
                    f"a {type(layer).__name__} forward is already patched (by ToMe or another patch); remove that first"
                )
        self.schedule, self._class_token = schedule, class_token
        for index, layer in enumerate(layers):
            attr = _forward_attr(layer)
            self._layers.append((layer, attr, vars(layer).get(attr)))
            setattr(layer, attr, types.MethodType(self._make_forward(index), layer))
            self._hooks.append(layer.self_attn.k_proj.register_forward_hook(self._capture_keys))
        return self

    def remove(self) -> None:
        """Restore every patched layer's original forward."""
        for layer, attr, original in self._layers:
            if original is None:
                delattr(layer, attr)
            else:
                setattr(layer, attr, original)
        for hook in self._hooks:
            hook.remove()
        self._layers, self._hooks = [], []
        self._size = self._keys = None

    def _capture_keys(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._keys = output

    def _make_forward(self, index: int) -> Callable[..., Tensor]:
        r = self.schedule[index]
        tome = self

        def forward(layer: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
            if index == 0:
                tome._size = None  # a new forward pass starts: every token stands for itself
            size = tome._size
            residual = hidden_states
            hidden_states = layer.layer_norm1(hidden_states)
            if size is not None:
                bias = size.log().to(hidden_states.dtype)[:, None, None, :, 0]  # [B, 1, 1, T]
                attention_mask = bias if attention_mask is None else attention_mask + bias
            hidden_states, _ = layer.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
            keys, tome._keys = tome._keys, None
            hidden_states = residual + hidden_states
            if r > 0:
                batch, tokens, _ = keys.shape
                metric = keys.view(batch, tokens, layer.self_attn.num_heads, -1).mean(dim=2)
                if size is None:
                    size = hidden_states.new_ones(batch, tokens, 1)
                merge = bipartite_merge(metric, r, tome._class_token)
                hidden_states, size = merge_weighted(merge, hidden_states, size)
            tome._size = size
            residual = hidden_states
            hidden_states = layer.mlp(layer.layer_norm2(hidden_states))
            return residual + hidden_states

        forward.patched_by_tome = True
        return forward


class ToMeTokenMerger:
    """ToMe on a frame's LLM tokens, for hosts whose ViT cannot merge tokens (Qwen2-VL, Qwen2.5-VL).

    In a Qwen-VL tower every token must stay in place: the patch merger fuses fixed 2x2 blocks of
    4 consecutive tokens into one LLM token, each token carries its own 2-D RoPE row, Qwen2.5-VL's
    windowed blocks attend over window-contiguous runs, and each LLM token gets an M-RoPE (t, h, w)
    position from its grid cell. In-ViT merging breaks all four, so this variant applies ToMe's
    bipartite soft matching and size-weighted averaging to the merged tokens the Pruner sees
    (features [F, P, D], one row per pruner frame), in rounds of at most half the tokens until k
    remain, with the tokens themselves as the matching metric (ToMe uses the layer's keys). A
    merged token sits at the position of the token it was merged into (ToMe's B token), so the
    host places it at that cell's one-shot position. Same interface as the Pruner:
    `prune(features) -> KeptTokens` (ascending positions), `reset()`.
    """

    def __init__(self, tokens_per_frame: int | None = None, keep_ratio: float | None = None) -> None:
        self.budget = Budget(tokens_per_frame, keep_ratio)

    def prune(self, features: Tensor) -> KeptTokens:
        check_features(features)
        frames, num_tokens, _ = features.shape
        k = self.budget.resolve(num_tokens)
        x = features
        size = features.new_ones(frames, num_tokens, 1)
        position = torch.arange(num_tokens, device=features.device, dtype=features.dtype)[None, :, None].expand(
            frames, -1, -1)
        while x.shape[1] > k:
            tokens = x.shape[1]
            r = min(tokens - k, tokens // 2)
            merge = bipartite_merge(x, r, class_token=False)
            # Output order: the unmerged A tokens (even slots), then every B token (odd slots), each
            # B token keeping its own position; A positions are carried by a second pass.
            is_a = (torch.arange(tokens, device=x.device) % 2 == 0)[None, :, None]
            unmerged_a = (tokens + 1) // 2 - r
            from_a = merge(position.masked_fill(~is_a, -1), "amax")
            from_b = merge(position.masked_fill(is_a, -1), "amax")
            position = torch.cat([from_a[:, :unmerged_a], from_b[:, unmerged_a:]], dim=1)
            x, size = merge_weighted(merge, x, size)
        order = position[..., 0].argsort(dim=1)
        return KeptTokens(gather_tokens(x, order), torch.gather(position[..., 0].long(), 1, order))

    def reset(self) -> None:
        """Stateless: nothing to forget."""


def tome_video_features(host: Any, pixel_values: Tensor) -> Tensor:
    """A host's video path for a tower with ToMe applied: the tower's (merged) tokens at the layer
    its projector reads -> projector, unpooled (merged tokens have no grid). [F, 3, S, S] ->
    [F, k, D]; k is the ToMe schedule's output count. Pass it as a session's `encoder`; the host
    (`streamtc.hosts`, LLaVA-OneVision) provides `tower_hidden_states` and `project`."""
    return host.project(host.tower_hidden_states(pixel_values))


__all__ = [
    "CLASS_TOKEN_BY_LAYER", "bipartite_merge", "merge_weighted", "min_keep_tokens", "tome_schedule",
    "tome_video_features", "ToMe", "ToMeTokenMerger",
]
