"""Session bookkeeping users rely on: what the cache holds, closing shared sessions, bad timestamps."""

from __future__ import annotations

import math

import pytest
import torch

from streamtc import STCConfig
from streamtc.errors import InputError, StreamStateError
from streamtc.memory import SlidingWindowCache
from streamtc.session import StreamingSession

PRESET = "tiny-llava-ov"
QUESTION = "What is the man holding?"


def test_cache_tokens_counts_what_a_window_holds_not_everything_ever_kept(make_frames) -> None:
    session = StreamingSession.from_preset(PRESET, stc=None, prefill_min_tokens=1,
                                           cache_policy=lambda: SlidingWindowCache(20))
    session.push(make_frames(8), [float(t) for t in range(8)])
    stats = session.stats
    assert stats.visual_tokens == 8 * 16  # pre-filled over the stream ...
    held = session.cache.get_seq_length()
    assert held == stats.prompt_tokens + 16  # ... but a 20-token window holds one 16-token frame
    assert stats.cache_tokens == held == stats.to_dict()["cache_tokens"]
    text = session.model.config.text_config
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    assert stats.kv_cache_bytes == per_token * stats.cache_tokens


def test_closing_the_owner_leaves_the_cacher_on_for_spawned_sessions(make_frames) -> None:
    frames = make_frames(3, seed=1)
    owner = StreamingSession.from_preset(PRESET, stc=STCConfig())
    spawned = owner.spawn()
    reference = owner.spawn()  # a second spawned session: the run to compare with, before any close
    reference.push(frames)
    expected = reference.next_token_logits(QUESTION)
    reference.close()
    owner.close()
    layers = owner.model.model.vision_tower.encoder.layers
    assert all("forward" in layer.__dict__ for layer in layers)  # still patched: `spawned` uses it
    spawned.push(frames)
    assert torch.equal(spawned.next_token_logits(QUESTION), expected)
    spawned.close()
    assert not any("forward" in layer.__dict__ for layer in layers)  # the last user detached it
    spawned.close()  # idempotent


def test_push_ask_and_spawn_after_close_raise(make_frames) -> None:
    session = StreamingSession.from_preset(PRESET, stc=STCConfig())
    session.push(make_frames(1))
    session.close()
    for call in (lambda: session.push(make_frames(1)), lambda: session.ask(QUESTION),
                 lambda: session.next_token_logits(QUESTION), session.spawn):
        with pytest.raises(StreamStateError, match="closed"):
            call()


@pytest.mark.parametrize("stamps, bad", [
    ([0.0, 1.0, 0.5], "0.5 after 1.0"),  # backwards
    ([0.0, 1.0, 1.0], "1.0 after 1.0"),  # repeated
    ([0.0, math.nan, 2.0], "nan"),
    ([0.0, math.inf, 2.0], "inf"),
])
def test_push_refuses_timestamps_that_go_backwards_repeat_or_are_not_finite(stamps, bad, make_frames) -> None:
    session = StreamingSession.from_preset(PRESET, stc=None)
    with pytest.raises(InputError, match=f"finite and increasing; got {bad}"):
        session.push(make_frames(3), stamps)
    assert session.frames == 0  # refused before anything was encoded
    session.push(make_frames(1), [3.0])
    with pytest.raises(InputError, match="2.0 after 3.0"):  # across pushes too
        session.push(make_frames(1), [2.0])
    session.reset()
    session.push(make_frames(1), [0.0])  # a new stream starts its own timeline
