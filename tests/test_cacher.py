"""STC-Cacher against the unpatched tower and against a plainly written implementation of docs/algorithms.md, section 2."""

from __future__ import annotations

import pytest
import torch
from transformers import (
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
from helpers import encode_chunks, layer_scaled_dinov2, pixel_drift, split_chunks

TOL = 1e-5


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
    x = pixel_drift(6)
    expected = encode_chunks(model, [x])
    cacher = STCCacher(config).attach(model)
    got = encode_chunks(model, split_chunks(x, chunk))
    assert (got - expected).abs().max() <= TOL
    assert cacher.stats.frames == 6


def test_detach_restores_original_forward_bit_identically(siglip):
    x = pixel_drift(4)
    before = encode_chunks(siglip, [x])
    cacher = STCCacher(CacherConfig(cache_interval=4, update_ratio=0.25)).attach(siglip)
    patched = encode_chunks(siglip, split_chunks(x, 1))
    assert not torch.allclose(patched, before, atol=1e-3), "the cacher must actually change non-refresh frames"
    cacher.detach()
    assert all("forward" not in layer.__dict__ for layer in siglip.encoder.layers)
    assert not siglip.encoder._forward_pre_hooks and not siglip.encoder._forward_hooks
    assert torch.equal(encode_chunks(siglip, [x]), before)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("interval", [2, 3])
def test_matches_plain_implementation_of_the_algorithm(siglip, chunk, interval):
    x = pixel_drift(9, seed=1)
    chunks = split_chunks(x, chunk)
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
    x = pixel_drift(4, seed=1)
    full = encode_chunks(siglip, [x])
    stc = plain_stc_stream(siglip, split_chunks(x, 1), 4, 0.25)
    assert torch.allclose(stc[0], full[0], atol=TOL)
    assert (stc[1:] - full[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("config", [CacherConfig(cache_interval=1), CacherConfig(cache_interval=3, update_ratio=1.0)])
def test_dinov2_full_refresh_or_full_ratio_reproduces_unpatched_tower(registers, swiglu, attn, config):
    model = layer_scaled_dinov2(registers, swiglu)
    model.set_attn_implementation(attn)
    x = pixel_drift(5)
    expected = encode_chunks(model, [x])
    cacher = STCCacher(config).attach(model)
    got = encode_chunks(model, split_chunks(x, 1))
    cacher.detach()
    assert (got - expected).abs().max() <= TOL
    assert torch.equal(encode_chunks(model, [x]), expected)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_layer_scale_path_matches_plain_implementation(registers):
    model = layer_scaled_dinov2(registers)
    chunks = split_chunks(pixel_drift(7, seed=2), 1)
    expected = plain_stc_stream(model, chunks, 3, 0.25)
    cacher = STCCacher(CacherConfig(cache_interval=3, update_ratio=0.25)).attach(model)
    got = encode_chunks(model, chunks)
    cacher.detach()
    assert (got - expected).abs().max() <= TOL
    assert (got - encode_chunks(model, chunks)).abs().max() > 1e-3, "non-refresh frames must differ from the exact ones"


def test_chunk_counter_is_monotonic_over_the_stream(siglip):
    cacher = STCCacher(CacherConfig(cache_interval=2)).attach(siglip)
    try:
        for chunk in [pixel_drift(3), pixel_drift(1), pixel_drift(2), pixel_drift(1), pixel_drift(1)]:
            encode_chunks(siglip, [chunk])
    finally:
        cacher.detach()
    assert cacher.state.chunk_index == 5
    assert cacher.stats.refresh_chunks == 3  # chunks 0, 2, 4
    assert cacher.stats.frames == 8
    k = F.num_recomputed_tokens(49, 0.25)
    assert cacher.stats.recomputed_tokens_per_layer == [49 * (3 + 2 + 1) + k * (1 + 1)] * 2


def test_reset_restores_first_frame_behaviour(siglip):
    x = pixel_drift(5)
    cacher = STCCacher(CacherConfig(cache_interval=8)).attach(siglip)
    try:
        first = encode_chunks(siglip, split_chunks(x, 1))
        cacher.reset()
        assert cacher.state.chunk_index == 0 and cacher.stats.chunks == 0
        again = encode_chunks(siglip, split_chunks(x, 1))
    finally:
        cacher.detach()
    assert torch.equal(first, again)


@pytest.mark.parametrize("chunk", [1, 3])
def test_non_refresh_chunks_leave_the_reference_bit_identical(siglip, chunk):
    """One-frame chunks build V̄ inside the reference and swap V_ref back: nothing may remain."""
    x = pixel_drift(1 + 2 * chunk, seed=3)
    cacher = STCCacher(CacherConfig(cache_interval=8)).attach(siglip)
    try:
        encode_chunks(siglip, [x[:1]])
        state = cacher.state
        before = [t.clone() for t in (state.unit_keys, state.values, state.residual_delta)]
        encode_chunks(siglip, split_chunks(x[1:], chunk))
    finally:
        cacher.detach()
    assert cacher.stats.refresh_chunks == 1
    assert all(torch.equal(a, b) for a, b in zip(before, (state.unit_keys, state.values, state.residual_delta)))


def test_a_layer_that_raises_leaves_the_stream_to_refresh(siglip):
    """An error inside a non-refresh layer (after V̄ was swapped in) must not poison later chunks."""
    x = pixel_drift(3, seed=4)
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
    a_frames, b_frames = pixel_drift(6, seed=2), pixel_drift(6, seed=3)
    config = CacherConfig(cache_interval=3)

    def alone(model, x):
        cacher = STCCacher(config).attach(model)
        out = encode_chunks(model, split_chunks(x, 1))
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
    streams = [pixel_drift(6, seed=s) for s in (4, 5)]
    cacher = STCCacher(config).attach(siglip)
    try:
        alone = []
        for x in streams:
            cacher.reset()
            alone.append(encode_chunks(siglip, split_chunks(x, 1)))
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
    x = pixel_drift(2)
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
    video = pixel_drift(4).unsqueeze(0)  # [1, F, 3, H, W]

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
    x = pixel_drift(4)
    outputs = []
    for selection in ("per_layer", "shared"):
        cacher = STCCacher(CacherConfig(cache_interval=4, selection=selection)).attach(model)
        outputs.append(encode_chunks(model, split_chunks(x, 1)))
        cacher.detach()
    return outputs


def test_shared_selection_equals_per_layer_selection_on_a_one_layer_tower():
    per_layer, shared = per_layer_and_shared_outputs(build_model("tiny-siglip", num_layers=1))
    assert torch.allclose(per_layer, shared, atol=TOL)


def test_shared_selection_differs_from_per_layer_on_deeper_towers(siglip):
    per_layer, shared = per_layer_and_shared_outputs(siglip)
    assert not torch.allclose(per_layer[1:], shared[1:], atol=1e-5)


def test_resolution_change_refreshes():
    model = build_model("tiny-siglip")
    cacher = STCCacher(CacherConfig(cache_interval=10)).attach(model)
    try:
        with torch.no_grad():
            model(pixel_values=pixel_drift(1))
            small = model(pixel_values=pixel_drift(1, size=40), interpolate_pos_encoding=True).last_hidden_state
    finally:
        cacher.detach()
    assert cacher.stats.refresh_chunks == 2
    with torch.no_grad():
        expected = model(pixel_values=pixel_drift(1, size=40), interpolate_pos_encoding=True).last_hidden_state
    assert torch.allclose(small, expected, atol=TOL)


def test_dtype_change_after_attach_is_a_clear_error():
    model = build_model("tiny-siglip")
    cacher = STCCacher(CacherConfig(cache_interval=10)).attach(model)
    encode_chunks(model, [pixel_drift(1)])
    model.double()
    with pytest.raises(StreamStateError, match="reset"):
        encode_chunks(model, [pixel_drift(1).double()])
    cacher.reset()
    assert encode_chunks(model, [pixel_drift(1).double()]).dtype == torch.float64
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
    got = encode_chunks(model, split_chunks(x, 1))
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
    x = pixel_drift(5)
    cacher = STCCacher(CacherConfig(cache_interval=2)).attach(model)
    expected = encode_chunks(model, split_chunks(x, 1))
    cacher.detach()
    monkeypatch.setattr(torch, "compile", trace_only)
    cacher = STCCacher(CacherConfig(cache_interval=2, compile_mode="default")).attach(model)
    got = encode_chunks(model, split_chunks(x, 1))
    cacher.detach()
    assert (got - expected).abs().max() <= TOL
    assert counter.frame_count == 2  # one graph for refresh, one for selective, shared by all 3 layers


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
    x = pixel_drift(5, seed=1)
    expected = plain_stc_stream(siglip, split_chunks(x, 1), 2, 0.25)
    cacher = STCCacher(CacherConfig(cache_interval=2, cpu_kernels=cpu_kernels)).attach(siglip)
    outputs = []
    try:
        ops = _ops_run(lambda: outputs.append(encode_chunks(siglip, split_chunks(x, 1))))
    finally:
        cacher.detach()
    assert ("mkldnn::_linear_pointwise" in ops) == (cpu_kernels == "onednn")
    assert (outputs[0] - expected).abs().max() <= TOL
