"""Saving and loading a `StreamingSession`'s stream: `session.save(dir)`, `session.load(dir)`,
`StreamingSession.restore(dir, model=...)` delegate here.

A save holds the stream's whole memory: the KV cache (through its cache policy, `CachePolicy.save`)
and the session's `state_dict()` (the Cacher's reference and schedule, the Pruner's history, the
host stream's positions and protocol state, frames waiting for their pair, kept tokens waiting for
their pre-fill, counters and stats), with the settings and a fingerprint of the model and tokenizer.
`restore` makes a session with those settings on the same model and loads it (`load` loads into an
existing session made alike, e.g. a `spawn`); the next push and ask then give what the saving
session would have given. Saves are atomic and verified (`streamtc.memory.persist`).

Layout of a save directory: `session.json` (settings and the state's JSON part),
`state.safetensors` (the state's tensors), `memory/` (the cache policy's files). This module knows
the session only by its public attributes and state; the session class is handed to `restore`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel

from .config import STCConfig
from .errors import SnapshotError, StreamStateError
from .hosts import host_for
from .hosts.qwen_preprocess import QwenVLPreprocessor
from .memory import CachePolicy
from .memory.persist import (
    join_tensors, model_fingerprint, open_snapshot, read_json, read_tensors, split_tensors, tokenizer_fingerprint,
    write_json, write_tensors, writing_snapshot,
)
from .preprocess import FrameInput, FramePreprocessor
from .presets.tokenizer import tokenizer_for_config

# A `StreamingSession` (this module does not import the session: the session imports it).
Session = TypeVar("Session")

# The built-in preprocessors a save records by class and fields (a custom one must be passed again).
PREPROCESSORS = {cls.__name__: cls for cls in (FramePreprocessor, QwenVLPreprocessor)}


def save_session(session: Any, directory: str | Path) -> Path:
    """Write `session`'s stream to `directory`, replacing a previous save only once complete."""
    with writing_snapshot(directory) as staging:
        write_session(session, staging)
    return Path(directory)


def write_session(session: Any, staging: Path) -> None:
    """Write `session`'s stream into the empty staging directory of a `writing_snapshot`: the files
    of a save, not yet committed (a server writes them between two frames and commits them, which
    hashes and fsyncs, on another thread)."""
    if session.selector is not None or session.encoder is not None:
        raise StreamStateError("a session with a custom selector or encoder cannot be saved: their per-stream "
                               "state is not streamtc's to serialise")
    tensors: dict[str, torch.Tensor] = {}
    state = split_tensors(session.state_dict(), tensors)
    write_tensors(staging / "state.safetensors", tensors)
    write_json(staging / "session.json", {"settings": settings_record(session), "state": state})
    (staging / "memory").mkdir()
    session.memory.save(session.cache, staging / "memory")


def load_session(session: Session, directory: str | Path) -> Session:
    """Replace `session`'s stream by the one saved in `directory` (the session must have been made
    like the saved one; `restore_session` makes such a session from the save itself)."""
    session.check_open()
    snapshot = open_snapshot(directory)
    record = read_json(snapshot / "session.json")
    _check_same_model(record["settings"], session.model, session.tokenizer)
    return _load_snapshot(session, snapshot, record)


def restore_session(cls: type[Session], directory: str | Path, model: PreTrainedModel, tokenizer: Any = None, *,
                    preprocessor: Callable[[FrameInput], Sequence[torch.Tensor]] | None = None,
                    cache_policy: Callable[[], CachePolicy] | None = None, **session_kwargs: Any) -> Session:
    """A new `cls` session on `model` resuming the stream saved in `directory`, with the saved
    settings (see `StreamingSession.restore`)."""
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
        return _load_snapshot(session, snapshot, record)
    except BaseException:
        session.close()
        raise


def settings_record(session: Any) -> dict[str, Any]:
    """What a save must match to be loaded into a session (JSON): the model and tokenizer, and the
    stream settings."""
    return {"model": model_fingerprint(session.model), "tokenizer": tokenizer_fingerprint(session.tokenizer),
            **stream_settings(session)}


def stream_settings(session: Any) -> dict[str, Any]:
    """The settings a saved stream and the session it loads into must share (JSON-ready)."""
    policy = session.memory
    return {
        "host": {"class": type(session.host).__name__, "protocol": session.host.protocol,
                 "settings": session.host.settings()},
        "stc": None if session.stc is None else session.stc.to_dict(),
        "system_prompt": session.system_prompt,
        "chunk_frames": session.chunk_frames,
        "prefill_min_tokens": session.prefill_min_tokens,
        "preprocessor": _preprocessor_record(session.preprocessor),
        "cache_policy": {"class": f"{type(policy).__module__}.{type(policy).__qualname__}",
                         "settings": policy.settings()},
    }


def _load_snapshot(session: Session, snapshot: Path, record: dict[str, Any]) -> Session:
    """Load a verified snapshot, saved on `session`'s model and tokenizer (checked by the caller),
    into `session`; nothing changes unless all of it loads."""
    _check_same_settings(record["settings"], json.loads(json.dumps(stream_settings(session), default=str)))
    state = join_tensors(record["state"], read_tensors(snapshot / "state.safetensors"))
    policy = session.cache_policy()
    policy.bind(session.host.language_model)
    try:
        session.load_state_dict(state, policy, policy.restore(session.model.config, snapshot / "memory"))
    except BaseException:
        if session.memory is not policy:
            policy.close()  # what the new policy made outside the cache (a disk store's directory)
        raise
    return session


def _check_same_settings(saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """SnapshotError unless the saved stream settings are this session's."""
    for key in ("host", "stc", "system_prompt", "chunk_frames", "prefill_min_tokens"):
        if saved[key] != expected[key]:
            raise SnapshotError(f"the stream was saved with {key}={saved[key]!r}, this session has "
                                f"{expected[key]!r}; make the session with the saved settings "
                                "(StreamingSession.restore does)")
    if None not in (saved["preprocessor"], expected["preprocessor"]) and saved["preprocessor"] != expected["preprocessor"]:
        raise SnapshotError(f"the stream was saved with preprocessor {saved['preprocessor']}, this session "
                            f"has {expected['preprocessor']}")
    if saved["cache_policy"]["class"] != expected["cache_policy"]["class"]:
        raise SnapshotError(f"the stream was saved with cache policy {saved['cache_policy']['class']}, this "
                            f"session makes {expected['cache_policy']['class']}")


def _preprocessor_record(preprocessor: Any) -> dict[str, Any] | None:
    """A built-in preprocessor's class and fields (JSON); None for a custom one."""
    if type(preprocessor) not in PREPROCESSORS.values():
        return None
    return json.loads(json.dumps({"class": type(preprocessor).__name__, "fields": asdict(preprocessor)}))


def _preprocessor_from_record(record: dict[str, Any] | None) -> Callable[[FrameInput], Sequence[torch.Tensor]]:
    if record is None:
        raise SnapshotError("the stream was saved with a custom preprocessor; pass the same one as preprocessor=")
    return PREPROCESSORS[record["class"]](**record["fields"])


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
    for key in ("class", "dtype", "config_sha256", "weights_sha256"):
        if saved[key] != now[key]:
            detail = f"{saved[key]}, this model is {now[key]}" if key in ("class", "dtype") else "differ"
            raise SnapshotError(f"the stream was saved on another model ({key.removesuffix('_sha256')}: {detail}); "
                                "restore it on the model it was saved with")
    if settings["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise SnapshotError("the stream was saved with another tokenizer (vocabulary, special tokens or chat "
                            "template differ); pass the model's own tokenizer")


__all__ = ["PREPROCESSORS", "load_session", "restore_session", "save_session", "settings_record", "stream_settings"]
