"""`RetrievalCache`: ReKV's retrieval memory behind the `CachePolicy` seam (bounded cache, nothing forgotten).

What ReKV does. A live stream never ends, so ReKV keeps only the chat prefix (the attention sink)
and a local window of the newest video tokens in the accelerator's KV cache, and moves the KV of
frames that leave the window to CPU memory as one block per frame, each with a representative key
per layer (the block's mean key). Frames are pre-filled against the window only. At a question,
each LLM layer scores the offloaded blocks by the similarity of the question's mean query (at that
layer) to their representative keys, loads its top-k blocks and attends to them together with the
window. Defaults as ReKV: a 15,000-token window and 64 retrieved frames.

What we do.
- Eviction: after each pre-fill, whole frame blocks leave the window oldest first while it holds
  more than `window_tokens` (the newest frame stays even when larger). Their keys and values
  (every layer) go to an `OffloadStore` (`streamtc.memory.offload`: host memory, or safetensors
  segments on disk with a byte budget) with the mean key per layer and KV head.
- Positions: keys sit in the cache rotated at the positions they were pre-filled at, and blocks
  keep them rotated, so a retrieved block is attended at its original positions: exact for 1-D
  RoPE and for M-RoPE (Qwen2-VL / Qwen2.5-VL / Qwen3-VL) alike, where the (t, h, w) positions are
  already in the rotated keys. The session's position counter runs on, so a question comes after the last frame.
- Scoring: for a question pre-filled at positions p, a layer's queries are rotated at p (as its
  attention computes them) and averaged over the question tokens; a block's score is the mean over
  query heads of the dot product with the representative key of that head's KV group. With keys
  and queries both rotated this is the block's mean attention logit against the question's mean
  query. The top `retrieve_frames` blocks are put between the prefix and the window in temporal
  order (the order a full cache holds them in); the answer is decoded on that cache. On exit
  (errors included) every layer gets back its window-only keys and values, so nothing offloaded is
  duplicated and nothing in the window is lost.

The hook (transformers 5.x). The question's per-layer queries only exist inside the forward: layer
l's query depends on what layers < l retrieved. Each supported attention class (`Qwen2Attention`,
`Qwen2VLAttention`, `Qwen2_5_VLAttention`, `Qwen3VLTextAttention`) is called by its decoder layer with keyword arguments
only (hidden_states, position_embeddings, attention_mask, past_key_values, ...), so a forward
pre-hook registered with `with_kwargs=True` sees everything the layer's attention will see, before
it projects: the hook recomputes the layer's query with the module's own `q_proj` (and `q_norm`,
Qwen3-VL's QK-norm) and the modeling file's own `apply_rotary_pos_emb` (a few question tokens;
cheap; `QUERY_FUNCTIONS`), chooses the blocks,
splices them into that layer's `DynamicLayer` keys and values (the layer's `update` then appends
the question's keys after them), and widens the attention mask the model built for the window-only
length by copies of its first column (the prefix's first token, visible to every question token).
A custom `Cache` cannot do this (its `update` sees keys, never queries), and an attention function
registered by name would be switched on the model's shared config, for every stream at once. The
hooks exist only inside `question()` and act only on forwards that carry this stream's cache
object, so streams sharing one model (`session.spawn()`) never see each other's blocks.

Exactness: with a window larger than the stream nothing is offloaded (a `FullCache`); with
`retrieve_frames` >= the blocks offloaded, a question sees the full cache's tokens in the full
cache's order. Because frames pre-filled after an eviction attend only to the window (as in ReKV),
logits equal `FullCache`'s exactly when the offloaded frames were pre-filled in the same forward as
the window (tests/test_memory_retrieval.py).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl
from transformers.models.qwen3_vl import modeling_qwen3_vl

from ..errors import ConfigError, StreamStateError, UnsupportedModelError
from .offload import BlockInfo, BlockReader, DiskStore, HostStore, OffloadStore
from .policies import CacheBlock, CachePolicy

QueryFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _query(rotary: Callable, module: nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> torch.Tensor:
    """The rotated query [B, Hq, q, D] of a Qwen2 / Qwen2-VL / Qwen2.5-VL attention, as its forward
    computes it: `q_proj`, split into heads, the modeling file's own `apply_rotary_pos_emb`."""
    query = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim).transpose(1, 2)
    return rotary(query, query, cos, sin)[0]


def _qwen3_query(module: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotated query of a `Qwen3VLTextAttention`: as `_query`, with its per-head `q_norm`
    between the split into heads and the rotation (Qwen3's QK-norm)."""
    query = module.q_norm(module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim)).transpose(1, 2)
    return modeling_qwen3_vl.apply_rotary_pos_emb(query, query, cos, sin)[0]


# Attention classes the question hook supports, with the query their forward computes.
QUERY_FUNCTIONS: dict[type[nn.Module], QueryFunction] = {
    modeling_qwen2.Qwen2Attention: partial(_query, modeling_qwen2.apply_rotary_pos_emb),
    modeling_qwen2_vl.Qwen2VLAttention: partial(_query, modeling_qwen2_vl.apply_rotary_pos_emb),
    modeling_qwen2_5_vl.Qwen2_5_VLAttention: partial(_query, modeling_qwen2_5_vl.apply_rotary_pos_emb),
    modeling_qwen3_vl.Qwen3VLTextAttention: _qwen3_query,
}


def select_blocks(query: torch.Tensor, representatives: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending, i.e. temporal order) of the k blocks whose representative keys score
    highest against a mean query. query [Hq, D]; representatives [N, Hkv, D] (Hq a multiple of
    Hkv, query head h reading KV head h // (Hq / Hkv)). Score: mean over query heads of q_h . r."""
    groups = query.shape[0] // representatives.shape[1]
    keys = representatives.to(query.dtype).repeat_interleave(groups, dim=1)  # [N, Hq, D]
    scores = torch.einsum("hd,nhd->n", query, keys) / query.shape[0]
    if k >= scores.shape[0]:
        return torch.arange(scores.shape[0], device=scores.device)
    return torch.topk(scores, k).indices.sort().values


def attention_layers(language_model: nn.Module) -> list[nn.Module]:
    """The LLM's attention modules in layer order (by `layer_idx`); a clear error for other classes."""
    layers = [m for m in language_model.modules() if type(m) in QUERY_FUNCTIONS]
    if not layers:
        names = ", ".join(cls.__name__ for cls in QUERY_FUNCTIONS)
        raise UnsupportedModelError(
            f"RetrievalCache hooks the LLM's attention layers; {type(language_model).__name__} has none of {names}"
        )
    return sorted(layers, key=lambda m: m.layer_idx)


def _fit_mask(mask: torch.Tensor, kv_length: int, at: int) -> torch.Tensor:
    """Widen (or narrow) an attention mask [..., q, kv] built for another key length to `kv_length`,
    inserting (or removing) columns at `at`: the inserted columns copy column 0, a prefix token every
    query sees, so they are visible too (works for boolean and additive float masks)."""
    extra = kv_length - mask.shape[-1]
    if extra > 0:
        fill = mask[..., :1].expand(*mask.shape[:-1], extra)
        return torch.cat([mask[..., :at], fill, mask[..., at:]], dim=-1)
    if extra < 0:
        return torch.cat([mask[..., :at], mask[..., at - extra:]], dim=-1)
    return mask


@dataclass
class MemoryStats:
    """A retrieval memory's counters (since the stream started).

    window_tokens / window_frames: frame tokens (and blocks) in the model's cache now;
    offloaded_blocks / offloaded_tokens: blocks held in the store now; evicted_blocks: blocks ever
    moved out of the window; deleted_blocks: deleted by the disk budget; lost_blocks: dropped after
    a disk fault; host_bytes: block keys and values in host memory; disk_bytes: segment files on
    disk; representative_bytes: the mean keys (on the model's device); questions: questions that
    retrieved; retrieval_ms / last_retrieval_ms: time in the per-layer scoring, reads and splices
    (total, and the latest question); last_retrieved_blocks: blocks the latest question retrieved
    per layer.
    """

    window_tokens: int = 0
    window_frames: int = 0
    offloaded_blocks: int = 0
    offloaded_tokens: int = 0
    evicted_blocks: int = 0
    deleted_blocks: int = 0
    lost_blocks: int = 0
    host_bytes: int = 0
    disk_bytes: int = 0
    representative_bytes: int = 0
    questions: int = 0
    retrieval_ms: float = 0.0
    last_retrieval_ms: float | None = None
    last_retrieved_blocks: int = 0

    @property
    def retrieval_ms_per_question(self) -> float:
        return self.retrieval_ms / self.questions if self.questions else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "retrieval_ms_per_question": self.retrieval_ms_per_question}


@dataclass
class _Question:
    """One question's retrieval: the cache it runs on, the blocks scored, what each layer loaded."""

    cache: Cache
    reader: BlockReader
    ids: list[int]
    representatives: torch.Tensor  # [N, L, Hkv, D]
    loaded: dict[int, list[int]]
    ms: float = 0.0


class RetrievalCache(CachePolicy):
    """ReKV's memory (see the module docstring): the chat prefix and the newest `window_tokens`
    frame tokens stay in the cache; older frames go to an offload store and each layer retrieves
    its top `retrieve_frames` of them per question.

    offload_dir: keep offloaded blocks on disk under this directory (a private sub-directory per
    stream) instead of host memory; offload_budget: bytes of segment files kept there at most (None:
    unbounded), the oldest deleted first; segment_blocks: blocks per segment file.
    Use: `StreamingSession(..., cache_policy=lambda: RetrievalCache(15_000, 64))`.
    """

    def __init__(self, window_tokens: int = 15_000, retrieve_frames: int = 64, *,
                 offload_dir: str | Path | None = None, offload_budget: int | None = None,
                 segment_blocks: int = 16) -> None:
        for name, value in (("window_tokens", window_tokens), ("retrieve_frames", retrieve_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if offload_dir is None and offload_budget is not None:
            raise ConfigError("offload_budget bounds the disk store: give offload_dir too")
        self.window_tokens = window_tokens
        self.retrieve_frames = retrieve_frames
        self.store: OffloadStore = (
            HostStore() if offload_dir is None else DiskStore(offload_dir, offload_budget, segment_blocks)
        )
        self._attention: list[nn.Module] = []
        self._device = torch.device("cpu")
        self._reset_bookkeeping()

    def _reset_bookkeeping(self) -> None:
        self._prefix_tokens = 0
        self._window: deque[CacheBlock] = deque()  # frame blocks in the cache, oldest first
        self._window_tokens = 0
        self._next_id = 0
        self._stats = MemoryStats()
        self.last_retrieved: list[list[int]] = []  # per layer, the block ids the latest question loaded

    # -- the CachePolicy seam -----------------------------------------------------------------

    def bind(self, language_model: nn.Module) -> None:
        self._attention = attention_layers(language_model)
        self._device = next(language_model.parameters()).device

    def new_cache(self, config: PretrainedConfig) -> Cache:
        self.store.clear()
        self._reset_bookkeeping()
        return DynamicCache(config=config)

    def on_append(self, cache: Cache, blocks: Sequence[CacheBlock]) -> None:
        for block in blocks:
            if block.kind == "prompt":
                if self._window or self._next_id:
                    raise StreamStateError("RetrievalCache keeps the chat prompt as the prefix: it must come before the frames")
                self._prefix_tokens += block.length
            elif block.length:
                self._window.append(block)
                self._window_tokens += block.length
        evicted = []
        while len(self._window) > 1 and self._window_tokens > self.window_tokens:
            evicted.append(self._window.popleft())
            self._window_tokens -= evicted[-1].length
        if evicted:
            self._offload(cache, evicted)

    def _offload(self, cache: Cache, evicted: list[CacheBlock]) -> None:
        """Move the oldest window blocks (right after the prefix in every layer) to the store."""
        start = self._prefix_tokens
        for block in evicted:
            stop = start + block.length
            keys = torch.stack([layer.keys[0, :, start:stop] for layer in cache.layers])  # [L, Hkv, n, D]
            values = torch.stack([layer.values[0, :, start:stop] for layer in cache.layers])
            info = BlockInfo(self._next_id, block.frame, block.timestamp, block.position, block.length)
            self.store.add(info, keys, values, keys.float().mean(dim=2))
            self._next_id += 1
            start = stop
        self._stats.evicted_blocks += len(evicted)
        for layer in cache.layers:
            layer.keys = torch.cat([layer.keys[..., : self._prefix_tokens, :], layer.keys[..., start:, :]], dim=-2)
            layer.values = torch.cat([layer.values[..., : self._prefix_tokens, :], layer.values[..., start:, :]], dim=-2)

    @contextmanager
    def question(self, cache: Cache) -> Iterator[Cache]:
        saved = [(layer.keys, layer.values) for layer in cache.layers]
        self.store.check()  # drops blocks whose files are gone (a documented skip)
        if not len(self.store):
            self.last_retrieved = []
            try:
                yield cache
            finally:
                self._restore_window(cache, saved)
            return
        if not self._attention:
            raise StreamStateError("RetrievalCache.bind(language_model) must be called before a question (the session does)")
        ids, representatives = self.store.representatives()
        handles = []
        try:
            with self.store.reader() as reader:
                state = _Question(cache, reader, ids, representatives.to(self._device), {})
                for index, module in enumerate(self._attention):
                    hook = partial(self._question_hook, state, index, QUERY_FUNCTIONS[type(module)])
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                yield cache
        finally:
            for handle in handles:
                handle.remove()
            self._restore_window(cache, saved)
        self.last_retrieved = [state.loaded.get(i, []) for i in range(len(self._attention))]
        self._stats.questions += 1
        self._stats.retrieval_ms += state.ms
        self._stats.last_retrieval_ms = state.ms
        self._stats.last_retrieved_blocks = max((len(b) for b in self.last_retrieved), default=0)

    def _question_hook(self, state: _Question, index: int, query_of: QueryFunction, module: nn.Module,
                       args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Forward pre-hook of attention layer `index` during a question (see the module docstring)."""
        if kwargs.get("past_key_values") is not state.cache:
            return None  # another stream's forward on the shared model
        layer = state.cache.layers[module.layer_idx]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if index not in state.loaded:  # the question's pre-fill: choose and load this layer's blocks
            start = time.perf_counter()
            query = query_of(module, hidden, *kwargs["position_embeddings"])
            chosen = select_blocks(query[0].float().mean(dim=1), state.representatives[:, index], self.retrieve_frames)
            block_ids = [state.ids[i] for i in chosen.tolist()]
            keys, values = state.reader.read(index, block_ids)
            at = self._prefix_tokens
            layer.keys = torch.cat([layer.keys[..., :at, :], keys[None].to(layer.keys), layer.keys[..., at:, :]], dim=-2)
            layer.values = torch.cat([layer.values[..., :at, :], values[None].to(layer.values),
                                      layer.values[..., at:, :]], dim=-2)
            state.loaded[index] = block_ids
            if layer.keys.is_cuda:
                torch.cuda.synchronize(layer.keys.device)
            state.ms += (time.perf_counter() - start) * 1e3
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = _fit_mask(mask, layer.get_seq_length() + hidden.shape[1], self._prefix_tokens)
        return args, kwargs

    @staticmethod
    def _restore_window(cache: Cache, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give every layer back its window-only keys and values (updates replace, never modify, them)."""
        for layer, (keys, values) in zip(cache.layers, saved):
            layer.keys, layer.values = keys, values

    # -- stats, persistence, release ----------------------------------------------------------

    @property
    def stats(self) -> MemoryStats:
        """A snapshot of the counters, with the store's sizes read now."""
        stats = MemoryStats(**asdict(self._stats))
        stats.window_tokens, stats.window_frames = self._window_tokens, len(self._window)
        blocks = self.store.blocks
        stats.offloaded_blocks, stats.offloaded_tokens = len(blocks), sum(b.length for b in blocks)
        stats.deleted_blocks, stats.lost_blocks = self.store.blocks_deleted, self.store.blocks_lost
        stats.host_bytes, stats.disk_bytes = self.store.host_bytes, self.store.disk_bytes
        stats.representative_bytes = self.store.representative_bytes
        return stats

    def memory_stats(self) -> dict[str, Any]:
        return {"policy": "retrieval", **self.stats.to_dict()}

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments (JSON values) that make this policy again."""
        store = self.store
        disk = {"offload_dir": str(store.offload_dir), "offload_budget": store.budget_bytes,
                "segment_blocks": store.segment_blocks} if isinstance(store, DiskStore) else {}
        return {"window_tokens": self.window_tokens, "retrieve_frames": self.retrieve_frames, **disk}

    def bookkeeping(self) -> dict[str, Any]:
        """Per-stream state besides the cache and the store, as JSON."""
        return {"prefix_tokens": self._prefix_tokens, "window": [asdict(b) for b in self._window],
                "next_id": self._next_id, "stats": asdict(self._stats)}

    def load_bookkeeping(self, state: dict[str, Any]) -> None:
        self._prefix_tokens = state["prefix_tokens"]
        self._window = deque(CacheBlock(**b) for b in state["window"])
        self._window_tokens = sum(b.length for b in self._window)
        self._next_id = state["next_id"]
        self._stats = MemoryStats(**state["stats"])

    def save(self, cache: Cache, directory: Path) -> None:
        """Write the window (window.safetensors), the store (host: its blocks; disk: its segment
        files, hard-linked, with their sizes and checksums; under store/) and the bookkeeping
        (policy.json) under `directory`."""
        directory = Path(directory)
        save_file({f"{kind}.{i}": getattr(layer, name).contiguous().cpu()
                   for i, layer in enumerate(cache.layers) for kind, name in (("k", "keys"), ("v", "values"))},
                  str(directory / "window.safetensors"))
        (directory / "store").mkdir(exist_ok=True)
        manifest = self.store.save(directory / "store")
        record = {"class": type(self).__name__, "bookkeeping": self.bookkeeping(), "store": manifest}
        (directory / "policy.json").write_text(json.dumps(record))

    def restore(self, config: PretrainedConfig, directory: Path) -> Cache:
        """The inverse of `save` on a fresh instance: the window cache (on the bound model's device),
        the bookkeeping and the store (a disk store links the saved segments into its own new
        directory); segments missing from the save are dropped with a warning."""
        directory = Path(directory)
        record = json.loads((directory / "policy.json").read_text())
        if record.get("class") != type(self).__name__:
            raise ConfigError(f"this memory was saved by a {record.get('class')}, not a {type(self).__name__}")
        kind = record["store"]["kind"]
        if kind != ("disk" if isinstance(self.store, DiskStore) else "host"):
            raise ConfigError(f"this memory was saved with a {kind} offload store; restore it into a RetrievalCache "
                              f"{'with offload_dir' if kind == 'disk' else 'without offload_dir'}")
        cache = DynamicCache(config=config)
        tensors = load_file(str(directory / "window.safetensors"), device=str(self._device))
        for i in range(len(tensors) // 2):
            cache.update(tensors[f"k.{i}"], tensors[f"v.{i}"], i)
        self.store.restore(directory / "store", record["store"], self._device)
        self.load_bookkeeping(record["bookkeeping"])
        return cache

    def close(self) -> None:
        self.store.close()


__all__ = ["MemoryStats", "QUERY_FUNCTIONS", "RetrievalCache", "attention_layers", "select_blocks"]
