"""Saving and restoring a stream (`session.save`, `StreamingSession.restore`, `session.load`): after a
restore the next push and ask equal an uninterrupted session's, bit for bit, on LLaVA-OneVision,
Qwen2-VL and Qwen3-VL, with STC on (Cacher between refreshes, Pruner history, tokens pending) and off, with full,
windowed and retrieval memory (blocks on disk) after evictions; torn, truncated and foreign saves are refused."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from streamtc import CacherConfig, PrunerConfig, STCConfig
from streamtc.errors import SnapshotError, StreamStateError
from streamtc.memory import FullCache, RetrievalCache, SlidingWindowCache, persist
from streamtc.presets import build_model
from streamtc.session import StreamingSession
from streamtc.presets.tokenizer import tokenizer_for_config

from conftest import drifting_frames as make_frames

QUESTION = "What is the man holding?"
STC = STCConfig(cacher=CacherConfig(cache_interval=2), pruner=PrunerConfig(keep_ratio=0.5))
WINDOW = 20  # visual tokens: a frame or two of the tiny LLaVA-OV preset, so the streams below evict
QWEN_WINDOW = 4  # under one temporal patch of the tiny Qwen presets: only the newest stays


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return make_frames(9)


def stamps(start: int, stop: int) -> list[float]:
    return [float(t) for t in range(start, stop)]


def continue_stream(session: StreamingSession, frames: np.ndarray, split: int) -> tuple[torch.Tensor, list[int], dict]:
    """Push the rest of the clip, then the question's logits, a short answer and the counters."""
    session.push(frames[split:], stamps(split, len(frames)))
    logits = session.next_token_logits(QUESTION)
    answer = session.ask(QUESTION, max_new_tokens=4).token_ids
    stats = session.stats.to_dict()
    return logits, answer, {k: stats[k] for k in ("frames", "chunks", "visual_tokens", "visual_tokens_encoded",
                                                   "prompt_tokens", "cache_tokens", "pending_tokens", "cacher")}


@pytest.mark.parametrize("preset", ["tiny-llava-ov", "qwen2-vl-tiny", "qwen3-vl-tiny"])
@pytest.mark.parametrize("stc", [None, STC], ids=["no-stc", "stc"])
@pytest.mark.parametrize("memory", ["full", "window", "retrieval"])
def test_a_restored_stream_continues_exactly_as_the_uninterrupted_one(tmp_path, frames, preset, stc, memory) -> None:
    size = WINDOW if preset == "tiny-llava-ov" else QWEN_WINDOW
    policy = {"full": FullCache, "window": lambda: SlidingWindowCache(size),  # retrieval: blocks on disk
              "retrieval": lambda: RetrievalCache(size, 64, offload_dir=tmp_path / "blocks", segment_blocks=1)}[memory]
    first = StreamingSession.from_preset(preset, stc=stc, cache_policy=policy)
    split = 5 if preset == "tiny-llava-ov" else 7  # an odd number of chunks (one frame or two a chunk)
    first.push(frames[:split], stamps(0, split))
    if stc is not None:  # the save lands between two refreshes, with Pruner history
        assert first.cacher_state.chunk_index % 2 == 1 and first.pruner_state.frames > 0
    if preset != "tiny-llava-ov":
        assert first.waiting_frames == 1  # the seventh frame waits for its pair
    if memory == "window":
        assert first.memory.visual_tokens < first.stats.visual_tokens  # frames were evicted
    if memory == "retrieval":  # frames were offloaded, and some blocks are in segment files
        assert first.memory.stats.offloaded_blocks >= 1 and first.memory.stats.disk_bytes > 0
    first.save(tmp_path / "stream")
    assert first.last_timestamp == split - 1  # the last frame pushed (Qwen: the one waiting for its pair)
    expected = continue_stream(first, frames, split)
    first.close()  # a retrieval memory's own block files go with it; the save holds its own

    restored = StreamingSession.restore(tmp_path / "stream", first.model)
    assert restored.last_timestamp == split - 1
    got = continue_stream(restored, frames, split)
    restored.close()
    assert torch.equal(got[0], expected[0])
    assert got[1:] == expected[1:]


def test_livecc_turn_state_and_an_answer_after_restore(tmp_path, frames) -> None:
    first = StreamingSession.from_preset("livecc-tiny", stc=STC)
    first.push(frames[:8], stamps(0, 8))  # the 6-frame first turn and one 2-frame turn
    first.save(tmp_path / "stream")
    first.push(frames[8:], stamps(8, 9))
    expected = first.next_token_logits(QUESTION)
    first.close()
    restored = StreamingSession.restore(tmp_path / "stream", first.model)
    restored.push(frames[8:], stamps(8, 9))
    assert torch.equal(restored.next_token_logits(QUESTION), expected)


def test_a_spawned_session_loads_a_save_and_shares_the_cacher(tmp_path, frames) -> None:
    root = StreamingSession.from_preset("tiny-llava-ov", stc=STC)
    alone = root.spawn()
    alone.push(frames[:3], stamps(0, 3))
    alone.save(tmp_path / "stream")
    alone.push(frames[3:5], stamps(3, 5))
    expected = alone.next_token_logits(QUESTION)
    loaded = root.spawn().load(tmp_path / "stream")
    loaded.push(frames[3:5], stamps(3, 5))
    assert torch.equal(loaded.next_token_logits(QUESTION), expected)
    root.push(frames[:1], stamps(0, 1))  # the root's own stream is untouched by its spawns' saves
    assert root.frames == 1
    for session in (alone, loaded, root):
        session.close()


def test_a_save_made_on_another_model_or_with_other_settings_is_refused(tmp_path, frames) -> None:
    session = StreamingSession.from_preset("tiny-llava-ov", stc=None)
    session.push(frames[:2], stamps(0, 2))
    session.save(tmp_path / "stream")
    other = build_model("tiny-llava-ov", seed=1)  # same architecture and config, other weights
    with pytest.raises(SnapshotError, match="another model .weights"):
        StreamingSession.restore(tmp_path / "stream", other)
    with pytest.raises(SnapshotError, match="another model .dtype"):
        StreamingSession.restore(tmp_path / "stream", build_model("tiny-llava-ov", dtype=torch.bfloat16))
    tokenizer = tokenizer_for_config(session.model.config)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(SnapshotError, match="another tokenizer"):
        StreamingSession.restore(tmp_path / "stream", session.model, tokenizer)
    qwen = build_model("qwen2-vl-tiny")
    with pytest.raises(SnapshotError, match="another model .class"):
        StreamingSession.restore(tmp_path / "stream", qwen)
    with_stc = StreamingSession(session.model, session.tokenizer, STCConfig(cacher=None))
    with pytest.raises(SnapshotError, match="stc="):
        with_stc.load(tmp_path / "stream")
    assert with_stc.frames == 0  # a refused load changes nothing
    windowed = StreamingSession(session.model, session.tokenizer, None, cache_policy=lambda: SlidingWindowCache(9))
    with pytest.raises(SnapshotError, match="cache policy"):
        windowed.load(tmp_path / "stream")
    for s in (session, with_stc, windowed):
        s.close()


def _save_pair(tmp_path: Path, frames: np.ndarray) -> tuple[StreamingSession, Path, torch.Tensor]:
    """A save of a 2-frame stream and its next question's logits (Pruner only: restored sessions
    on the same model may run beside it without a second Cacher)."""
    session = StreamingSession.from_preset("tiny-llava-ov", stc=STCConfig(cacher=None),
                                           cache_policy=lambda: SlidingWindowCache(WINDOW))
    session.push(frames[:2], stamps(0, 2))
    directory = session.save(tmp_path / "stream")
    return session, directory, session.next_token_logits(QUESTION)


def test_a_save_that_fails_midway_leaves_the_previous_save_usable(tmp_path, frames, monkeypatch) -> None:
    session, directory, before = _save_pair(tmp_path, frames)
    session.push(frames[2:4], stamps(2, 4))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # the second tensor file (the cache) fails to write
        real, calls = persist.save_file, []
        patch.setattr(persist, "save_file", lambda *a, **k: (calls.append(1), broken() if len(calls) > 1 else real(*a, **k)))
        with pytest.raises(OSError, match="disk full"):
            session.save(directory)
    with monkeypatch.context() as patch:  # a crash just before the commit: the new snapshot is complete
        patch.setattr(persist.os, "replace", broken)
        with pytest.raises(OSError, match="disk full"):
            session.save(directory)
    assert {".CURRENT.tmp", "snapshot-000002"} <= {p.name for p in directory.iterdir()}  # what the crash left
    restored = StreamingSession.restore(directory, session.model)
    assert restored.frames == 2 and torch.equal(restored.next_token_logits(QUESTION), before)
    restored.close()
    # the next save clears what the failed ones left and commits
    session.save(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["CURRENT", "snapshot-000002"]
    assert StreamingSession.restore(directory, session.model).frames == 4
    session.close()


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "manifest", "no-current", "newer-version"])
def test_a_damaged_save_is_refused_with_the_damage_named(tmp_path, frames, damage) -> None:
    session, directory, _ = _save_pair(tmp_path, frames)
    snapshot = persist.open_snapshot(directory)
    cache_file = snapshot / "memory" / "cache.safetensors"
    if damage == "truncate":
        with open(cache_file, "r+b") as handle:
            handle.truncate(cache_file.stat().st_size // 2)
        message = "truncated"
    elif damage == "delete":
        (snapshot / "state.safetensors").unlink()
        message = "state.safetensors is missing"
    elif damage == "flip":
        data = bytearray(cache_file.read_bytes())
        data[-5] ^= 0x01
        cache_file.write_bytes(bytes(data))
        message = "cache.safetensors does not match its checksum"
    elif damage == "manifest":
        manifest = json.loads((snapshot / "manifest.json").read_text())
        manifest["files"]["session.json"]["bytes"] += 1
        (snapshot / "manifest.json").write_text(json.dumps(manifest))
        message = "manifest.json does not match its checksum"
    elif damage == "no-current":
        (directory / "CURRENT").unlink()
        message = "no completed save"
    else:
        pointer = json.loads((directory / "CURRENT").read_text())
        (directory / "CURRENT").write_text(json.dumps({**pointer, "version": persist.FORMAT_VERSION + 1}))
        message = "upgrade streamtc"
    with pytest.raises(SnapshotError, match=message):
        StreamingSession.restore(directory, session.model)
    fresh = session.spawn()
    with pytest.raises(SnapshotError, match=message):
        fresh.load(directory)
    assert fresh.frames == 0
    session.close()
    fresh.close()


def test_saving_into_a_foreign_directory_or_with_a_custom_selector_is_refused(tmp_path, frames) -> None:
    from streamtc.baselines import UniformPruner

    session = StreamingSession.from_preset("tiny-llava-ov", stc=None)
    session.push(frames[:1], stamps(0, 1))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SnapshotError, match="holds no streamtc save"):
        session.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    selecting = StreamingSession(session.model, session.tokenizer, None, selector=UniformPruner(tokens_per_frame=4))
    with pytest.raises(StreamStateError, match="custom selector"):
        selecting.save(tmp_path / "other")
    with pytest.raises(SnapshotError, match="no such save directory"):
        StreamingSession.restore(tmp_path / "missing", session.model)
    session.close()
    selecting.close()


def test_the_save_directory_holds_a_manifest_of_every_file(tmp_path, frames) -> None:
    session, directory, _ = _save_pair(tmp_path, frames)
    snapshot = persist.open_snapshot(directory)
    manifest = json.loads((snapshot / "manifest.json").read_text())
    listed = set(manifest["files"])
    on_disk = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk == {"session.json", "state.safetensors", "memory/cache.json",
                                 "memory/cache.safetensors", "memory/policy.json"}
    assert manifest["version"] == persist.FORMAT_VERSION
    settings = json.loads((snapshot / "session.json").read_text())["settings"]
    assert settings["cache_policy"] == {"class": "streamtc.memory.policies.SlidingWindowCache",
                                        "settings": {"max_visual_tokens": WINDOW}}
    assert os.path.getsize(snapshot / "memory" / "cache.safetensors") > 0
    session.close()


# -- the session's own state, without files ---------------------------------------------------------


def test_state_dict_and_a_copied_cache_carry_a_stream_into_a_session_made_alike(frames) -> None:
    """`load_state_dict` alone (no save directory): a session made alike continues the stream exactly,
    Cacher between refreshes, Pruner history and kept tokens waiting for their pre-fill included."""
    first = StreamingSession.from_preset("tiny-llava-ov", stc=STC, prefill_min_tokens=10_000)
    first.push(frames[:5], stamps(0, 5))
    assert first.stats.pending_tokens > 0 and first.cacher_state.chunk_index % 2 == 1
    state = copy.deepcopy(first.state_dict())  # its tensors are the live ones: the Cacher writes in place
    memory = first.cache_policy()
    memory.bind(first.host.language_model)
    cache = memory.new_cache(first.model.config)
    for index, layer in enumerate(first.cache.layers):  # a copy of the video-only cache
        cache.update(layer.keys.clone(), layer.values.clone(), index)
    second = first.spawn()
    second.load_state_dict(state, memory, cache)
    assert second.memory is memory and second.cache is cache and second.frames == 5
    expected = continue_stream(first, frames, 5)
    got = continue_stream(second, frames, 5)
    assert torch.equal(got[0], expected[0])
    assert got[1:] == expected[1:]
    second.close()
    first.close()


def test_load_state_dict_refuses_a_state_of_other_stc_settings_and_changes_nothing(frames) -> None:
    with_pruner = StreamingSession.from_preset("tiny-llava-ov", stc=STCConfig(cacher=None))
    with_pruner.push(frames[:2], stamps(0, 2))
    plain = StreamingSession(with_pruner.model, with_pruner.tokenizer, None)
    memory, cache = plain.memory, plain.cache
    other = plain.cache_policy()
    other.bind(plain.host.language_model)
    with pytest.raises(SnapshotError, match="STC settings"):
        plain.load_state_dict(with_pruner.state_dict(), other, other.new_cache(plain.model.config))
    assert plain.memory is memory and plain.cache is cache and plain.frames == 0
    with_pruner.close()
    plain.close()
    with pytest.raises(StreamStateError, match="closed"):
        plain.state_dict()
