"""STC-Cacher against the unpatched tower and against a plainly written implementation of docs/algorithms.md, section 2."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Idefics3VisionConfig,
    Qwen2Config,
    Qwen2Model,
    Siglip2VisionConfig,
    Siglip2VisionModel,
)
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

from streamtc import CacherConfig, ConfigError, InputError, StreamStateError, UnsupportedModelError
from streamtc.cacher import STCCacher
from streamtc.cacher import functional as F
from streamtc.presets import build_model

from cacher_reference import reference_stream

TOL = 1e-5


def frames(count: int, seed: int = 0, size: int = 56) -> torch.Tensor:
    """Frames of a slowly changing synthetic scene: a base image plus small per-frame motion."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 3, size, size, generator=g)
    drift = 0.15 * torch.randn(count, 3, size, size, generator=g)
    return base + drift.cumsum(0)


def encode_chunks(model, chunks: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(pixel_values=c).last_hidden_state for c in chunks])


def split(x: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    return list(x.split(chunk))


def plain_stc_stream(tower, chunks: list[torch.Tensor], interval: int, ratio: float) -> torch.Tensor:
    """The Cacher written plainly (tests/cacher_reference.py, sharing no code with streamtc) over `chunks`."""
    return reference_stream(tower, [{"pixel_values": chunk} for chunk in chunks], interval, ratio)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-siglip", "tiny-clip"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("config", [CacherConfig(cache_interval=1), CacherConfig(cache_interval=3, update_ratio=1.0)])
@pytest.mark.parametrize("chunk", [1, 3])
def test_full_refresh_or_full_ratio_reproduces_unpatched_tower(preset, attn, config, chunk):
    model = build_model(preset, attn_implementation=attn)
    x = frames(6)
    expected = encode_chunks(model, [x])
    cacher = STCCacher(config).attach(model)
    got = encode_chunks(model, split(x, chunk))
    assert (got - expected).abs().max() <= TOL
    assert cacher.stats.frames == 6


def test_detach_restores_original_forward_bit_identically(siglip):
    x = frames(4)
    before = encode_chunks(siglip, [x])
    cacher = STCCacher(CacherConfig(cache_interval=4, update_ratio=0.25)).attach(siglip)
    patched = encode_chunks(siglip, split(x, 1))
    assert not torch.allclose(patched, before, atol=1e-3), "the cacher must actually change non-refresh frames"
    cacher.detach()
    assert all("forward" not in layer.__dict__ for layer in siglip.encoder.layers)
    assert not siglip.encoder._forward_pre_hooks and not siglip.encoder._forward_hooks
    assert torch.equal(encode_chunks(siglip, [x]), before)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("interval", [2, 3])
def test_matches_plain_implementation_of_the_algorithm(siglip, chunk, interval):
    x = frames(9, seed=1)
    chunks = split(x, chunk)
    expected = plain_stc_stream(siglip, chunks, interval, 0.25)
    cacher = STCCacher(CacherConfig(cache_interval=interval, update_ratio=0.25)).attach(siglip)
    try:
        got = encode_chunks(siglip, chunks)
    finally:
        cacher.detach()
    assert (got - expected).abs().max() <= TOL
    assert cacher.stats.chunks == len(chunks)
    assert cacher.stats.refresh_chunks == len(range(0, len(chunks), interval))


def test_plain_implementation_is_not_trivially_equal_to_full_forward(siglip):
    """Guards the test above: at r = 0.25 the selective path must differ from the exact one."""
    x = frames(4, seed=1)
    full = encode_chunks(siglip, [x])
    stc = plain_stc_stream(siglip, split(x, 1), 4, 0.25)
    assert torch.allclose(stc[0], full[0], atol=TOL)
    assert (stc[1:] - full[1:]).abs().max() > 1e-3


def tiny_dinov2(registers: int = 0, swiglu: bool = False):
    """A tiny random DINOv2 tower (registers > 0: Dinov2WithRegistersModel) with non-trivial layer scales."""
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=8,
                  use_swiglu_ffn=swiglu, attn_implementation="eager")
    torch.manual_seed(0)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    if registers:  # initialised to zeros: identical tokens would tie in the key cosine ranking
        model.embeddings.register_tokens.data.normal_()
    for layer in model.encoder.layer:
        layer.layer_scale1.lambda1.data.uniform_(0.2, 1.5)
        layer.layer_scale2.lambda1.data.uniform_(0.2, 1.5)
    return model.eval()


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("config", [CacherConfig(cache_interval=1), CacherConfig(cache_interval=3, update_ratio=1.0)])
def test_dinov2_full_refresh_or_full_ratio_reproduces_unpatched_tower(registers, swiglu, attn, config):
    model = tiny_dinov2(registers, swiglu)
    model.set_attn_implementation(attn)
    x = frames(5)
    expected = encode_chunks(model, [x])
    cacher = STCCacher(config).attach(model)
    got = encode_chunks(model, split(x, 1))
    cacher.detach()
    assert (got - expected).abs().max() <= TOL
    assert torch.equal(encode_chunks(model, [x]), expected)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_layer_scale_path_matches_plain_implementation(registers):
    model = tiny_dinov2(registers)
    chunks = split(frames(7, seed=2), 1)
    expected = plain_stc_stream(model, chunks, 3, 0.25)
    cacher = STCCacher(CacherConfig(cache_interval=3, update_ratio=0.25)).attach(model)
    got = encode_chunks(model, chunks)
    cacher.detach()
    assert (got - expected).abs().max() <= TOL
    assert (got - encode_chunks(model, chunks)).abs().max() > 1e-3, "non-refresh frames must differ from the exact ones"


def test_chunk_counter_is_monotonic_over_the_stream(siglip):
    cacher = STCCacher(CacherConfig(cache_interval=2)).attach(siglip)
    try:
        for chunk in [frames(3), frames(1), frames(2), frames(1), frames(1)]:
            encode_chunks(siglip, [chunk])
    finally:
        cacher.detach()
    assert cacher.state.chunk_index == 5
    assert cacher.stats.refresh_chunks == 3  # chunks 0, 2, 4
    assert cacher.stats.frames == 8
    k = F.num_recomputed_tokens(49, 0.25)
    assert cacher.stats.recomputed_tokens_per_layer == [49 * (3 + 2 + 1) + k * (1 + 1)] * 2


def test_reset_restores_first_frame_behaviour(siglip):
    x = frames(5)
    cacher = STCCacher(CacherConfig(cache_interval=8)).attach(siglip)
    try:
        first = encode_chunks(siglip, split(x, 1))
        cacher.reset()
        assert cacher.state.chunk_index == 0 and cacher.stats.chunks == 0
        again = encode_chunks(siglip, split(x, 1))
    finally:
        cacher.detach()
    assert torch.equal(first, again)


@pytest.mark.parametrize("chunk", [1, 3])
def test_non_refresh_chunks_leave_the_reference_bit_identical(siglip, chunk):
    """One-frame chunks build V̄ inside the reference and swap V_ref back: nothing may remain."""
    x = frames(1 + 2 * chunk, seed=3)
    cacher = STCCacher(CacherConfig(cache_interval=8)).attach(siglip)
    try:
        encode_chunks(siglip, [x[:1]])
        state = cacher.state
        before = [t.clone() for t in (state.unit_keys, state.values, state.residual_delta)]
        encode_chunks(siglip, split(x[1:], chunk))
    finally:
        cacher.detach()
    assert cacher.stats.refresh_chunks == 1
    assert all(torch.equal(a, b) for a, b in zip(before, (state.unit_keys, state.values, state.residual_delta)))


def test_a_layer_that_raises_leaves_the_stream_to_refresh(siglip):
    """An error inside a non-refresh layer (after V̄ was swapped in) must not poison later chunks."""
    x = frames(3, seed=4)
    full = encode_chunks(siglip, [x])

    def fail(*_):
        raise RuntimeError("injected")

    cacher = STCCacher(CacherConfig(cache_interval=8)).attach(siglip)
    try:
        encode_chunks(siglip, [x[:1]])
        handle = siglip.encoder.layers[1].self_attn.out_proj.register_forward_hook(fail)
        with pytest.raises(RuntimeError, match="injected"):
            encode_chunks(siglip, [x[1:2]])
        handle.remove()
        assert not cacher.state.has_reference
        after = encode_chunks(siglip, [x[2:3]])
    finally:
        cacher.detach()
    assert cacher.stats.refresh_chunks == 2  # the failed chunk is not counted; the next one refreshed
    assert torch.allclose(after, full[2:3], atol=TOL)


def test_two_streams_on_two_cachers_do_not_interfere():
    a_model = build_model("tiny-siglip", seed=0)
    b_model = build_model("tiny-siglip", seed=1)
    a_frames, b_frames = frames(6, seed=2), frames(6, seed=3)
    config = CacherConfig(cache_interval=3)

    def alone(model, x):
        cacher = STCCacher(config).attach(model)
        out = encode_chunks(model, split(x, 1))
        cacher.detach()
        return out

    a_alone, b_alone = alone(a_model, a_frames), alone(b_model, b_frames)
    a_cacher, b_cacher = STCCacher(config).attach(a_model), STCCacher(config).attach(b_model)
    a_out, b_out = [], []
    for i in range(6):
        a_out.append(encode_chunks(a_model, [a_frames[i : i + 1]]))
        b_out.append(encode_chunks(b_model, [b_frames[i : i + 1]]))
    a_cacher.detach(), b_cacher.detach()
    assert torch.equal(torch.cat(a_out), a_alone)
    assert torch.equal(torch.cat(b_out), b_alone)


def test_one_model_serves_interleaved_streams_through_states(siglip):
    config = CacherConfig(cache_interval=3)
    streams = [frames(6, seed=s) for s in (4, 5)]
    cacher = STCCacher(config).attach(siglip)
    try:
        alone = []
        for x in streams:
            cacher.reset()
            alone.append(encode_chunks(siglip, split(x, 1)))
        states = [cacher.new_state(), cacher.new_state()]
        outs = [[], []]
        for i in range(6):
            for s, x in enumerate(streams):
                with cacher.stream(states[s]):
                    outs[s].append(encode_chunks(siglip, [x[i : i + 1]]))
    finally:
        cacher.detach()
    for s in range(2):
        assert torch.equal(torch.cat(outs[s]), alone[s])
    assert states[0].stats.chunks == states[1].stats.chunks == 6


def test_captured_hidden_states_are_the_cachers_outputs(siglip):
    x = frames(2)
    cacher = STCCacher(CacherConfig(cache_interval=2)).attach(siglip)
    try:
        with torch.no_grad():
            siglip(pixel_values=x[:1])
            out = siglip(pixel_values=x[1:], output_hidden_states=True)
    finally:
        cacher.detach()
    with torch.no_grad():
        full = siglip(pixel_values=x[1:], output_hidden_states=True)
    assert torch.allclose(out.hidden_states[0], full.hidden_states[0])  # embeddings are not cached
    assert not torch.allclose(out.hidden_states[-1], full.hidden_states[-1], atol=1e-3)
    assert torch.allclose(siglip.post_layernorm(out.hidden_states[-1]), out.last_hidden_state, atol=TOL)


def test_llava_onevision_video_features_go_through_the_cacher():
    model = build_model("tiny-llava-ov")
    video = frames(4).unsqueeze(0)  # [1, F, 3, H, W]

    def features():
        with torch.no_grad():
            return torch.cat(
                [
                    model.model.get_video_features(
                        pixel_values_videos=video[:, i : i + 1], vision_feature_layer=-1, vision_feature_select_strategy="full"
                    ).pooler_output
                    for i in range(4)
                ]
            )

    expected = features()
    cacher = STCCacher(CacherConfig(cache_interval=1)).attach(model)
    assert torch.allclose(features(), expected, atol=TOL)
    cacher.detach()
    cacher = STCCacher(CacherConfig(cache_interval=2)).attach(model)
    got = features()
    cacher.detach()
    assert cacher.stats.chunks == 4 and cacher.stats.refresh_chunks == 2
    assert torch.allclose(got[0], expected[0], atol=TOL)
    assert not torch.allclose(got[1], expected[1], atol=1e-4)


def per_layer_and_shared_outputs(model) -> list[torch.Tensor]:
    """The same 4-frame stream (one refresh, then selective chunks) under both selection modes."""
    x = frames(4)
    outputs = []
    for selection in ("per_layer", "shared"):
        cacher = STCCacher(CacherConfig(cache_interval=4, selection=selection)).attach(model)
        outputs.append(encode_chunks(model, split(x, 1)))
        cacher.detach()
    return outputs


def test_shared_selection_equals_per_layer_selection_on_a_one_layer_tower():
    per_layer, shared = per_layer_and_shared_outputs(build_model("tiny-siglip", num_layers=1))
    assert torch.allclose(per_layer, shared, atol=TOL)


def test_shared_selection_differs_from_per_layer_on_deeper_towers(siglip):
    per_layer, shared = per_layer_and_shared_outputs(siglip)
    assert not torch.allclose(per_layer[1:], shared[1:], atol=1e-5)


def test_adaptive_refresh_triggers_on_a_cut_and_not_on_a_still_scene(siglip):
    still = frames(1).repeat(4, 1, 1, 1)
    cut = frames(1, seed=9)
    cacher = STCCacher(CacherConfig(cache_interval=100, refresh="adaptive", refresh_signal="keys", refresh_threshold=0.9)).attach(siglip)
    try:
        out = encode_chunks(siglip, split(still, 1))
        assert cacher.stats.refresh_chunks == 1 and cacher.stats.adaptive_refreshes == 0
        cut_out = encode_chunks(siglip, [cut])
        assert cacher.stats.refresh_chunks == 2 and cacher.stats.adaptive_refreshes == 1
    finally:
        cacher.detach()
    full = encode_chunks(siglip, [torch.cat([still, cut])])
    assert torch.allclose(out, full[:4], atol=TOL)  # identical frames: reuse is exact
    assert torch.allclose(cut_out, full[4:], atol=TOL)  # the cut was computed exactly


def test_resolution_change_refreshes():
    model = build_model("tiny-siglip")
    cacher = STCCacher(CacherConfig(cache_interval=10)).attach(model)
    try:
        with torch.no_grad():
            model(pixel_values=frames(1))
            small = model(pixel_values=frames(1, size=40), interpolate_pos_encoding=True).last_hidden_state
    finally:
        cacher.detach()
    assert cacher.stats.refresh_chunks == 2
    with torch.no_grad():
        expected = model(pixel_values=frames(1, size=40), interpolate_pos_encoding=True).last_hidden_state
    assert torch.allclose(small, expected, atol=TOL)


def test_dtype_change_after_attach_is_a_clear_error():
    model = build_model("tiny-siglip")
    cacher = STCCacher(CacherConfig(cache_interval=10)).attach(model)
    encode_chunks(model, [frames(1)])
    model.double()
    with pytest.raises(StreamStateError, match="reset"):
        encode_chunks(model, [frames(1).double()])
    cacher.reset()
    assert encode_chunks(model, [frames(1).double()]).dtype == torch.float64
    cacher.detach()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"update_ratio": 0.0}, "update_ratio"),
        ({"update_ratio": 1.5}, "update_ratio"),
        ({"cache_interval": 0}, "cache_interval"),
        ({"cache_interval": 2.5}, "cache_interval"),
        ({"selection": "random"}, "selection"),
        ({"refresh": "sometimes"}, "refresh"),
        ({"refresh": "adaptive", "refresh_budget": 0}, "refresh_budget"),
        ({"refresh": "adaptive", "refresh_budget": 1.5}, "refresh_budget"),
        ({"refresh": "adaptive", "refresh_budget": True}, "refresh_budget"),
        ({"refresh_budget": 2}, "refresh_budget only applies"),
        ({"refresh": "adaptive", "cache_interval": 4, "refresh_budget": 8}, "must not exceed cache_interval"),
    ],
)
def test_invalid_config_values_raise(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CacherConfig(**kwargs)


def test_unknown_config_keys_raise():
    with pytest.raises(ConfigError, match="cache_intervall"):
        CacherConfig.from_dict({"cache_intervall": 2})


def test_unsupported_model_names_what_is_supported():
    text_model = Qwen2Model(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="SiglipVisionModel.*CLIPVisionModel"):
        STCCacher().attach(text_model)


def test_attaching_twice_is_refused(siglip):
    cacher = STCCacher().attach(siglip)
    try:
        with pytest.raises(StreamStateError, match="already attached"):
            cacher.attach(siglip)
        with pytest.raises(StreamStateError, match="already has an STCCacher"):
            STCCacher().attach(siglip)
    finally:
        cacher.detach()


def test_stream_requires_a_cacher_state(siglip):
    with pytest.raises(InputError, match="CacherState"):
        with STCCacher().stream(object()):
            pass


def test_siglip2_with_padding_mask():
    config = Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 patch_size=8, num_patches=16, vision_use_head=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Siglip2VisionModel(config).eval()
    patches = torch.randn(3, 16, 3 * 8 * 8)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[:, 12:] = 0  # the last 4 patches are padding
    shapes = torch.tensor([[3, 4]] * 3)

    def run():
        with torch.no_grad():
            return torch.cat([model(pixel_values=patches[i : i + 1] + 0.05 * i, pixel_attention_mask=mask[i : i + 1],
                                    spatial_shapes=shapes[i : i + 1]).last_hidden_state for i in range(3)])

    expected = run()
    cacher = STCCacher(CacherConfig(cache_interval=1)).attach(model)
    assert torch.allclose(run(), expected, atol=TOL)
    cacher.detach()
    cacher = STCCacher(CacherConfig(cache_interval=3, update_ratio=0.5)).attach(model)
    got = run()
    cacher.detach()
    assert torch.isfinite(got).all() and cacher.stats.refresh_chunks == 1


def test_idefics3_tower():
    config = Idefics3VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = Idefics3VisionTransformer(config).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    cacher = STCCacher(CacherConfig(update_ratio=1.0)).attach(model)
    got = encode_chunks(model, split(x, 1))
    cacher.detach()
    assert (got - expected).abs().max() <= TOL


def test_compiled_static_path_captures_full_graphs_and_matches_eager(monkeypatch):
    """compile_mode wraps both layer paths in torch.compile(fullgraph=True): any graph break fails.

    Inductor code generation takes minutes on this CPU, so the test traces with dynamo's eager
    backend; the benchmark runs the real compiler.
    """
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    real_compile = torch.compile

    def trace_only(fn, mode=None, **kwargs):
        assert mode == "default" and kwargs["fullgraph"] and kwargs["dynamic"] is False
        return real_compile(fn, backend=counter, **kwargs)

    model = build_model("tiny-siglip", num_layers=3)
    x = frames(5)
    cacher = STCCacher(CacherConfig(cache_interval=2)).attach(model)
    expected = encode_chunks(model, split(x, 1))
    cacher.detach()
    monkeypatch.setattr(torch, "compile", trace_only)
    cacher = STCCacher(CacherConfig(cache_interval=2, compile_mode="default")).attach(model)
    got = encode_chunks(model, split(x, 1))
    cacher.detach()
    assert (got - expected).abs().max() <= TOL
    assert counter.frame_count == 2  # one graph for refresh, one for selective, shared by all 3 layers


def test_adaptive_cadence_counts_from_the_last_refresh(siglip):
    """After an adaptive refresh the next scheduled one is N chunks later, not at the next c % N."""
    still = frames(1).repeat(6, 1, 1, 1)
    sequence = torch.cat([still[:2], frames(1, seed=9).repeat(5, 1, 1, 1)])  # cut at chunk 2
    refreshed = adaptive_refresh_pattern(siglip, CacherConfig(cache_interval=4, refresh="adaptive", refresh_signal="keys"), sequence)
    assert refreshed == [True, False, True, False, False, False, True]


def test_reused_similarity_ignores_the_recomputed_tokens():
    similarity = torch.tensor([[1.0, 1.0, 1.0, -1.0], [0.5, 0.5, 0.5, 0.5]])
    assert torch.allclose(F.reused_similarity(similarity, 1), torch.tensor([1.0, 0.5]))
    assert torch.allclose(F.reused_similarity(similarity, 4), torch.tensor([1.0, 1.0]))


def test_reused_similarity_is_the_median_so_a_tail_of_flipped_keys_does_not_trigger():
    # One recomputed token (k = 1) and four reused: three unchanged, one whose key flipped.
    similarity = torch.tensor([[-1.0, -1.0, 0.95, 0.95, 0.95]])
    assert torch.allclose(F.reused_similarity(similarity, 1), torch.tensor([0.95]))
    # Most reused tokens moved (a cut): the median drops with them.
    assert torch.allclose(F.reused_similarity(torch.tensor([[-1.0, 0.1, 0.2, 0.3, 0.95]]), 1), torch.tensor([0.2]))


def test_reused_similarity_matches_the_median_of_the_top_tokens():
    similarity = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for k in (1, 12, 25, 49):
        expected = similarity.topk(50 - k, dim=-1).values.median(dim=-1).values
        assert torch.equal(F.reused_similarity(similarity, k), expected)


def test_refresh_budget_follows_the_fixed_schedules_count_on_every_prefix():
    # Spending every credit as soon as it exists reproduces the fixed schedule c % N == 0.
    for interval in (1, 2, 3, 5):
        refreshes = 0
        for chunk in range(40):
            if F.within_refresh_budget(chunk, refreshes, interval):
                refreshes += 1
                assert chunk % interval == 0
            assert refreshes == chunk // interval + 1


def adaptive_refresh_pattern(model, config, sequence):
    cacher = STCCacher(config).attach(model)
    refreshed = []
    try:
        for frame in sequence:
            before = cacher.stats.refresh_chunks
            encode_chunks(model, [frame[None]])
            refreshed.append(cacher.stats.refresh_chunks > before)
    finally:
        cacher.detach()
    return refreshed


def test_refresh_budget_caps_a_stream_of_cuts_at_the_fixed_count(siglip):
    cuts = torch.cat([frames(1, seed=s) for s in range(9)])  # every chunk a new scene
    config = dict(cache_interval=8, refresh="adaptive", refresh_signal="keys", refresh_threshold=0.99)
    assert adaptive_refresh_pattern(siglip, CacherConfig(**config), cuts) == [True] * 9  # uncapped: all refresh
    capped = adaptive_refresh_pattern(siglip, CacherConfig(**config, refresh_budget=2), cuts)
    assert capped == [c % 2 == 0 for c in range(9)]


def test_refresh_budget_banks_credit_on_a_still_scene_for_later_cuts(siglip):
    still = frames(1).repeat(4, 1, 1, 1)
    cuts = torch.cat([frames(1, seed=s) for s in range(1, 5)])
    config = CacherConfig(cache_interval=8, refresh="adaptive", refresh_signal="keys", refresh_threshold=0.99, refresh_budget=2)
    refreshed = adaptive_refresh_pattern(siglip, config, torch.cat([still, cuts]))
    # Chunks 1-3 bank one refresh; the cuts at 4, 5, 6 spend it and the new credit; 7 has none left.
    assert refreshed == [True, False, False, False, True, True, True, False]


def test_default_adaptive_threshold_ignores_small_motion_and_catches_a_cut(siglip):
    drift = frames(4)  # a base scene with small per-frame changes
    sequence = torch.cat([drift, frames(1, seed=9)])
    refreshed = adaptive_refresh_pattern(siglip, CacherConfig(cache_interval=100, refresh="adaptive", refresh_signal="keys"), sequence)
    assert refreshed == [True, False, False, False, True]


def test_relative_pixel_change_is_scale_free_and_zero_for_the_same_frame():
    reference = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    moved = torch.stack([reference, reference + 0.1, torch.randn(3, 8, 8)])
    change = F.relative_pixel_change(moved, reference)
    assert change[0] == 0 and 0 < change[1] < change[2]
    assert torch.allclose(F.relative_pixel_change(2 * moved, 2 * reference), change)  # any pixel normalisation


def test_pixel_signal_refreshes_on_a_cut_and_not_on_small_motion(siglip):
    sequence = torch.cat([frames(4), frames(1, seed=9), frames(3, seed=9)])  # drift, cut, drift of the new scene
    config = CacherConfig(cache_interval=100, refresh="adaptive")
    assert config.refresh_signal == "pixels" and config.refresh_threshold == 0.35
    assert adaptive_refresh_pattern(siglip, config, sequence) == [True, False, False, False, True, False, False, False]


def test_pixel_signal_respects_the_refresh_budget(siglip):
    cuts = torch.cat([frames(1, seed=s) for s in range(9)])
    capped = adaptive_refresh_pattern(siglip, CacherConfig(cache_interval=8, refresh="adaptive", refresh_budget=2), cuts)
    assert capped == [c % 2 == 0 for c in range(9)]


def test_pixel_signal_compares_against_the_reference_frame_not_the_previous_one(siglip):
    """Slow drift that never moves far between neighbours still refreshes once it is far from the reference."""
    g = torch.Generator().manual_seed(3)
    base, step = torch.randn(1, 3, 56, 56, generator=g), torch.randn(1, 3, 56, 56, generator=g)
    sequence = torch.cat([base + 0.12 * i * step for i in range(8)])
    refreshed = adaptive_refresh_pattern(siglip, CacherConfig(cache_interval=100, refresh="adaptive"), sequence)
    assert refreshed[0] and 1 <= sum(refreshed[1:]) < 7


def test_pixel_signal_refreshes_when_the_encoder_runs_without_its_tower(siglip):
    """No pixels to compare (the encoder called directly): the chunk counts as moved."""
    cacher = STCCacher(CacherConfig(cache_interval=100, refresh="adaptive")).attach(siglip)
    try:
        with torch.no_grad():
            for _ in range(2):
                siglip.encoder(siglip.embeddings(frames(1)))
        assert cacher.stats.refresh_chunks == 2
    finally:
        cacher.detach()


@pytest.mark.parametrize("kwargs,message", [
    (dict(refresh_signal="pixels", refresh_threshold=-0.1), "relative pixel change"),
    (dict(refresh_signal="keys", refresh_threshold=1.5), "cosine similarity"),
    (dict(refresh_signal="frames"), "refresh_signal"),
])
def test_refresh_threshold_is_checked_for_its_signal(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CacherConfig(refresh="adaptive", **kwargs)


# ---------------------------------------------------------------------------------------------
# CPU kernels: oneDNN products where PyTorch would call MKL, PyTorch's own path everywhere else.


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {event.name for event in prof.events()}


def test_onednn_linear_matches_torch_and_is_what_runs():
    from streamtc.cacher import kernels

    assert kernels.onednn_available()
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        expected = layer(x)
        got = kernels.linear(layer, x, onednn=True)
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: kernels.linear(layer, x, onednn=True))
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: kernels.linear(layer, x, onednn=False))
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("case", ["grad", "float64", "hook", "not_plain_linear"])
def test_onednn_linear_keeps_torchs_path_where_the_swap_could_change_more_than_the_kernel(case):
    from streamtc.cacher import kernels

    class Wrapped(torch.nn.Linear):
        pass

    layer = (Wrapped if case == "not_plain_linear" else torch.nn.Linear)(8, 8)
    x = torch.randn(3, 8)
    if case == "float64":
        layer, x = layer.double(), x.double()
    calls = []
    if case == "hook":
        layer.register_forward_hook(lambda *_: calls.append(1))
    with torch.set_grad_enabled(case == "grad"):
        ops = _ops_run(lambda: kernels.linear(layer, x, onednn=True))
    assert "mkldnn::_linear_pointwise" not in ops
    assert calls == ([1] if case == "hook" else [])


@pytest.mark.parametrize("cpu_kernels", ["onednn", "torch"])
def test_both_cpu_kernel_choices_match_the_plain_implementation(siglip, cpu_kernels):
    x = frames(5, seed=1)
    expected = plain_stc_stream(siglip, split(x, 1), 2, 0.25)
    cacher = STCCacher(CacherConfig(cache_interval=2, cpu_kernels=cpu_kernels)).attach(siglip)
    outputs = []
    try:
        ops = _ops_run(lambda: outputs.append(encode_chunks(siglip, split(x, 1))))
    finally:
        cacher.detach()
    assert ("mkldnn::_linear_pointwise" in ops) == (cpu_kernels == "onednn")
    assert (outputs[0] - expected).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------
# over_budget="subsample": a cut the refresh budget cannot pay for is encoded exactly on a token subset.


def over_budget_config(**kwargs):
    return CacherConfig(cache_interval=8, refresh="adaptive", refresh_budget=4, over_budget="subsample", **kwargs)


def plain_subsampled_frame(tower, frame, ratio):
    """The tower's layers on an evenly strided subset of the patch grid, dropped tokens filled by the nearest kept one."""
    with torch.no_grad():
        x = tower.embeddings(frame[None])
        registers = getattr(tower.embeddings, "register_tokens", None)
        prefix = int(getattr(tower.embeddings, "cls_token", None) is not None) + (0 if registers is None else registers.shape[1])
        side = int(round((x.shape[1] - prefix) ** 0.5))
        keep_side = max(1, min(side, round(side * math.sqrt(ratio))))
        kept_1d = [round(i * (side - 1) / max(1, keep_side - 1)) for i in range(keep_side)] if keep_side > 1 else [0]
        kept = [r * side + c for r in kept_1d for c in kept_1d]
        rows = list(range(prefix)) + [k + prefix for k in kept]
        h = x[:, rows]
        for layer in (tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer):
            h = type(layer).forward(layer, h, None)
        fill = []
        for cell in range(side * side):
            r, c = divmod(cell, side)
            distances = [((r - k // side) ** 2 + (c - k % side) ** 2, j) for j, k in enumerate(kept)]
            fill.append(prefix + min(distances)[1])
        out = torch.cat([h[:, :prefix], h[:, fill]], dim=1)
        final = tower.post_layernorm if hasattr(tower, "post_layernorm") else tower.layernorm
        return final(out)[0]


@pytest.mark.parametrize("registers", [0, 4])
def test_over_budget_cut_is_the_plain_subsampled_forward_and_leaves_the_reference(registers):
    model = tiny_dinov2(registers)
    cuts = torch.cat([frames(1, seed=s) for s in range(3)])  # every chunk a cut; budget 4 pays for chunk 0 only
    cacher = STCCacher(over_budget_config()).attach(model)
    got = encode_chunks(model, [cuts[0:1]])
    reference = cacher.state.values.clone(), cacher.state.residual_delta.clone()
    got = torch.cat([got, encode_chunks(model, [cuts[1:2]]), encode_chunks(model, [cuts[2:3]])])
    cacher.detach()
    assert cacher.stats.refresh_chunks == 1 and cacher.stats.subsampled_chunks == 2
    assert torch.equal(cacher.state.values, reference[0]) and torch.equal(cacher.state.residual_delta, reference[1])
    for i in (1, 2):
        assert (got[i] - plain_subsampled_frame(model, cuts[i], 0.32)).abs().max() <= TOL


def test_over_budget_subsample_of_the_whole_grid_is_the_unpatched_tower():
    model = tiny_dinov2(4)
    cuts = torch.cat([frames(1, seed=s) for s in range(3)])
    expected = encode_chunks(model, [cuts])
    cacher = STCCacher(over_budget_config(subsample_ratio=1.0)).attach(model)
    got = encode_chunks(model, split(cuts, 1))
    cacher.detach()
    assert cacher.stats.subsampled_chunks == 2
    assert (got - expected).abs().max() <= TOL


def test_over_budget_subsample_counts_its_flops_and_only_fires_past_the_budget(siglip):
    still, cut = frames(3), frames(1, seed=9)
    cacher = STCCacher(over_budget_config()).attach(siglip)
    encode_chunks(siglip, split(torch.cat([still, cut, frames(1, seed=10)]), 1))
    cacher.detach()
    # chunk 0 refreshes; 1-2 reuse; the cut at 3 finds no credit (budget 4: one refresh by chunk 3) and is
    # subsampled; the cut at 4 has earned one and refreshes.
    assert cacher.stats.refresh_chunks == 2 and cacher.stats.subsampled_chunks == 1
    assert 0.3 < cacher.stats.flop_ratio < 0.7


def test_over_budget_subsample_needs_the_pixel_signal():
    with pytest.raises(ConfigError, match="over_budget"):
        CacherConfig(refresh="adaptive", refresh_signal="keys", over_budget="subsample")
    with pytest.raises(ConfigError, match="subsample_ratio"):
        CacherConfig(subsample_ratio=0.0)


def test_over_budget_motion_below_the_cut_threshold_is_reused_not_subsampled(siglip):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 3, 56, 56, generator=g)
    moving = torch.cat([base] + [base + 0.42 * torch.randn(1, 3, 56, 56, generator=g) for _ in range(3)])
    change = F.relative_pixel_change(moving[1:], moving[0])
    assert ((change > 0.35) & (change < 0.5)).all()  # moved past the refresh threshold, not a cut
    cacher = STCCacher(over_budget_config()).attach(siglip)
    encode_chunks(siglip, split(moving, 1))
    cacher.detach()
    assert cacher.stats.refresh_chunks == 1 and cacher.stats.subsampled_chunks == 0
