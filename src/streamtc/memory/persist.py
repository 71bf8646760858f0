"""Saving a stream's memory to a directory, so that a new process can resume it.

    with writing_snapshot(directory) as staging:   # write files under `staging`
        write_json(staging / "session.json", data)
        write_tensors(staging / "state.safetensors", tensors)
    snapshot = open_snapshot(directory)             # verified: read files under `snapshot`

Layout of a save directory (format version `FORMAT_VERSION`):

    DIR/CURRENT                   which snapshot is the save: {"format", "version", "snapshot",
                                  "manifest_sha256"}, replaced atomically (the commit point)
    DIR/snapshot-000007/          the saved files, and manifest.json: every file's size and SHA-256
    DIR/.staging-snapshot-000008-*/   a save being written (removed when a save fails or by the next one)

A save is written to a staging directory beside the current snapshot, its manifest written last,
every file and directory fsynced, then renamed to its final name and committed by atomically
replacing CURRENT. A crash at any point leaves CURRENT naming the previous, complete snapshot; the
next save clears what the crash left. Reading checks the format version, the manifest's hash and
every file's size and hash before anything is loaded, so a torn, truncated or deleted file is
refused with an error naming it, never half-loaded. One process writes a directory at a time.

Tensors go to safetensors files (no pickle: loading runs no code), bookkeeping to JSON.
`split_tensors` / `join_tensors` turn a nested structure with tensors in it into JSON plus named
tensors and back. `save_cache_layers` / `load_cache_layers` do that for a transformers
`DynamicCache` (what the cache policies use).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import SnapshotError

FORMAT = "streamtc-stream"
FORMAT_VERSION = 1  # bumped on any incompatible change of the saved files; readers refuse newer versions
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
SNAPSHOT_PREFIX = "snapshot-"
STAGING_PREFIX = ".staging-"
_TENSOR = "__tensor__"
_CHUNK = 1 << 20


# -- files ------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    """`data` as JSON at `path` (NaN and infinities allowed, as Python writes them)."""
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True))


def read_json(path: Path) -> Any:
    """The JSON at `path`; SnapshotError if it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SnapshotError(f"cannot read {path}: {error}") from None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Named tensors as one safetensors file (copied to host memory; views are compacted)."""
    compact = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        compact[name] = tensor
    save_file(compact, str(path))


def read_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file, on `device`."""
    try:
        return load_file(str(path), device=str(device))
    except (OSError, SafetensorError) as error:
        raise SnapshotError(f"cannot read tensors from {path}: {error}") from None


def split_tensors(tree: Any, tensors: dict[str, torch.Tensor], name: str = "") -> Any:
    """`tree` (dicts, lists, tuples, JSON scalars, tensors) as JSON: every tensor moves into
    `tensors` under its path (e.g. "pending.0.embeds") and is replaced by a reference."""
    if isinstance(tree, torch.Tensor):
        tensors[name] = tree
        return {_TENSOR: name}
    if isinstance(tree, dict):
        return {key: split_tensors(value, tensors, f"{name}.{key}" if name else str(key)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [split_tensors(value, tensors, f"{name}.{i}" if name else str(i)) for i, value in enumerate(tree)]
    return tree


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors` (tuples come back as lists)."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            if tree[_TENSOR] not in tensors:
                raise SnapshotError(f"the saved state refers to a tensor {tree[_TENSOR]!r} that is not in its file")
            return tensors[tree[_TENSOR]]
        return {key: join_tensors(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(value, tensors) for value in tree]
    return tree


# -- a transformers cache ---------------------------------------------------------------------------


def save_cache_layers(cache: Cache, directory: Path) -> None:
    """Every layer's keys and values under `directory` (cache.safetensors, cache.json)."""
    tensors: dict[str, torch.Tensor] = {}
    layers: list[int | None] = []
    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise SnapshotError(f"cache layer {index} is a {type(layer).__name__}; only DynamicLayer caches "
                                "(full attention) can be saved")
        if layer.is_initialized and layer.keys is not None:
            tensors[f"{index}.keys"], tensors[f"{index}.values"] = layer.keys, layer.values
            layers.append(int(layer.keys.shape[-2]))
        else:
            layers.append(None)
    write_tensors(directory / "cache.safetensors", tensors)
    write_json(directory / "cache.json", {"layers": layers})


def load_cache_layers(cache: Cache, directory: Path) -> Cache:
    """Fill the empty `cache` (made for the same model) with the layers `save_cache_layers` wrote."""
    layers = read_json(directory / "cache.json")["layers"]
    tensors = read_tensors(directory / "cache.safetensors")
    if len(layers) != len(cache.layers):
        raise SnapshotError(f"the saved cache has {len(layers)} layers, this model's has {len(cache.layers)}")
    for index, (tokens, layer) in enumerate(zip(layers, cache.layers)):
        if type(layer) is not DynamicLayer:
            raise SnapshotError(f"cache layer {index} is a {type(layer).__name__}; only DynamicLayer caches load")
        if tokens is None:
            continue
        keys, values = tensors[f"{index}.keys"], tensors[f"{index}.values"]
        if keys.shape[-2] != tokens or values.shape[-2] != tokens:
            raise SnapshotError(f"cache layer {index} holds {keys.shape[-2]} tokens, its record says {tokens}")
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


# -- fingerprints -------------------------------------------------------------------------------

_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "attn_implementation"}
_SAMPLE = 16  # elements read from each end of every weight tensor


def _stable_config(value: Any) -> Any:
    """A config dict without what varies between loads of one model (paths, versions, dtype, attention backend)."""
    if isinstance(value, dict):
        return {k: _stable_config(v) for k, v in value.items()
                if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_stable_config(v) for v in value]
    return value


def model_fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """What identifies a model for a saved stream: its class, dtype, a hash of its config (without
    paths, versions and the attention backend), and a hash of every weight tensor's name, shape and
    first and last few values (cheap for billions of weights; tells checkpoints and seeds apart)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            flat = parameter.detach().reshape(-1)
            sample = flat if flat.numel() <= 2 * _SAMPLE else torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]])
            digest.update(f"{name}{tuple(parameter.shape)}".encode())
            digest.update(sample.float().cpu().numpy().tobytes())
    config = json.dumps(_stable_config(model.config.to_dict()), sort_keys=True, default=str)
    return {
        "class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "weights_sha256": digest.hexdigest(),
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of a tokenizer's size, chat template, special tokens and the ids of a probe text."""
    probe = "<|im_start|>user\nTime=0.0-1.0s What is happening in the video?<|im_end|>\n"
    data = {"size": len(tokenizer), "template": tokenizer.chat_template,
            "special": sorted(map(str, tokenizer.all_special_tokens)),
            "probe": tokenizer(probe, add_special_tokens=False)["input_ids"]}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# -- snapshots ----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or directory to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _read_pointer(directory: Path) -> dict[str, Any] | None:
    """CURRENT's content, None when there is no save yet."""
    path = directory / CURRENT
    if not path.exists():
        return None
    pointer = read_json(path)
    if not isinstance(pointer, dict) or pointer.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a streamtc save pointer")
    version = pointer.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SnapshotError(f"{directory} was saved in format version {version}; this streamtc reads versions up to "
                            f"{FORMAT_VERSION}: upgrade streamtc to resume it")
    name = pointer.get("snapshot")
    if not isinstance(name, str) or not name.startswith(SNAPSHOT_PREFIX) or "/" in name:
        raise SnapshotError(f"{path} names no snapshot")
    return pointer


def _clear_leftovers(directory: Path, keep: str | None) -> None:
    """Remove what interrupted saves left (staging directories, unreferenced snapshots)."""
    for entry in directory.iterdir():
        stale = entry.name.startswith(STAGING_PREFIX) or entry.name == f".{CURRENT}.tmp" or (
            entry.name.startswith(SNAPSHOT_PREFIX) and entry.name != keep)
        if stale:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


@contextmanager
def writing_snapshot(directory: Path | str) -> Iterator[Path]:
    """Write a new save of `directory`: yields an empty staging directory to fill; on a clean exit
    the manifest is written, everything fsynced, and the save committed atomically (CURRENT). On an
    error the staging directory is removed and the previous save stays as it was."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pointer = _read_pointer(directory)
    if pointer is None:
        foreign = [e.name for e in directory.iterdir()
                   if not e.name.startswith((STAGING_PREFIX, SNAPSHOT_PREFIX, f".{CURRENT}"))]
        if foreign:
            raise SnapshotError(f"{directory} is not empty and holds no streamtc save ({', '.join(sorted(foreign)[:3])}"
                                "...): save into an empty or new directory")
    current = None if pointer is None else pointer["snapshot"]
    _clear_leftovers(directory, keep=current)
    number = 1 if current is None else int(current[len(SNAPSHOT_PREFIX):]) + 1
    name = f"{SNAPSHOT_PREFIX}{number:06d}"
    staging = directory / f"{STAGING_PREFIX}{name}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        files = {p.relative_to(staging).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in _files(staging)}
        write_json(staging / MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION, "files": files})
        for path in _files(staging):
            _fsync(path)
        for folder in sorted({p.parent for p in _files(staging)}, key=lambda p: len(p.parts), reverse=True):
            _fsync(folder)
        final = directory / name
        os.rename(staging, final)
        _fsync(directory)
        temporary = directory / f".{CURRENT}.tmp"
        write_json(temporary, {"format": FORMAT, "version": FORMAT_VERSION, "snapshot": name,
                               "manifest_sha256": _sha256(final / MANIFEST)})
        _fsync(temporary)
        os.replace(temporary, directory / CURRENT)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if current is not None:
        shutil.rmtree(directory / current, ignore_errors=True)


def open_snapshot(directory: Path | str) -> Path:
    """The verified snapshot of a save directory: its format version, its manifest's hash and every
    listed file's size and SHA-256 are checked; SnapshotError naming what is wrong otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SnapshotError(f"{directory}: no such save directory")
    pointer = _read_pointer(directory)
    if pointer is None:
        raise SnapshotError(f"{directory} holds no completed save (no {CURRENT} file); a save interrupted before "
                            "its commit leaves none")
    snapshot = directory / pointer["snapshot"]
    manifest_path = snapshot / MANIFEST
    if not manifest_path.is_file():
        raise SnapshotError(f"{manifest_path} is missing: the save at {directory} is damaged")
    if _sha256(manifest_path) != pointer.get("manifest_sha256"):
        raise SnapshotError(f"{manifest_path} does not match its checksum: the save at {directory} is damaged")
    manifest = read_json(manifest_path)
    for relative, record in manifest["files"].items():
        path = snapshot / relative
        if not path.is_file():
            raise SnapshotError(f"{path} is missing: the save at {directory} is damaged or incomplete")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise SnapshotError(f"{path} has {size} bytes, the save wrote {record['bytes']}: the save at {directory} "
                                "is truncated or damaged")
        if _sha256(path) != record["sha256"]:
            raise SnapshotError(f"{path} does not match its checksum: the save at {directory} is damaged")
    return snapshot


__all__ = [
    "CURRENT", "FORMAT", "FORMAT_VERSION", "MANIFEST", "join_tensors", "load_cache_layers", "model_fingerprint",
    "open_snapshot", "read_json", "read_tensors", "save_cache_layers", "split_tensors", "tokenizer_fingerprint",
    "write_json", "write_tensors", "writing_snapshot",
]
