"""Offload stores: where a `RetrievalCache` keeps the frame blocks that left its window.

A block is one frame's keys and values for every LLM layer, as they sat in the cache (rotated at
the positions they were pre-filled at), plus its representative key per layer (the block's mean
key). A question scores every block by its representatives (kept in memory on the model's device,
always), then reads the chosen blocks layer by layer through one `reader()` per question.

    HostStore   blocks in host memory (the default; ReKV keeps them in CPU memory too).
    DiskStore   blocks in safetensors segment files under a directory, with a byte budget: past
                it the oldest segments are deleted (their blocks are forgotten). For streams that
                run for days.

Disk layout. Evicted blocks wait in host memory until `segment_blocks` of them are there, then go
to one file `segment-<n>.safetensors` (written under a temporary name and renamed, so a crash
never leaves a half-written segment under a segment's name). Each block's keys and values are
tensors `k.<id>` / `v.<id>` of shape [layers, kv_heads, tokens, head_dim], so one layer's slab is
contiguous. A question opens each segment it needs once (memory-mapped) and slices the layer's
slab of every chosen block from it: reads are batched per segment, never one file per block per
layer.

Faults (a segment deleted, truncated or rewritten under a live stream). Before each question the
store checks every segment file's size against the size it wrote: a missing or resized segment is
dropped with a warning, its blocks are forgotten (counted in `blocks_lost`) and the question is
answered from the remaining blocks (a documented skip). Each slab read is checked against the
CRC-32 recorded when it was written; a mismatch, or a file that vanishes or cannot be parsed
between that check and the read, raises `OffloadError` for that question, and the segment's
blocks are dropped so the next question works. A wrong block is never used silently, and the
stream itself goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, OffloadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockInfo:
    """One offloaded frame block: `id` (offload order, monotonic over the stream), the frame and
    timestamp of its first frame, the RoPE position of its first token and its token count."""

    id: int
    frame: int | None
    timestamp: float | None
    position: int
    length: int


def crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (any dtype; read back through a byte view)."""
    return zlib.crc32(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


class BlockReader(ABC):
    """Reads one layer's keys and values of chosen blocks during one question."""

    @abstractmethod
    def read(self, layer: int, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv_heads, tokens, head_dim] of blocks `ids` at `layer`, concatenated
        in the order given (on the device the blocks were offloaded from)."""


class OffloadStore(ABC):
    """Where evicted frame blocks go (see the module docstring). One store per stream."""

    def __init__(self) -> None:
        self._infos: dict[int, BlockInfo] = {}  # insertion order = offload order
        self._reps: dict[int, torch.Tensor] = {}  # id -> representative keys [L, Hkv, D] float32
        self._stacked: tuple[list[int], torch.Tensor] | None = None
        self.blocks_lost = 0  # dropped after a fault
        self.blocks_deleted = 0  # deleted by a budget

    # -- bookkeeping shared by every store ---------------------------------------------------

    @property
    def blocks(self) -> list[BlockInfo]:
        """The blocks held, oldest first."""
        return list(self._infos.values())

    def __len__(self) -> int:
        return len(self._infos)

    def representatives(self) -> tuple[list[int], torch.Tensor]:
        """Block ids (oldest first) and their representative keys stacked [N, L, Hkv, D] float32."""
        if self._stacked is None:
            ids = list(self._infos)
            self._stacked = (ids, torch.stack([self._reps[i] for i in ids]) if ids else torch.empty(0))
        return self._stacked

    @property
    def representative_bytes(self) -> int:
        return sum(r.nbytes for r in self._reps.values())

    def add(self, info: BlockInfo, keys: torch.Tensor, values: torch.Tensor, representative: torch.Tensor) -> None:
        """Offload one block: keys/values [L, Hkv, n, D], representative [L, Hkv, D]."""
        self._infos[info.id] = info
        self._reps[info.id] = representative
        self._stacked = None
        self._put(info, keys, values)

    def _forget(self, ids: Sequence[int]) -> None:
        for i in ids:
            self._infos.pop(i, None)
            self._reps.pop(i, None)
        self._stacked = None

    def check(self) -> list[BlockInfo]:
        """Before a question: drop blocks whose storage is gone (returns them). Host memory cannot
        lose blocks."""
        return []

    def clear(self) -> None:
        """Forget every block (a new stream)."""
        self._forget(list(self._infos))
        self.blocks_lost = self.blocks_deleted = 0

    def close(self) -> None:
        """Release what the store holds outside the process (files)."""

    # -- what each store does ----------------------------------------------------------------

    @abstractmethod
    def _put(self, info: BlockInfo, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep one block's keys and values."""

    @abstractmethod
    def reader(self) -> Any:
        """A context manager yielding a `BlockReader` for one question."""

    @property
    @abstractmethod
    def host_bytes(self) -> int:
        """Bytes of block keys and values held in host memory."""

    @property
    def disk_bytes(self) -> int:
        """Bytes of block files on disk."""
        return 0

    @abstractmethod
    def save(self, directory: Path) -> dict[str, Any]:
        """Write the store's blocks (or a record of its files) under `directory`; returns the
        manifest `restore` takes."""

    @abstractmethod
    def restore(self, directory: Path, manifest: dict[str, Any], device: torch.device) -> None:
        """The inverse of `save`: hold the saved blocks again (representatives on `device`)."""

    def _manifest(self) -> dict[str, Any]:
        return {"blocks": [asdict(info) for info in self._infos.values()], "blocks_lost": self.blocks_lost,
                "blocks_deleted": self.blocks_deleted}

    def _save_representatives(self, directory: Path) -> None:
        save_file({f"r.{i}": r.contiguous().cpu() for i, r in self._reps.items()}, str(directory / "representatives.safetensors"))

    def _load_bookkeeping(self, directory: Path, manifest: dict[str, Any], device: torch.device) -> None:
        reps = load_file(str(directory / "representatives.safetensors"), device=str(device))
        self.clear()
        for entry in manifest["blocks"]:
            info = BlockInfo(**entry)
            self._infos[info.id] = info
            self._reps[info.id] = reps[f"r.{info.id}"]
        self.blocks_lost, self.blocks_deleted = manifest["blocks_lost"], manifest["blocks_deleted"]


# -- host memory --------------------------------------------------------------------------------


class _HostReader(BlockReader):
    def __init__(self, blocks: dict[int, tuple[torch.Tensor, torch.Tensor]], device: torch.device | None) -> None:
        self._blocks, self._device = blocks, device

    def read(self, layer: int, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat([self._blocks[i][0][layer] for i in ids], dim=-2)
        values = torch.cat([self._blocks[i][1][layer] for i in ids], dim=-2)
        return keys.to(self._device, non_blocking=True), values.to(self._device, non_blocking=True)


class HostStore(OffloadStore):
    """Blocks in host (CPU) memory; read back to the model's device at a question."""

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._device: torch.device | None = None

    def _put(self, info: BlockInfo, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._device = keys.device
        self._blocks[info.id] = (keys.to("cpu"), values.to("cpu"))

    def _forget(self, ids: Sequence[int]) -> None:
        super()._forget(ids)
        for i in ids:
            self._blocks.pop(i, None)

    @contextmanager
    def reader(self) -> Iterator[BlockReader]:
        yield _HostReader(self._blocks, self._device)

    @property
    def host_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._blocks.values())

    def save(self, directory: Path) -> dict[str, Any]:
        tensors = {}
        for i, (keys, values) in self._blocks.items():
            tensors[f"k.{i}"], tensors[f"v.{i}"] = keys.contiguous(), values.contiguous()
        save_file(tensors, str(directory / "blocks.safetensors"))
        self._save_representatives(directory)
        return {"kind": "host", **self._manifest()}

    def restore(self, directory: Path, manifest: dict[str, Any], device: torch.device) -> None:
        self._load_bookkeeping(directory, manifest, device)
        tensors = load_file(str(directory / "blocks.safetensors"))
        self._blocks = {i: (tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in self._infos}
        self._device = device


# -- disk -----------------------------------------------------------------------------------------


@dataclass
class _Segment:
    """One segment file: its name, byte size, and per block the CRC-32 of each layer's key and
    value slab."""

    name: str
    size: int
    crcs: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)


class _DiskReader(BlockReader):
    def __init__(self, store: DiskStore, stack: ExitStack, device: torch.device | None) -> None:
        self._store, self._stack, self._device = store, stack, device
        self._open: dict[str, Any] = {}

    def _file(self, segment: _Segment) -> Any:
        handle = self._open.get(segment.name)
        if handle is None:
            path = self._store.directory / segment.name
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as error:  # missing, truncated or unparsable: this segment is gone
                self._store._drop_segment(segment, f"cannot be opened ({error})")
                raise OffloadError(
                    f"offloaded KV segment {path} cannot be read ({error}); its blocks were dropped from the "
                    "stream's memory: ask the question again (it will be answered without them)"
                ) from error
            self._open[segment.name] = handle
        return handle

    def read(self, layer: int, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = [], []
        for i in ids:
            pending = self._store._pending.get(i)
            if pending is not None:
                keys.append(pending[0][layer])
                values.append(pending[1][layer])
                continue
            segment = self._store._segment_of[i]
            handle = self._file(segment)
            crc_k, crc_v = segment.crcs[i]
            try:
                key = handle.get_slice(f"k.{i}")[layer]
                value = handle.get_slice(f"v.{i}")[layer]
            except Exception as error:
                key = value = None
                reason = f"cannot be read ({error})"
            else:
                reason = "fails its checksum" if (crc32(key) != crc_k[layer] or crc32(value) != crc_v[layer]) else None
            if reason is not None:
                path = self._store.directory / segment.name
                self._store._drop_segment(segment, reason)
                raise OffloadError(
                    f"offloaded KV block {i} (layer {layer}) in {path} {reason}; the segment's blocks were dropped "
                    "from the stream's memory: ask the question again (it will be answered without them)"
                )
            keys.append(key)
            values.append(value)
        return (torch.cat(keys, dim=-2).to(self._device, non_blocking=True),
                torch.cat(values, dim=-2).to(self._device, non_blocking=True))


class DiskStore(OffloadStore):
    """Blocks in safetensors segment files under a private directory made in `offload_dir`, at
    most `budget_bytes` of them (None: unbounded; the oldest segments are deleted past it), with
    `segment_blocks` blocks per file (the newest blocks wait in host memory until a file is full).
    The directory is created at the first write and removed by `close()` and at a new stream.
    """

    def __init__(self, offload_dir: str | Path, budget_bytes: int | None = None, segment_blocks: int = 16) -> None:
        super().__init__()
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                         or budget_bytes < 0):
            raise ConfigError(f"offload budget must be None or an int >= 0 (bytes), got {budget_bytes!r}")
        if isinstance(segment_blocks, bool) or not isinstance(segment_blocks, int) or segment_blocks < 1:
            raise ConfigError(f"segment_blocks must be an int >= 1, got {segment_blocks!r}")
        self.offload_dir = Path(offload_dir)
        self.budget_bytes = budget_bytes
        self.segment_blocks = segment_blocks
        self._directory: Path | None = None
        self._segments: list[_Segment] = []  # oldest first
        self._segment_of: dict[int, _Segment] = {}
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._next_segment = 0
        self._device: torch.device | None = None

    @property
    def directory(self) -> Path:
        """This stream's segment directory (made on first use)."""
        if self._directory is None:
            self.offload_dir.mkdir(parents=True, exist_ok=True)
            self._directory = Path(tempfile.mkdtemp(prefix="stream-", dir=self.offload_dir))
        return self._directory

    def _put(self, info: BlockInfo, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._device = keys.device
        self._pending[info.id] = (keys.to("cpu"), values.to("cpu"))
        if len(self._pending) >= self.segment_blocks:
            self.flush()

    def flush(self) -> None:
        """Write the blocks waiting in host memory as one segment file, then apply the budget."""
        if not self._pending:
            return
        segment = _Segment(f"segment-{self._next_segment:08d}.safetensors", 0)
        self._next_segment += 1
        tensors = {}
        for i, (keys, values) in self._pending.items():
            tensors[f"k.{i}"], tensors[f"v.{i}"] = keys.contiguous(), values.contiguous()
            segment.crcs[i] = ([crc32(k) for k in keys], [crc32(v) for v in values])
        path = self.directory / segment.name
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)
        segment.size = path.stat().st_size
        self._segments.append(segment)
        for i in self._pending:
            self._segment_of[i] = segment
        self._pending = {}
        while self.budget_bytes is not None and self.disk_bytes > self.budget_bytes and self._segments:
            oldest = self._segments[0]
            self.blocks_deleted += len(oldest.crcs)
            self._remove_segment(oldest)
            (self.directory / oldest.name).unlink(missing_ok=True)

    def _remove_segment(self, segment: _Segment) -> None:
        self._segments.remove(segment)
        for i in segment.crcs:
            self._segment_of.pop(i, None)
        self._forget(list(segment.crcs))

    def _drop_segment(self, segment: _Segment, reason: str) -> None:
        """A segment that failed a check: forget its blocks (they are lost, and counted)."""
        if segment not in self._segments:
            return
        logger.warning("offloaded KV segment %s %s: dropping its %d blocks", self.directory / segment.name,
                       reason, len(segment.crcs))
        self.blocks_lost += len([i for i in segment.crcs if i in self._infos])
        self._remove_segment(segment)

    def check(self) -> list[BlockInfo]:
        dropped = []
        directory = str(self.directory)
        for segment in list(self._segments):
            try:
                size = os.stat(os.path.join(directory, segment.name)).st_size  # a plain stat: one per segment
            except FileNotFoundError:
                size = None
            if size != segment.size:
                dropped.extend(self._infos[i] for i in segment.crcs if i in self._infos)
                self._drop_segment(segment, "is missing" if size is None else f"has {size} bytes, not {segment.size}")
        return dropped

    @contextmanager
    def reader(self) -> Iterator[BlockReader]:
        with ExitStack() as stack:
            yield _DiskReader(self, stack, self._device)

    @property
    def host_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._pending.values())

    @property
    def disk_bytes(self) -> int:
        return sum(segment.size for segment in self._segments)

    def clear(self) -> None:
        super().clear()
        self.close()
        self._segments, self._segment_of, self._pending, self._next_segment = [], {}, {}, 0

    def close(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def save(self, directory: Path) -> dict[str, Any]:
        """Flush the waiting blocks to a segment, then put the segment files in `directory` as
        hard links (no bytes copied; a copy on another file system), recorded by name, size and
        checksums. The save owns its files: the live stream deleting its own (the budget, `close()`)
        leaves the save whole. Segments already damaged are dropped first, as a question would."""
        self.flush()
        self.check()
        self._save_representatives(directory)
        for segment in self._segments:
            link_or_copy(self.directory / segment.name, directory / segment.name)
        segments = [{"name": s.name, "size": s.size, "crcs": {str(i): c for i, c in s.crcs.items()}}
                    for s in self._segments]
        return {"kind": "disk", "next_segment": self._next_segment, "segments": segments, **self._manifest()}

    def restore(self, directory: Path, manifest: dict[str, Any], device: torch.device) -> None:
        """Take the saved blocks back: the save's segment files are linked (or copied) into a new
        private directory, so this stream's deletions never touch the save."""
        self._load_bookkeeping(directory, manifest, device)
        self._next_segment = manifest["next_segment"]
        self._segments = [
            _Segment(s["name"], s["size"], {int(i): (c[0], c[1]) for i, c in s["crcs"].items()})
            for s in manifest["segments"]
        ]
        for segment in self._segments:
            if (directory / segment.name).is_file():
                link_or_copy(directory / segment.name, self.directory / segment.name)
        self._segment_of = {i: s for s in self._segments for i in s.crcs}
        self._device = device
        self.check()  # segments missing from the save are dropped now, with a warning


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to `source`, or a copy where a link cannot be made (another file
    system, or one without hard links). Segment files are never modified once written, so the
    two names can share the bytes."""
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(source, target)


__all__ = ["BlockInfo", "BlockReader", "DiskStore", "HostStore", "OffloadStore", "crc32"]
