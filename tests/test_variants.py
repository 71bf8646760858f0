"""The session factory (`streamtc.factory`) and the variant registry (`streamtc.variants`): every
variant runs on a shared model without touching it, a built session equals one derived from a
loaded model, and specs refuse what cannot be built."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtc import STCConfig
from streamtc.errors import ConfigError
from streamtc.factory import SessionSpec, derive_session
from streamtc.memory import SlidingWindowCache
from streamtc.sources import builtin_clip_path, open_source
from streamtc.variants import BASELINE_REGISTRY, BASELINES, VARIANTS, Variant, get_variant

QUESTION = ("What is the person doing?", ("riding", "walking"))


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, list[float]]:
    with open_source(str(builtin_clip_path()), fps=1.0, max_seconds=3) as source:  # frames at 0, 1, 2, 3 s
        frames = list(source)
    return np.stack([f.image for f in frames]), [f.timestamp for f in frames]


def logits_after(session, clip) -> torch.Tensor:
    session.reset()
    session.push(*clip)
    return session.next_token_logits(*QUESTION)


def test_every_variant_runs_on_a_shared_model_and_leaves_it_untouched(clip):
    base = SessionSpec(preset="tiny-llava-ov").load()
    reference = logits_after(base, clip)
    kept = {}
    for variant in VARIANTS.values():
        assert variant.name and variant.description and variant.describe(), variant
        if variant.unsupported_reason(base.host) is not None:  # e.g. merge blocks: Qwen-VL towers only
            with pytest.raises(ConfigError, match=variant.name):
                derive_session(base, variant, share_weights=True)
            continue
        session = derive_session(base, variant, share_weights=True)
        assert (session.model is base.model) == (not variant.patches_model)
        logits = logits_after(session, clip)
        kept[variant.name] = session.stats.visual_tokens + session.stats.pending_tokens
        if variant.uncompressed and not variant.delay_ms:
            assert torch.equal(logits, reference)
        assert torch.isfinite(logits).all(), variant.name
    torch.testing.assert_close(logits_after(base, clip), reference, rtol=0, atol=0)  # the base model is as it was
    assert kept["none"] == kept["cacher N=2"] == 4 * 16  # the Cacher keeps every token
    for name in ("stc", "pruner dual_anchor 25%", "uniform 25%", "random 25%", "vidcom2 25%", "visionzip 25%",
                 "tome 25%"):
        assert kept[name] < kept["none"], name


def test_a_built_session_equals_one_derived_from_the_loaded_model(clip):
    spec = SessionSpec(preset="tiny-llava-ov", variant="uniform 25%", window_tokens=8)
    built = spec.build()
    derived = derive_session(SessionSpec(preset="tiny-llava-ov").load(), get_variant("uniform 25%"),
                             cache_policy=lambda: SlidingWindowCache(8))
    torch.testing.assert_close(logits_after(built, clip), logits_after(derived, clip), rtol=0, atol=0)
    assert built.stats.cache_tokens == built.stats.prompt_tokens + 2 * 4  # the window holds 2 frames of 4 tokens


def test_specs_refuse_what_cannot_be_built():
    with pytest.raises(ConfigError, match="either stc or variant"):
        SessionSpec(stc=STCConfig(), variant="stc")
    with pytest.raises(ConfigError, match="unknown variant 'warp'.*tome 25%"):
        SessionSpec(variant="warp")
    with pytest.raises(ConfigError, match="depth overrides apply to presets"):
        SessionSpec(model="some/model", num_layers=2)
    with pytest.raises(ConfigError, match="dtype must be one of float32"):
        SessionSpec(dtype="float64")
    with pytest.raises(ConfigError, match="a baseline runs without STC"):
        Variant("x", stc=STCConfig(), baseline="uniform")
    assert SessionSpec(stc=STCConfig().to_dict()).stc == STCConfig()  # the dict form (results headers) is read back
    with pytest.raises(ConfigError, match="needs a LLaVA-OneVision, Qwen2-VL or Qwen2.5-VL host"):
        SessionSpec(preset="qwen3-vl-tiny", variant="tome 25%").build()
    with pytest.raises(ConfigError, match="merge blocks.*SiglipVisionModel has none"):
        SessionSpec(preset="tiny-llava-ov", variant="stc merge blocks").build()


def test_the_protocol_rate_is_the_hosts_where_its_prompt_is_built_on_one():
    assert SessionSpec(preset="tiny-llava-ov").protocol_fps() is None
    assert SessionSpec(preset="qwen2-vl-tiny").protocol_fps() == 2.0
    assert SessionSpec(preset="livecc-tiny").protocol_fps() == 2.0


def module_state(model: torch.nn.Module) -> list[tuple]:
    """What a baseline may change in a model's modules: classes, rebound forwards, hooks."""
    return [(name, type(m), "forward" in m.__dict__, len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()]


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_is_one_registry_entry_whose_patches_model_flag_tells_the_truth(name):
    entry = BASELINE_REGISTRY[name]
    variant = get_variant(f"{name} 25%")  # the registry makes the variant, with the entry's description
    assert variant.baseline == name and variant.description == entry.description
    assert variant.patches_model == entry.patches_model
    base = SessionSpec(preset="tiny-llava-ov").load()  # a model of its own: the baseline may change it
    before = module_state(base.model)
    options = variant.session_options(base.host)
    assert set(options) - {"stc"} == ({"encoder"} if name == "tome" else {"selector"})
    assert (module_state(base.model) != before) == entry.patches_model
