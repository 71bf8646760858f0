"""`StreamingWindowCache` (StreamingVLM's window) on LiveCC-protocol Qwen2-VL / Qwen2.5-VL streams: the
surviving tokens, their kept or re-indexed ("shrink") positions and the re-rotated keys equal a
one-shot forward of the same surviving tokens at the same positions; positions stay bounded when
shrinking; questions leave no trace across evictions; save and restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from streamtc import STCConfig
from streamtc.errors import ConfigError, StreamStateError
from streamtc.memory import FullCache, StreamingWindowCache
from streamtc.session import StreamingSession

from conftest import drifting_frames as make_frames

QUESTION = "What is the man holding?"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return make_frames(14)


def stamps(start: int, stop: int) -> list[float]:
    return [t / 2 for t in range(start, stop)]  # LiveCC's 2 fps


def recorded_session(preset: str, policy, **kwargs) -> tuple[StreamingSession, list]:
    """A LiveCC session whose pre-fills (embeds [n, D], positions [3, n], blocks) are recorded."""
    session = StreamingSession.from_preset(preset, stc=None, protocol="livecc", prefill_min_tokens=1,
                                           cache_policy=policy, **kwargs)
    calls: list = []
    append = session._append

    def recording(embeds, positions, blocks, deepstack=None):
        calls.append((embeds[0].clone(), positions.clone(), list(blocks)))
        append(embeds, positions, blocks, deepstack)

    session._append = recording
    session.reset()  # the chat prefix, recorded
    return session, calls


def surviving(calls: list, vision_chunks: int, text_rounds: int, shrink: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What StreamingVLM keeps of a stream, computed from its pre-fills under FullCache alone:
    the surviving tokens [n, D], their positions [3, n] (original, or moved down by the position
    span of everything evicted before them) and the positions freed."""
    (prefix, prefix_positions, _), *turns = calls
    embeds, positions, freed = [prefix], [prefix_positions], 0
    for age, (tokens, where, blocks) in zip(range(len(turns) - 1, -1, -1), turns):
        head, tail = blocks[0].text_head, blocks[-1].text_tail  # one turn per pre-fill (its first chunk: 3 blocks)
        vision_end = len(tokens) - tail
        parts = [(slice(0, head), age < text_rounds),
                 (slice(head, vision_end), age < vision_chunks),
                 (slice(vision_end, len(tokens)), age < text_rounds)]
        for index, (part, keep) in enumerate(parts):
            if keep:
                embeds.append(tokens[part])
                positions.append(where[:, part] - (freed if shrink else 0))
            elif index == 1:  # a video spans from its first temporal position to the text after it
                freed += int(where[0, vision_end] - where[0, head])
            else:
                freed += part.stop - part.start
    return torch.cat(embeds), torch.cat(positions, dim=1), freed


@pytest.mark.parametrize("preset", ["qwen2-vl-tiny", "qwen2.5-vl-tiny"])
@pytest.mark.parametrize("positions", ["shrink", "keep"])
@pytest.mark.parametrize("vision_chunks, text_rounds", [(2, 2), (2, 3), (3, 1)])
def test_the_window_equals_a_one_shot_forward_of_the_surviving_tokens(frames, preset, positions, vision_chunks,
                                                                        text_rounds) -> None:
    # One LLM layer: its keys and values depend on each token alone, so the surviving cache is
    # exactly what a one-shot forward of the survivors gives (deeper layers keep what survivors
    # attended to before the eviction, by design).
    policy = lambda: StreamingWindowCache(vision_chunks, text_rounds, positions)  # noqa: E731
    session, _ = recorded_session(preset, policy, text_layers=1)
    full, calls = recorded_session(preset, FullCache, text_layers=1)  # the stream's original positions
    for each in (session, full):
        each.push(frames[:12], stamps(0, 12))  # turns of 6, 2, 2, 2 frames
    assert len(calls) == 5
    embeds, where, freed = surviving(calls, vision_chunks, text_rounds, positions == "shrink")
    assert freed > 0 and session.stats.cache_tokens == len(embeds)  # something was evicted
    question = session.host_stream.question_embeds(QUESTION)
    start = session.host_stream.next_position
    assert start == full.host_stream.next_position - (freed if positions == "shrink" else 0)
    text = torch.arange(start, start + question.shape[1])[None].expand(3, -1)
    with torch.inference_mode():  # the one-shot forward: survivors then the question, on a fresh cache
        hidden = session.host.forward(torch.cat([embeds, question[0]])[None], torch.cat([where, text], dim=1),
                                      DynamicCache(config=session.model.config))
        expected = session.host.logits(hidden)[0].float()
    got = session.next_token_logits(QUESTION)
    assert (got - expected).abs().max().item() <= TOLERANCE
    session.close()
    full.close()


def test_shrink_keeps_positions_bounded_and_keep_lets_them_grow(frames) -> None:
    shrink = StreamingSession.from_preset("livecc-tiny", stc=None, cache_policy=lambda: StreamingWindowCache(2, 2))
    keep = StreamingSession.from_preset("livecc-tiny", stc=None,
                                        cache_policy=lambda: StreamingWindowCache(2, 2, "keep"))
    full = StreamingSession.from_preset("livecc-tiny", stc=None)
    seen = {name: [] for name in ("shrink", "keep", "full")}
    for start in range(0, 14, 2):
        for name, session in (("shrink", shrink), ("keep", keep), ("full", full)):
            session.push(frames[start:start + 2], stamps(start, start + 2))
            seen[name].append((session.host_stream.next_position, session.stats.cache_tokens))
    # turns of 2 frames from frame 6 on: the window is in its steady state
    assert seen["shrink"][-1] == seen["shrink"][-2] == seen["shrink"][-3]
    assert seen["keep"][-1][1] == seen["shrink"][-1][1] and seen["keep"][-1][0] == seen["full"][-1][0]
    assert seen["keep"][-1][0] > seen["keep"][-2][0] > seen["shrink"][-1][0]
    for session in (shrink, keep, full):
        session.close()


def test_questions_across_evictions_leave_no_trace(frames) -> None:
    policy = lambda: StreamingWindowCache(2, 2)  # noqa: E731
    asked = StreamingSession.from_preset("livecc-tiny", stc=STCConfig(cacher=None), cache_policy=policy)
    quiet = StreamingSession.from_preset("livecc-tiny", stc=STCConfig(cacher=None), cache_policy=policy)
    for start in range(0, 14, 2):
        for session in (asked, quiet):
            session.push(frames[start:start + 2], stamps(start, start + 2))
        if start >= 6:
            asked.ask(QUESTION, max_new_tokens=3)
    assert torch.equal(asked.next_token_logits(QUESTION), quiet.next_token_logits(QUESTION))
    asked.close()
    quiet.close()


def test_a_saved_window_resumes_exactly(tmp_path, frames) -> None:
    policy = lambda: StreamingWindowCache(2, 3)  # noqa: E731
    first = StreamingSession.from_preset("livecc-tiny", stc=STCConfig(), cache_policy=policy)
    first.push(frames[:10], stamps(0, 10))
    assert not first.memory._turns[0].vision_kept  # evicted before the save
    first.save(tmp_path / "stream")
    first.push(frames[10:], stamps(10, 14))
    expected = first.next_token_logits(QUESTION)
    first.close()
    restored = StreamingSession.restore(tmp_path / "stream", first.model)
    assert isinstance(restored.memory, StreamingWindowCache) and restored.memory.settings() == {
        "vision_chunks": 2, "text_rounds": 3, "positions": "shrink"}
    restored.push(frames[10:], stamps(10, 14))
    assert torch.equal(restored.next_token_logits(QUESTION), expected)
    restored.close()


def test_streams_without_chunk_turns_and_bad_settings_are_refused(frames) -> None:
    video = StreamingSession.from_preset("qwen2-vl-tiny", stc=None, cache_policy=StreamingWindowCache)
    with pytest.raises(StreamStateError, match="protocol='livecc'"):
        video.push(frames[:2], stamps(0, 2))
    llava = StreamingSession.from_preset("tiny-llava-ov", stc=None, cache_policy=StreamingWindowCache)
    with pytest.raises(StreamStateError, match="per-chunk turns"):
        llava.push(frames[:1], stamps(0, 1))
    for bad in ({"vision_chunks": 0}, {"text_rounds": 1.5}, {"positions": "append"}):
        with pytest.raises(ConfigError):
            StreamingWindowCache(**bad)
    video.close()
    llava.close()
