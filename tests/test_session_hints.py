"""Codec side data through the session, save/restore and the server's source reader, to the Cacher."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from streamtc import CacherConfig, PrunerConfig, STCConfig
from streamtc.codec import CodecSideData
from streamtc.serve.reader import read_source
from streamtc.serve.settings import StreamSpec
from streamtc.session import StreamingSession
from streamtc.sources import builtin_clip_path, open_source

ROBUST = STCConfig(cacher=CacherConfig.robust(), pruner=PrunerConfig(keep_ratio=0.5))
QUESTION = "What is the man holding?"


@pytest.fixture(scope="module")
def clip():
    """Nine frames of the street clip at 2 fps, each with the decoder's side data."""
    frames = list(open_source(str(builtin_clip_path("bikes")), fps=2.0, max_frames=9))
    assert all(isinstance(f.codec, CodecSideData) for f in frames)
    return np.stack([f.image for f in frames]), [f.timestamp for f in frames], [f.codec for f in frames]


@pytest.mark.parametrize("preset, chunks", [("tiny-llava-ov", 9), ("qwen2-vl-tiny", 4)])
def test_side_data_pushed_with_the_frames_reaches_the_cacher(clip, preset, chunks):
    images, stamps, codec = clip
    with_hints = StreamingSession.from_preset(preset, stc=ROBUST)
    with_hints.push(images, stamps, codec=codec)
    assert with_hints.cacher_state.stats.hinted_chunks == chunks  # Qwen: the ninth frame waits for its pair
    assert with_hints.cacher_state.stats.downscaled_chunks >= 1  # the moving clip's stale chunks without credit
    without = StreamingSession.from_preset(preset, stc=ROBUST)
    without.push(images, stamps)  # pushed images (JPEG, raw frames): the pixels decide
    assert without.cacher_state.stats.hinted_chunks == 0 and without.stats.frames == with_hints.stats.frames
    assert without.ask(QUESTION, max_new_tokens=2).token_ids is not None
    with pytest.raises(Exception, match="codec side data"):
        with_hints.push(images[:2], [10.0, 10.5], codec=codec[:1])


def continue_stream(session: StreamingSession, clip, split: int) -> tuple[torch.Tensor, dict]:
    images, stamps, codec = clip
    session.push(images[split:], stamps[split:], codec=codec[split:])
    return session.next_token_logits(QUESTION), session.stats.to_dict()["cacher"]


@pytest.mark.parametrize("preset", ["tiny-llava-ov", "qwen2-vl-tiny"])
def test_hints_survive_save_and_restore(tmp_path, clip, preset):
    images, stamps, codec = clip
    first = StreamingSession.from_preset(preset, stc=ROBUST)
    split = 5  # Qwen: the fifth frame (and its hint) waits for its pair in the save
    first.push(images[:split], stamps[:split], codec=codec[:split])
    first.save(tmp_path / "stream")
    expected = continue_stream(first, clip, split)
    first.close()
    restored = StreamingSession.restore(tmp_path / "stream", first.model)
    got = continue_stream(restored, clip, split)
    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1] and got[1]["hinted_chunks"] == (9 if preset == "tiny-llava-ov" else 4)


def test_the_server_reader_hands_each_frame_its_side_data():
    received = []
    spec = StreamSpec(source="demo", fps=1.0, realtime=False, max_seconds=3.0)
    reason = read_source(spec, builtin_clip_path("bikes"), threading.Event(),
                         lambda image, timestamp, codec: received.append((timestamp, codec)) or True)
    assert reason is None and [t for t, _ in received] == [0.0, 1.0, 2.0, 3.0]
    assert all(isinstance(codec, CodecSideData) for _, codec in received)
    assert [codec.decoded_frames for _, codec in received[1:]] == [25, 25, 25]
