"""RetrievalCache (ReKV memory) on tiny presets: equal to FullCache when every offloaded block is
retrieved or nothing was offloaded (LLaVA-OV, Qwen2-VL, Qwen2.5-VL, Qwen3-VL), the blocks chosen are
a plain top-k of the stored representatives (scored with a query computed here: Qwen3-VL's QK-norm
included), eviction across questions, STC composes, host and disk stores, the disk budget, disk
faults (skipped or a clear error, never a wrong block), save/restore of the policy, and memories a
model cannot run refused when the session spec is made."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from streamtc import PrunerConfig, STCConfig
from streamtc.errors import ConfigError, OffloadError
from streamtc.factory import SessionSpec
from streamtc.memory import FullCache, RetrievalCache, SlidingWindowCache, memory_policy, select_blocks
from streamtc.memory.retrieval import QUERY_FUNCTIONS, attention_layers
from streamtc.session import StreamingSession

TOLERANCE = 1e-6  # float32 noise is about 1e-7; a token at a wrong position moves logits by 1e-4
QUESTION = "What is the man holding?"
ALL = 10**6  # pre-fill everything pending in one forward / retrieve every block


def make_frames(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def llava() -> StreamingSession:
    return StreamingSession.from_preset("tiny-llava-ov", stc=None)


@pytest.fixture(scope="module")
def qwen() -> StreamingSession:
    return StreamingSession.from_preset("qwen2-vl-tiny", stc=None)


@pytest.fixture(scope="module")
def qwen25() -> StreamingSession:
    return StreamingSession.from_preset("qwen2.5-vl-tiny", stc=None)


@pytest.fixture(scope="module")
def qwen3() -> StreamingSession:
    return StreamingSession.from_preset("qwen3-vl-tiny", stc=None)


def twin(base: StreamingSession, policy, **kwargs) -> StreamingSession:
    """A session on `base`'s model with another cache policy."""
    return StreamingSession(base.model, base.tokenizer, None, cache_policy=policy, **kwargs)


def frame_tokens(base: StreamingSession) -> int:
    """Cache tokens one pruner frame (a LLaVA-OV frame, a Qwen-VL temporal patch; Qwen3-VL: with its
    timestamp and vision start / end) appends, uncompressed: the cache's growth over one step."""
    probe = twin(base, FullCache, prefill_min_tokens=1)
    step = probe.host.frames_per_step
    frames = make_frames(2 * step, seed=9)
    probe.push(frames[:step])
    before = probe.cache.get_seq_length()
    probe.push(frames[step:])
    return probe.cache.get_seq_length() - before


def read_blocks(policy: RetrievalCache, layer: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    with policy.store.reader() as reader:
        return reader.read(layer, ids)


def reference_logits(session: StreamingSession, question: str, blocks: list[list[int]]) -> torch.Tensor:
    """The unhooked model on a cache built by hand: per layer the prefix, then `blocks[layer]` read
    from the store, then the window; the question at the session's next positions."""
    policy = session.memory
    prefix = policy._prefix_tokens
    cache = DynamicCache(config=session.model.config)
    for index, layer in enumerate(session.cache.layers):
        keys, values = layer.keys, layer.values
        if blocks[index]:
            extra_k, extra_v = read_blocks(policy, index, blocks[index])
            keys = torch.cat([keys[..., :prefix, :], extra_k[None], keys[..., prefix:, :]], dim=-2)
            values = torch.cat([values[..., :prefix, :], extra_v[None], values[..., prefix:, :]], dim=-2)
        cache.update(keys, values, index)
    with torch.inference_mode():
        embeds = session._question_embeds(question, None)
        position = session.host_stream.next_position
        hidden = session.host.forward(embeds, session.host_stream.text_positions(embeds.shape[1]), cache)
        session.host_stream.next_position = position
        return session.host.logits(hidden)[0].float().cpu()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- the pure parts ---------------------------------------------------------------------------------


def test_select_blocks_is_a_plain_top_k_in_temporal_order() -> None:
    torch.manual_seed(0)
    query, reps = torch.randn(4, 8), torch.randn(7, 2, 8)  # 4 query heads over 2 KV heads
    scores = [sum(float(query[h] @ reps[n, h // 2]) for h in range(4)) / 4 for n in range(7)]
    best = sorted(sorted(range(7), key=lambda n: -scores[n])[:3])
    assert select_blocks(query, reps, 3).tolist() == best
    assert select_blocks(query, reps, 9).tolist() == list(range(7))


def test_bad_settings_and_models_raise(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="offload_dir .*file/blocks cannot be made"):
        memory_policy("retrieval", offload_dir=tmp_path / "file" / "blocks")
    memory_policy("retrieval", offload_dir=tmp_path / "new" / "blocks")  # made now, checked writable
    assert (tmp_path / "new" / "blocks").is_dir()
    with pytest.raises(ConfigError, match="window_tokens"):
        RetrievalCache(0)
    with pytest.raises(ConfigError, match="retrieve_frames"):
        RetrievalCache(10, retrieve_frames=True)
    with pytest.raises(ConfigError, match="offload_dir"):
        RetrievalCache(10, offload_budget=100)
    with pytest.raises(ConfigError, match="budget"):
        RetrievalCache(10, offload_dir="x", offload_budget=-1)
    with pytest.raises(Exception, match="Qwen2Attention"):
        attention_layers(torch.nn.Linear(2, 2))
    assert {cls.__name__ for cls in QUERY_FUNCTIONS} == {"Qwen2Attention", "Qwen2VLAttention", "Qwen2_5_VLAttention",
                                                         "Qwen3VLTextAttention"}


@pytest.mark.parametrize("preset", ["tiny-llava-ov", "qwen2-vl-tiny", "qwen3-vl-tiny"])
def test_a_memory_the_model_cannot_run_is_refused_when_the_spec_is_made(preset: str) -> None:
    """StreamingVLM's window keeps per-chunk turns, which only the livecc protocol has: refused
    before any model is built; retrieval runs on every host."""
    with pytest.raises(ConfigError, match="streaming-vlm.*'livecc' prompt protocol.*runs protocol 'video'"):
        SessionSpec(preset=preset, memory="streaming-vlm")
    SessionSpec(preset=preset, memory="retrieval", window_tokens=100)
    SessionSpec(preset="livecc-tiny", memory="streaming-vlm")


# -- exactness against FullCache --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["llava", "qwen", "qwen3"])
def test_a_window_larger_than_the_stream_equals_the_full_cache(host: str, request) -> None:
    base = request.getfixturevalue(host)
    frames = make_frames(8)
    full, memory = twin(base, FullCache), twin(base, lambda: RetrievalCache(10_000, 4))
    for session in (full, memory):
        session.push(frames[:4])
    assert max_diff(full.next_token_logits(QUESTION), memory.next_token_logits(QUESTION)) <= TOLERANCE
    for session in (full, memory):
        session.push(frames[4:])
    assert full.ask(QUESTION, max_new_tokens=4).token_ids == memory.ask(QUESTION, max_new_tokens=4).token_ids
    assert max_diff(full.next_token_logits("And now?"), memory.next_token_logits("And now?")) <= TOLERANCE
    stats = memory.stats.memory
    assert stats["offloaded_blocks"] == 0 and stats["window_frames"] == 8 // base.host.frames_per_step
    assert memory.memory.last_retrieved == []


@pytest.mark.parametrize("host", ["llava", "qwen", "qwen25", "qwen3"])
def test_retrieving_every_offloaded_block_equals_the_full_cache(host: str, request) -> None:
    """All frames pre-filled in one forward (so the window's frames attended to every earlier frame,
    as in a full cache), then all but two evicted; a question retrieving every block sees the full
    cache's tokens, in its order, at its positions (1-D RoPE; M-RoPE of Qwen2-VL, Qwen2.5-VL and
    Qwen3-VL, whose blocks carry their timestamp text and DeepStack-added states)."""
    base = request.getfixturevalue(host)
    per_frame = frame_tokens(base)
    frames = make_frames(12)
    full = twin(base, FullCache, prefill_min_tokens=ALL)
    memory = twin(base, lambda: RetrievalCache(2 * per_frame, ALL), prefill_min_tokens=ALL)
    for session in (full, memory):
        session.push(frames)
        session.flush()
    expected = full.next_token_logits(QUESTION)
    window = [(layer.keys, layer.values) for layer in memory.cache.layers]
    steps = 12 // base.host.frames_per_step
    stats = memory.stats.memory
    assert stats["offloaded_blocks"] == steps - 2 and stats["window_frames"] == 2
    assert memory.cache.get_seq_length() == full.cache.get_seq_length() - (steps - 2) * per_frame
    assert max_diff(memory.next_token_logits(QUESTION), expected) <= TOLERANCE
    assert memory.memory.last_retrieved == [list(range(steps - 2))] * len(memory.cache.layers)
    # the question left the window-only cache as it was: same tensors, nothing lost or duplicated
    assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(memory.cache.layers, window))
    assert full.ask(QUESTION, max_new_tokens=4).token_ids == memory.ask(QUESTION, max_new_tokens=4).token_ids
    # the stored blocks hold exactly the full cache's keys and values of the evicted frames
    prefix = memory.memory._prefix_tokens
    keys, values = read_blocks(memory.memory, 1, list(range(steps - 2)))
    stop = prefix + (steps - 2) * per_frame
    assert torch.equal(keys, full.cache.layers[1].keys[0, :, prefix:stop])
    assert torch.equal(values, full.cache.layers[1].values[0, :, prefix:stop])
    assert memory.stats.memory["questions"] == 2 and memory.stats.memory["last_retrieval_ms"] > 0


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """RMS normalisation over the last dimension with `norm`'s weight and epsilon, written out."""
    return norm.weight * (x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm.variance_epsilon))


def expected_choice(module: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    reps: torch.Tensor, k: int) -> list[int]:
    """The test's own choice of blocks for one layer: its query (q_proj, split into heads, Qwen3's
    q_norm where the layer has one, rotated at the question's positions), averaged over the question,
    scored against every block's representative key of the query head's KV group; the top k."""
    query = module.q_proj(hidden).view(1, hidden.shape[1], -1, module.head_dim)
    if hasattr(module, "q_norm"):
        query = rms_norm(query, module.q_norm)
    query = query.transpose(1, 2)
    half = query.shape[-1] // 2
    query = query * cos[:, None] + torch.cat([-query[..., half:], query[..., :half]], dim=-1) * sin[:, None]
    mean = query[0].mean(dim=1)
    groups = mean.shape[0] // reps.shape[2]
    scores = [float(sum(mean[h] @ reps[n, module.layer_idx, h // groups] for h in range(mean.shape[0])))
              for n in range(reps.shape[0])]
    return sorted(sorted(range(reps.shape[0]), key=lambda n: -scores[n])[:k])


@pytest.mark.parametrize("host", ["llava", "qwen3"])
def test_the_chosen_blocks_are_the_top_k_of_the_stored_representatives(host: str, request) -> None:
    base = request.getfixturevalue(host)
    per_frame = frame_tokens(base)
    frames = make_frames(8 * base.host.frames_per_step, seed=3)
    memory = twin(base, lambda: RetrievalCache(2 * per_frame, 2), prefill_min_tokens=ALL)
    memory.push(frames)
    memory.flush()
    policy = memory.memory
    ids, reps = policy.store.representatives()
    assert ids == list(range(6))
    for block in ids:  # representatives are the blocks' mean keys, per layer and KV head
        keys, _ = read_blocks(policy, 0, [block])
        assert torch.allclose(reps[block, 0], keys.float().mean(dim=1), atol=1e-6)
    captured: dict[int, tuple] = {}
    layers = attention_layers(base.host.language_model)

    def capture(module, args, kwargs):
        captured.setdefault(module.layer_idx, (kwargs["hidden_states"], kwargs["position_embeddings"]))

    handles = [module.register_forward_pre_hook(capture, with_kwargs=True) for module in layers]
    try:
        logits = memory.next_token_logits(QUESTION)
    finally:
        for handle in handles:
            handle.remove()
    with torch.inference_mode():
        expected_blocks = [expected_choice(module, *captured[module.layer_idx][:1], *captured[module.layer_idx][1],
                                           reps, 2) for module in layers]
    assert policy.last_retrieved == expected_blocks
    assert max_diff(logits, reference_logits(memory, QUESTION, expected_blocks)) <= TOLERANCE
    # the check is sensitive: other blocks give other logits
    other = [[b for b in ids if b not in chosen][:2] for chosen in expected_blocks]
    assert max_diff(logits, reference_logits(memory, QUESTION, other)) > 100 * TOLERANCE


def test_eviction_across_question_boundaries(llava: StreamingSession) -> None:
    """Frames pushed between questions evict older ones: the window equals a sliding window's, each
    frame is either in the window or in the store exactly once, and a question retrieves them."""
    frames = make_frames(9, seed=4)
    memory = twin(llava, lambda: RetrievalCache(3 * 16, ALL), prefill_min_tokens=1)
    window = twin(llava, lambda: SlidingWindowCache(3 * 16), prefill_min_tokens=1)
    full = twin(llava, FullCache, prefill_min_tokens=1)
    for first, last in ((0, 2), (2, 5), (5, 9)):
        for session in (memory, window, full):
            session.push(frames[first:last])
        memory.ask(QUESTION, max_new_tokens=2)
        for ours, theirs in zip(memory.cache.layers, window.cache.layers):
            assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        stored = [b.frame for b in memory.memory.store.blocks]
        in_window = [b.frame for b in memory.memory._window]
        assert stored + in_window == list(range(last))
    # layer-0 keys depend only on a token and its position: the store holds the full cache's
    prefix = memory.memory._prefix_tokens
    keys, _ = read_blocks(memory.memory, 0, list(range(6)))
    assert torch.equal(keys, full.cache.layers[0].keys[0, :, prefix:prefix + 6 * 16])
    every = [list(range(6))] * len(memory.cache.layers)
    assert max_diff(memory.next_token_logits(QUESTION), reference_logits(memory, QUESTION, every)) <= TOLERANCE


def test_a_question_before_anything_was_evicted(llava: StreamingSession) -> None:
    frames = make_frames(6, seed=5)
    full, memory = twin(llava, FullCache), twin(llava, lambda: RetrievalCache(4 * 16, 2))
    for session in (full, memory):
        session.push(frames[:2])
    assert max_diff(full.next_token_logits(QUESTION), memory.next_token_logits(QUESTION)) <= TOLERANCE
    assert memory.memory.last_retrieved == [] and memory.stats.memory["questions"] == 0
    memory.push(frames[2:])  # now two frames leave the window; the next question retrieves them
    memory.ask(QUESTION, max_new_tokens=2)
    assert memory.memory.last_retrieved == [[0, 1]] * len(memory.cache.layers)


def test_stc_composes_pruned_frames_make_smaller_blocks(llava: StreamingSession) -> None:
    stc = STCConfig(pruner=PrunerConfig(keep_ratio=0.5))
    owner = StreamingSession(llava.model, llava.tokenizer, stc, prefill_min_tokens=ALL)
    try:
        memory = owner.spawn(lambda: RetrievalCache(2 * 8, ALL))
        frames = make_frames(8, seed=6)
        kept_full, kept_memory = [], []
        for frame in frames:  # the Cacher and Pruner see the same frames whatever the memory evicts
            owner.push(frame[None])
            kept_full.append(owner.last_kept_indices)
            memory.push(frame[None])
            kept_memory.append(memory.last_kept_indices)
        assert kept_full == kept_memory
        expected = owner.next_token_logits(QUESTION)
        assert max_diff(memory.next_token_logits(QUESTION), expected) <= TOLERANCE
        lengths = [b.length for b in memory.memory.store.blocks] + [b.length for b in memory.memory._window]
        assert lengths == [len(k[0]) for k in kept_full] and max(lengths) < 16
        memory.close()
    finally:
        owner.close()


# -- the disk store ---------------------------------------------------------------------------------


def disk_session(base: StreamingSession, directory: Path, budget: int | None = None, retrieve: int = ALL,
                 segment_blocks: int = 2) -> StreamingSession:
    return twin(base, lambda: RetrievalCache(2 * 16, retrieve, offload_dir=directory, offload_budget=budget,
                                             segment_blocks=segment_blocks), prefill_min_tokens=1)


def test_the_disk_store_answers_as_the_host_store(llava: StreamingSession, tmp_path: Path) -> None:
    frames = make_frames(9, seed=7)
    host = twin(llava, lambda: RetrievalCache(2 * 16, 3), prefill_min_tokens=1)
    disk = disk_session(llava, tmp_path, retrieve=3)
    for session in (host, disk):
        session.push(frames)
    assert torch.equal(host.next_token_logits(QUESTION), disk.next_token_logits(QUESTION))
    assert host.memory.last_retrieved == disk.memory.last_retrieved
    stats = disk.stats.memory
    # 7 blocks: three segments of two on disk, the newest block waiting in host memory
    assert stats["offloaded_blocks"] == 7 and stats["disk_bytes"] > 0 and stats["host_bytes"] > 0
    directory = disk.memory.store.directory
    assert sorted(p.name for p in directory.iterdir()) == [f"segment-{i:08d}.safetensors" for i in range(3)]
    assert stats["disk_bytes"] == sum(p.stat().st_size for p in directory.iterdir())
    disk.close()
    assert not directory.exists()  # a closed session leaves no files


def test_the_disk_budget_deletes_the_oldest_segments(llava: StreamingSession, tmp_path: Path) -> None:
    probe = disk_session(llava, tmp_path / "probe")
    probe.push(make_frames(4, seed=8))
    segment_bytes = probe.stats.memory["disk_bytes"]  # one segment of two blocks
    memory = disk_session(llava, tmp_path / "budget", budget=2 * segment_bytes + segment_bytes // 2)
    frames = make_frames(14, seed=8)
    for first in range(0, 14, 2):
        memory.push(frames[first:first + 2])
        assert memory.stats.memory["disk_bytes"] <= 2 * segment_bytes + segment_bytes // 2
    stats = memory.stats.memory
    # 14 frames: 2 in the window, 12 offloaded = 6 segments, of which the newest 2 fit the budget
    assert stats["deleted_blocks"] == 8 and stats["offloaded_blocks"] == 4
    assert [b.frame for b in memory.memory.store.blocks] == [8, 9, 10, 11]
    assert len(list(memory.memory.store.directory.iterdir())) == 2
    memory.ask(QUESTION, max_new_tokens=2)
    assert memory.memory.last_retrieved[0] == [8, 9, 10, 11]


@pytest.mark.parametrize("fault", ["deleted", "truncated"])
def test_a_lost_segment_is_skipped_and_the_stream_goes_on(llava: StreamingSession, tmp_path: Path, fault: str,
                                                         caplog) -> None:
    memory = disk_session(llava, tmp_path)
    memory.push(make_frames(8, seed=10))  # blocks 0-5 in three segments
    segment = memory.memory.store.directory / "segment-00000001.safetensors"
    if fault == "deleted":
        segment.unlink()
    else:
        segment.write_bytes(segment.read_bytes()[:-100])
    logits = memory.next_token_logits(QUESTION)
    assert "segment-00000001" in caplog.text
    assert memory.memory.last_retrieved[0] == [0, 1, 4, 5]  # blocks 2 and 3 were skipped, no others
    assert memory.stats.memory["lost_blocks"] == 2
    assert max_diff(logits, reference_logits(memory, QUESTION, [[0, 1, 4, 5]] * len(memory.cache.layers))) <= TOLERANCE
    memory.push(make_frames(2, seed=11))
    memory.ask(QUESTION, max_new_tokens=2)
    assert memory.memory.last_retrieved[0] == [0, 1, 4, 5, 6, 7]


def test_a_corrupted_segment_fails_that_question_only(llava: StreamingSession, tmp_path: Path) -> None:
    memory = disk_session(llava, tmp_path)
    memory.push(make_frames(8, seed=12))
    segment = memory.memory.store.directory / "segment-00000000.safetensors"
    data = bytearray(segment.read_bytes())
    data[-64:] = bytes(64)  # same size, other bytes: only the checksums can tell
    segment.write_bytes(bytes(data))
    length = memory.cache.get_seq_length()
    with pytest.raises(OffloadError, match="segment-00000000.*checksum.*ask the question again"):
        memory.ask(QUESTION, max_new_tokens=2)
    assert memory.cache.get_seq_length() == length  # the window is intact
    assert memory.stats.memory["lost_blocks"] == 2
    memory.ask(QUESTION, max_new_tokens=2)
    assert memory.memory.last_retrieved[0] == [2, 3, 4, 5]


# -- persistence --------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["host", "disk"])
def test_save_and_restore_round_trip(llava: StreamingSession, tmp_path: Path, store: str) -> None:
    """A policy saved mid-stream and restored into a fresh policy continues exactly as the one that
    never stopped (a twin session fed the same frames)."""
    def policy() -> RetrievalCache:
        directory = tmp_path / "offload" if store == "disk" else None
        return RetrievalCache(2 * 16, 3, offload_dir=directory, segment_blocks=2)

    frames = make_frames(12, seed=13)
    saved, never_stopped = (twin(llava, policy, prefill_min_tokens=1) for _ in range(2))
    for session in (saved, never_stopped):
        session.push(frames[:7])
    directory = tmp_path / "save"
    directory.mkdir()
    saved.memory.save(saved.cache, directory)
    manifest = json.loads((directory / "policy.json").read_text())["store"]
    assert manifest["kind"] == store
    if store == "disk":  # the segment files, hard-linked into the save, by name, size and checksums
        names = [s["name"] for s in manifest["segments"]]
        assert names == [f"segment-{i:08d}.safetensors" for i in range(3)] and all(s["crcs"] for s in manifest["segments"])
        live = saved.memory.store.directory
        assert all((directory / "store" / n).stat().st_ino == (live / n).stat().st_ino for n in names)
        saved.memory.close()  # the live stream's directory goes (a process that closes after saving)
        assert not live.exists() and all((directory / "store" / n).is_file() for n in names)
    restored = policy()
    restored.bind(saved.host.language_model)
    cache = restored.restore(saved.model.config, directory)
    saved.load_state_dict(saved.state_dict(), restored, cache)  # the stream over the restored memory
    assert restored.stats.offloaded_blocks == never_stopped.memory.stats.offloaded_blocks == 5
    assert torch.equal(saved.next_token_logits(QUESTION), never_stopped.next_token_logits(QUESTION))
    for session in (saved, never_stopped):
        session.push(frames[7:])
    assert torch.equal(saved.next_token_logits(QUESTION), never_stopped.next_token_logits(QUESTION))
    assert restored.last_retrieved == never_stopped.memory.last_retrieved
    if store == "disk":  # the restored stream writes and deletes in its own directory, never in the save
        assert restored.store.directory != live and all((directory / "store" / n).is_file() for n in names)
        restored.close()
        assert all((directory / "store" / n).is_file() for n in names)
    with pytest.raises(ConfigError, match="offload store"):
        (RetrievalCache(2 * 16) if store == "disk" else RetrievalCache(2 * 16, offload_dir=tmp_path / "x")).restore(
            saved.model.config, directory)
