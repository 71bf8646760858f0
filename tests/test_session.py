"""StreamingSession on the tiny LLaVA-OneVision preset: exactness against a one-shot HF pre-fill,
cache restore, per-session state (interleaved sessions, reset), STC wiring and its divergence."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from streamtc import CacherConfig, PrunerConfig, STCConfig
from streamtc.errors import ConfigError, InputError, StreamStateError, UnsupportedModelError
from streamtc.presets import build_model
from streamtc.prompts import multiple_choice_question, parse_option_letter, split_video_prompt
from streamtc.memory import CacheBlock, FullCache, SlidingWindowCache
from streamtc.session import StreamingSession
from streamtc.presets.tokenizer import save_processor, tokenizer_for_config

from exactness import max_question_diff

logger = logging.getLogger(__name__)

PRESET = "tiny-llava-ov"
QUESTION = "What is the man holding?"
OPTIONS = ["a red cup", "a phone", "a blue umbrella", "nothing"]
TOLERANCE = 1e-6  # float32 noise is about 1e-7; a position off by one moves logits by about 1e-4


def one_shot_logits(session: StreamingSession, frames: np.ndarray, question: str) -> torch.Tensor:
    """Logits [L, V] at every position of the plain HF forward: the chat prompt with <video>
    expanded to F * P + 1 placeholders, `model(input_ids=..., pixel_values_videos=...)`, no cache."""
    tokenizer, model = session.tokenizer, session.model
    prompt = split_video_prompt(tokenizer, question, session.system_prompt)
    tokens_per_frame = session.host.tokens_per_frame
    ids = (
        tokenizer(prompt.prefix, add_special_tokens=False)["input_ids"]
        + [model.config.video_token_id] * (len(frames) * tokens_per_frame + 1)
        + tokenizer(prompt.suffix, add_special_tokens=False)["input_ids"]
    )
    with torch.inference_mode():
        output = model(input_ids=torch.tensor([ids]), pixel_values_videos=session.preprocessor(frames)[None])
    return output.logits[0].float()


def push_in_chunks(session: StreamingSession, frames: np.ndarray, sizes: list[int]) -> None:
    start = 0
    for size in sizes:
        session.push(frames[start : start + size], timestamps=[float(t) for t in range(start, start + size)])
        start += size
    assert start == len(frames)


@pytest.fixture(scope="module")
def frames(make_frames) -> np.ndarray:
    return make_frames(6)


@pytest.fixture(scope="module")
def baseline() -> StreamingSession:
    return StreamingSession.from_preset(PRESET, stc=None)


# -- exactness --------------------------------------------------------------------------------


def test_incremental_stream_matches_one_shot_prefill(baseline: StreamingSession, frames: np.ndarray) -> None:
    baseline.reset()
    push_in_chunks(baseline, frames[:4], [2, 1, 1])
    expected = one_shot_logits(baseline, frames[:4], QUESTION)
    assert max_question_diff(baseline, QUESTION, expected) <= TOLERANCE  # every question token
    # the answer's first token is the one-shot argmax, and the question leaves no trace
    assert baseline.ask(QUESTION, max_new_tokens=3).token_ids[:1] in ([int(expected[-1].argmax())], [])
    baseline.push(frames[4:])
    expected = one_shot_logits(baseline, frames, "And now?")
    assert max_question_diff(baseline, "And now?", expected) <= TOLERANCE


def test_exactness_check_is_sensitive(baseline: StreamingSession, frames: np.ndarray) -> None:
    """The one-shot comparison can fail: a stream missing a frame, or without the newline token,
    differs by far more than the tolerance."""
    baseline.reset()
    baseline.push(frames[:3])
    got = baseline.next_token_logits(QUESTION)
    assert (got - one_shot_logits(baseline, frames[:4], QUESTION)[-1]).abs().max().item() > 100 * TOLERANCE
    newline = baseline.model.model.image_newline
    saved = newline.detach().clone()
    with torch.no_grad():
        newline.zero_()
    try:
        assert (baseline.next_token_logits(QUESTION) - got).abs().max().item() > 10 * TOLERANCE
    finally:
        with torch.no_grad():
            newline.copy_(saved)


def test_chunking_of_frames_does_not_change_the_result(frames: np.ndarray) -> None:
    per_frame = StreamingSession.from_preset(PRESET, stc=None, chunk_frames=1)
    per_three = StreamingSession.from_preset(PRESET, stc=None, chunk_frames=3)
    per_frame.push(frames)
    push_in_chunks(per_three, frames, [4, 2])
    diff = (per_frame.next_token_logits(QUESTION) - per_three.next_token_logits(QUESTION)).abs().max().item()
    assert diff <= TOLERANCE
    assert per_three.stats.chunks == 3 and per_frame.stats.chunks == 6


def test_from_pretrained_loads_a_saved_checkpoint(tmp_path, baseline: StreamingSession, frames: np.ndarray) -> None:
    """A directory laid out like a llava-hf checkpoint (weights, tokenizer, chat template,
    preprocessor config) loads offline and gives the preset's results."""
    baseline.model.save_pretrained(tmp_path)
    save_processor(baseline.model.config, tmp_path)
    loaded = StreamingSession.from_pretrained(tmp_path, stc=None)
    assert loaded.tokenizer.chat_template == baseline.tokenizer.chat_template
    baseline.reset()
    for session in (baseline, loaded):
        session.push(frames[:2])
    assert torch.equal(loaded.preprocessor(frames[:2]), baseline.preprocessor(frames[:2]))
    assert (loaded.next_token_logits(QUESTION) - baseline.next_token_logits(QUESTION)).abs().max() <= TOLERANCE


# -- cache restore, stats, questions ----------------------------------------------------------


def test_ask_restores_the_video_only_cache(baseline: StreamingSession, frames: np.ndarray) -> None:
    baseline.reset()
    push_in_chunks(baseline, frames[:3], [1, 2])
    stats = baseline.stats
    assert stats.frames == 3
    assert stats.visual_tokens == stats.visual_tokens_encoded == 3 * baseline.host.tokens_per_frame
    assert baseline.cache.get_seq_length() == stats.cache_tokens
    first = baseline.ask(QUESTION, max_new_tokens=6)
    assert baseline.cache.get_seq_length() == stats.cache_tokens
    second = baseline.ask(QUESTION, max_new_tokens=6)
    assert first.token_ids == second.token_ids and first.text == second.text
    assert first.frames == 3 and first.timestamp == 2.0
    assert first.prefill_ms > 0 and first.ttft_ms >= first.prefill_ms and first.total_ms >= first.ttft_ms
    assert len(first.token_ids) <= 6
    after = baseline.stats
    assert after.questions == 2 and after.last_ttft_ms == second.ttft_ms
    assert after.vit_ms > 0 and after.prefill_ms > 0 and after.peak_memory_bytes > 0 and after.memory_kind == "rss"


def test_multiple_choice_prompt_and_letter(baseline: StreamingSession, frames: np.ndarray) -> None:
    baseline.reset()
    baseline.push(frames[:2])
    with_options = baseline.next_token_logits(QUESTION, options=OPTIONS)
    spelled_out = baseline.next_token_logits(multiple_choice_question(QUESTION, OPTIONS))
    assert torch.equal(with_options, spelled_out)
    answer = baseline.ask(QUESTION, options=OPTIONS, max_new_tokens=4)
    assert answer.letter == parse_option_letter(answer.text, OPTIONS)


def test_failed_question_leaves_the_cache_intact(baseline: StreamingSession, frames: np.ndarray, monkeypatch) -> None:
    baseline.reset()
    baseline.push(frames[:2])
    before = baseline.next_token_logits(QUESTION)
    length = baseline.cache.get_seq_length()

    def broken(*args, **kwargs):
        raise RuntimeError("decoder failed")

    monkeypatch.setattr(baseline.model.lm_head, "forward", broken)
    with pytest.raises(RuntimeError, match="decoder failed"):
        baseline.ask(QUESTION)
    monkeypatch.undo()
    assert baseline.cache.get_seq_length() == length
    assert torch.equal(baseline.next_token_logits(QUESTION), before)


def test_bad_inputs_raise_typed_errors(baseline: StreamingSession, frames: np.ndarray) -> None:
    baseline.reset()
    with pytest.raises(InputError, match="no frame"):
        baseline.ask(QUESTION)
    with pytest.raises(InputError, match="timestamps"):
        baseline.push(frames[:2], timestamps=[0.0])
    baseline.push(frames[:1])
    with pytest.raises(InputError):
        baseline.ask("   ")
    with pytest.raises(InputError):
        baseline.ask(QUESTION, max_new_tokens=0)
    with pytest.raises(ConfigError):
        StreamingSession(baseline.model, baseline.tokenizer, chunk_frames=0)
    with pytest.raises(UnsupportedModelError):
        StreamingSession(build_model("tiny-siglip"), baseline.tokenizer)
    with pytest.raises(ConfigError):
        StreamingSession.from_preset("tiny-siglip")
    with pytest.raises(ConfigError):
        StreamingSession.from_pretrained()


def test_cache_policy_sees_every_block(frames: np.ndarray) -> None:
    """The policy hook a bounded policy would evict in receives the prompt and one block per frame."""
    blocks: list[CacheBlock] = []

    class Recording(FullCache):
        def on_append(self, cache, new_blocks: list[CacheBlock]) -> None:
            assert cache.get_seq_length() == new_blocks[-1].start + new_blocks[-1].length
            blocks.extend(new_blocks)

    session = StreamingSession.from_preset(PRESET, stc=STCConfig(cacher=None), cache_policy=Recording, chunk_frames=2)
    push_in_chunks(session, frames[:3], [3])
    session.ask(QUESTION, max_new_tokens=2)
    assert [b.kind for b in blocks] == ["prompt", "frame", "frame", "frame"]
    assert [b.frame for b in blocks[1:]] == [0, 1, 2] and [b.timestamp for b in blocks[1:]] == [0.0, 1.0, 2.0]
    assert all(b.position == b.start for b in blocks)  # full cache: positions are cache indices
    assert sum(b.length for b in blocks[1:]) == session.stats.visual_tokens


# -- per-session state ------------------------------------------------------------------------


def _script(session: StreamingSession, frames: np.ndarray, step: int) -> list[torch.Tensor]:
    """Step `step` of a fixed stream script; returns the logits it produced."""
    if step == 0:
        session.push(frames[:2])
        return [session.next_token_logits(QUESTION)]
    if step == 1:
        session.push(frames[2:3])
        answer = session.ask(QUESTION, max_new_tokens=3)
        return [session.next_token_logits("What happens next?"), torch.tensor(answer.token_ids)]
    session.push(frames[3:5])
    return [session.next_token_logits(QUESTION, options=OPTIONS)]


@pytest.mark.parametrize("stc", [None, STCConfig()], ids=["baseline", "stc"])
def test_interleaved_sessions_equal_sessions_run_alone(stc: STCConfig | None, make_frames) -> None:
    clip_a, clip_b = make_frames(5, seed=1), make_frames(5, seed=2)
    alone = []
    for clip in (clip_a, clip_b):
        session = StreamingSession.from_preset(PRESET, stc=stc)
        alone.append([out for step in range(3) for out in _script(session, clip, step)])
        session.close()
    first = StreamingSession.from_preset(PRESET, stc=stc)
    second = first.spawn()  # same model object, same attached cacher, own state
    assert second.model is first.model
    together: list[list[torch.Tensor]] = [[], []]
    for step in range(3):
        together[1] += _script(second, clip_b, step)
        together[0] += _script(first, clip_a, step)
    for run_alone, run_together in zip(alone, together):
        for a, b in zip(run_alone, run_together, strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)
    first.close()


def test_reset_starts_a_new_stream(frames: np.ndarray) -> None:
    session = StreamingSession.from_preset(PRESET, stc=STCConfig())
    session.push(frames[:3])
    fresh_run = session.next_token_logits(QUESTION)
    session.push(frames[3:])
    session.reset()
    assert session.stats.frames == 0 and session.stats.cacher["chunks"] == 0
    session.push(frames[:3])
    assert torch.equal(session.next_token_logits(QUESTION), fresh_run)


# -- STC --------------------------------------------------------------------------------------


def test_lossless_stc_settings_reproduce_the_baseline(baseline: StreamingSession, frames: np.ndarray) -> None:
    """Cacher refreshing every chunk and Pruner keeping every token: the STC path must give the
    baseline's logits, which checks the wiring (states, chunking, token order, positions)."""
    lossless = StreamingSession.from_preset(
        PRESET, stc=STCConfig(cacher=CacherConfig(cache_interval=1), pruner=PrunerConfig(keep_ratio=1.0))
    )
    baseline.reset()
    push_in_chunks(baseline, frames, [3, 3])
    push_in_chunks(lossless, frames, [3, 3])
    diff = (baseline.next_token_logits(QUESTION) - lossless.next_token_logits(QUESTION)).abs().max().item()
    assert diff <= TOLERANCE
    lossless.close()


def test_stc_runs_end_to_end_and_its_divergence_is_recorded(
    baseline: StreamingSession, frames: np.ndarray, record_property, make_frames
) -> None:
    """Default STC (Cacher N=2, r=0.25; Pruner 30%) against stc=None on the same frames. Random
    weights make the size of the divergence meaningless for accuracy; it is measured and recorded
    (junit property and log), and only checked to be finite and non-zero (STC really ran)."""
    stc = StreamingSession.from_preset(PRESET, stc=STCConfig())
    baseline.reset()
    clip = make_frames(8, seed=3)
    push_in_chunks(baseline, clip, [4, 4])
    push_in_chunks(stc, clip, [4, 4])
    reference, compressed = baseline.next_token_logits(QUESTION), stc.next_token_logits(QUESTION)
    divergence = {
        "max_abs_logit_diff": (reference - compressed).abs().max().item(),
        "logit_cosine": torch.nn.functional.cosine_similarity(reference, compressed, dim=0).item(),
        "top1_agrees": bool(reference.argmax() == compressed.argmax()),
        "visual_tokens": stc.stats.visual_tokens,
        "visual_tokens_baseline": baseline.stats.visual_tokens,
        "vit_recomputed_share": stc.stats.cacher["recomputed_share"],
    }
    for key, value in divergence.items():
        record_property(key, value)
    logger.info("STC vs stc=None on %s: %s", PRESET, divergence)
    assert np.isfinite(divergence["max_abs_logit_diff"]) and divergence["max_abs_logit_diff"] > 0
    assert divergence["visual_tokens"] == 8 * round(0.3 * baseline.host.tokens_per_frame)
    assert divergence["vit_recomputed_share"] < 1.0
    answer = stc.ask(QUESTION, options=OPTIONS, max_new_tokens=4)
    assert answer.frames == 8 and stc.cache.get_seq_length() == stc.stats.cache_tokens
    stc.close()


def test_close_restores_the_untouched_model(frames: np.ndarray) -> None:
    session = StreamingSession.from_preset(PRESET, stc=STCConfig(pruner=None))
    layers = session.model.model.vision_tower.encoder.layers
    assert all("forward" in layer.__dict__ for layer in layers)
    for stc in (None, STCConfig()):  # a second owner, or a silently patched baseline, is refused
        with pytest.raises(StreamStateError, match="spawn"):
            StreamingSession(session.model, session.tokenizer, stc=stc)
    session.close()
    assert not any("forward" in layer.__dict__ for layer in layers)
    plain = StreamingSession(session.model, session.tokenizer, stc=None)
    plain.push(frames[:2])
    assert max_question_diff(plain, QUESTION, one_shot_logits(plain, frames[:2], QUESTION)) <= TOLERANCE


# -- pre-fill batching, baselines in the session, depth overrides ----------------------------------


def test_batched_prefill_equals_frame_by_frame_and_ask_flushes(frames):
    per_chunk = StreamingSession.from_preset(PRESET, stc=None, prefill_min_tokens=1)
    batched = StreamingSession(per_chunk.model, per_chunk.tokenizer, None, prefill_min_tokens=10_000)
    for session in (per_chunk, batched):
        push_in_chunks(session, frames[:5], [1, 2, 2])
    assert per_chunk.stats.pending_tokens == 0 and per_chunk.stats.visual_tokens == 5 * 16
    assert batched.stats.pending_tokens == 5 * 16 and batched.stats.visual_tokens == 0
    expected = per_chunk.next_token_logits(QUESTION)
    assert (batched.next_token_logits(QUESTION) - expected).abs().max() < TOLERANCE
    assert batched.stats.pending_tokens == 0 and batched.stats.visual_tokens == 5 * 16
    # the cache holds exactly prefix + visual tokens: keys and values of every layer
    text = per_chunk.model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4
    assert batched.stats.kv_cache_bytes == per_token * batched.stats.cache_tokens


def test_default_batching_prefills_once_an_uncompressed_frame_is_pending(frames):
    session = StreamingSession.from_preset(PRESET, stc=STCConfig(cacher=None, pruner=PrunerConfig(tokens_per_frame=5)))
    assert session.prefill_min_tokens == 16  # one pooled 4x4 frame of the tiny preset
    seen = []
    for index in range(5):
        assert session.push(frames[index : index + 1]) == 5
        seen.append((session.stats.visual_tokens, session.stats.pending_tokens))
    assert seen == [(0, 5), (0, 10), (0, 15), (20, 0), (20, 5)]  # the 4th frame brings 20 >= 16: one pre-fill
    session.close()


@pytest.mark.parametrize("name", ["uniform", "random", "vidcom2", "visionzip"])
def test_baseline_selectors_replace_the_pruner(frames, name):
    from streamtc.baselines import RandomPruner, UniformPruner, VidCom2Pruner, VisionZipPruner

    model = build_model(PRESET)
    factory = {"uniform": UniformPruner, "random": RandomPruner, "vidcom2": VidCom2Pruner,
               "visionzip": VisionZipPruner}[name]
    selector = factory(tokens_per_frame=4)
    if name == "visionzip":
        selector.attach(model, pooled_size=4)
    session = StreamingSession(model, tokenizer_for_config(model.config), None, selector=selector, prefill_min_tokens=1)
    session.push(frames[:3])
    assert session.stats.visual_tokens == 3 * 4 and session.stats.visual_tokens_encoded == 3 * 16
    first = session.ask(QUESTION, max_new_tokens=3).token_ids
    session.reset()  # a new stream: the selector starts over, so the same frames give the same answer
    session.push(frames[:3])
    assert session.ask(QUESTION, max_new_tokens=3).token_ids == first
    with pytest.raises(StreamStateError, match="one session per stream"):
        session.spawn()
    if name == "visionzip":
        selector.detach()
        with pytest.raises(InputError, match="attention"):
            selector.prune(torch.zeros(1, 16, 8))


def test_tome_encoder_feeds_merged_tokens_unpooled(frames):
    from streamtc.baselines import ToMe, tome_video_features

    model = build_model(PRESET)
    tome = ToMe(keep_tokens=13).apply(model.model.vision_tower)  # 49 -> 25 -> 13 in the tiny tower's 2 layers
    try:
        session = StreamingSession(model, tokenizer_for_config(model.config), None, encoder=tome_video_features)
        session.push(frames[:2])
        session.flush()
        assert session.stats.visual_tokens == 2 * 13
        assert session.ask(QUESTION, max_new_tokens=2).frames == 2
    finally:
        tome.remove()


def test_invalid_combinations_are_refused():
    from streamtc.baselines import UniformPruner, tome_video_features

    model = build_model(PRESET)
    tokenizer = tokenizer_for_config(model.config)
    with pytest.raises(ConfigError, match="either stc.pruner or selector"):
        StreamingSession(model, tokenizer, STCConfig(), selector=UniformPruner(keep_ratio=0.25))
    with pytest.raises(ConfigError, match="cacher"):
        StreamingSession(model, tokenizer, STCConfig(pruner=None), encoder=tome_video_features)
    with pytest.raises(ConfigError, match="selector needs"):
        StreamingSession(model, tokenizer, None, selector=object())
    with pytest.raises(ConfigError, match="prefill_min_tokens"):
        StreamingSession(model, tokenizer, None, prefill_min_tokens=0)


def test_text_depth_override():
    model = build_model(PRESET, num_layers=1, text_layers=1)
    assert len(model.model.language_model.layers) == 1 and len(model.model.vision_tower.encoder.layers) == 1
    with pytest.raises(ConfigError, match="no language model"):
        build_model("tiny-siglip", text_layers=1)


def test_sliding_window_keeps_the_prefix_and_the_newest_frames(frames):
    from streamtc.memory import SlidingWindowCache

    full = StreamingSession.from_preset(PRESET, stc=None, prefill_min_tokens=1)
    window = StreamingSession(full.model, full.tokenizer, None, prefill_min_tokens=1,
                              cache_policy=lambda: SlidingWindowCache(3 * 16))
    for session in (full, window):
        push_in_chunks(session, frames[:6], [1, 1, 2, 1, 1])
    prefix = full.stats.prompt_tokens
    full_keys, window_keys = full.cache.layers[0].keys, window.cache.layers[0].keys
    assert window.cache.get_seq_length() == prefix + 3 * 16
    # Layer 0 keys depend only on each token and its position: the window holds exactly the
    # full cache's prefix and last three frames (positions kept, nothing re-encoded).
    kept = torch.cat([full_keys[..., :prefix, :], full_keys[..., prefix + 3 * 16 :, :]], dim=-2)
    assert torch.allclose(window_keys, kept, atol=1e-6)
    before = window.cache.get_seq_length()
    window.ask(QUESTION, max_new_tokens=2)
    assert window.cache.get_seq_length() == before  # the question left the window as it was
    window.reset()
    assert window.cache.get_seq_length() == prefix and window.memory.visual_tokens == 0


def test_a_window_larger_than_the_stream_equals_the_full_cache(frames):
    from streamtc.memory import SlidingWindowCache

    full = StreamingSession.from_preset(PRESET, stc=None)
    window = StreamingSession(full.model, full.tokenizer, None, cache_policy=lambda: SlidingWindowCache(10_000))
    for session in (full, window):
        session.push(frames[:4])
    assert torch.equal(full.next_token_logits(QUESTION), window.next_token_logits(QUESTION))
    with pytest.raises(ConfigError, match="max_visual_tokens"):
        SlidingWindowCache(0)


def test_the_read_only_views_show_the_streams_own_objects_and_follow_a_reset() -> None:
    session = StreamingSession.from_preset("tiny-llava-ov", stc=STCConfig(), cache_policy=lambda: SlidingWindowCache(32))
    session.push(np.zeros((2, 48, 64, 3), dtype=np.uint8))
    cache, memory, stream = session.cache, session.memory, session.host_stream
    assert isinstance(memory, SlidingWindowCache) and memory.visual_tokens <= 32
    assert cache.get_seq_length() == session.stats.cache_tokens > 0
    assert session.cacher_state.stats.frames == 2 and session.pruner_state.frames == 2
    assert session.cacher is not None and session.pruner is not None and session.waiting_frames == 0
    assert session.tokenizer.convert_tokens_to_ids("<|im_end|>") in session.stop_token_ids
    for name in ("cache", "memory", "host_stream", "cacher_state", "pruner_state", "stop_token_ids"):
        with pytest.raises(AttributeError):
            setattr(session, name, None)
    session.reset()
    assert session.cache is not cache and session.memory is not memory and session.host_stream is not stream
    assert session.cacher_state.stats.frames == 0 and session.pruner_state.frames == 0
    session.close()
