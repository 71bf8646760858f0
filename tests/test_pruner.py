"""STC-Pruner: scoring functions and the per-stream wrapper, on hand-built tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamtc.baselines.vit import FrameSkipping, UniformTokenDropping
from streamtc.config import CacherConfig, PrunerConfig
from streamtc.errors import ConfigError, InputError, StreamStateError
from streamtc.pruner import Budget, PrunerState, STCPruner, TokenSelector
from streamtc.pruner import functional as PF
from streamtc.variants import Variant

E = torch.eye(8)  # basis vectors e0..e7 of an 8-channel feature space


def frame(*tokens: torch.Tensor) -> torch.Tensor:
    """One frame [1, P, D] from token vectors."""
    return torch.stack(tokens).unsqueeze(0)


def dual(k: int, alpha: float = 0.5, history: int | None = None) -> STCPruner:
    return STCPruner(PrunerConfig(scoring="dual_anchor", tokens_per_frame=k, alpha=alpha, history=history))


def smooth_stream(frames: int, tokens: int = 24, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Slowly drifting random frames, like adjacent video frames."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, dim, generator=g)
    drift = torch.randn(frames, tokens, dim, generator=g).cumsum(0) * 0.3
    return base + drift


# --- budget -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("budget", "num_tokens", "expected"), [
    (Budget(keep_ratio=0.3), 196, 59),        # the paper's combined setting: 196 -> 59
    (Budget(keep_ratio=0.25), 196, 49),       # Pruner alone: 49 of 196
    (Budget(), 196, 59),                      # default share = PrunerConfig's
    (Budget(tokens_per_frame=64), 196, 64),
    (Budget(tokens_per_frame=300), 196, 196),  # larger than P: keep all
    (Budget(keep_ratio=0.01), 16, 1),         # never below one token
])
def test_budget_resolves_count_or_ratio(budget: Budget, num_tokens: int, expected: int) -> None:
    assert budget.resolve(num_tokens) == expected


@pytest.mark.parametrize("kwargs", [
    {"tokens_per_frame": 0}, {"tokens_per_frame": -3}, {"tokens_per_frame": 2.5}, {"keep_ratio": 0.0},
    {"keep_ratio": 1.5}, {"keep_ratio": True}, {"tokens_per_frame": 4, "keep_ratio": 0.5},
])
def test_bad_budget_raises_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        Budget(**kwargs)
    with pytest.raises(ConfigError):
        STCPruner(PrunerConfig(**kwargs))


RATIO_SETTINGS = {  # every setting that is a share in (0, 1], built with the given value
    "CacherConfig.update_ratio": lambda r: CacherConfig(update_ratio=r),
    "CacherConfig.subsample_ratio": lambda r: CacherConfig(subsample_ratio=r),
    "PrunerConfig.keep_ratio": lambda r: PrunerConfig(keep_ratio=r),
    "Budget.keep_ratio": lambda r: Budget(keep_ratio=r),
    "Variant.keep_ratio": lambda r: Variant("v", baseline="uniform", keep_ratio=r),
    "FrameSkipping.rate": FrameSkipping,
    "UniformTokenDropping.keep_ratio": UniformTokenDropping,
}


@pytest.mark.parametrize("setting", sorted(RATIO_SETTINGS))
@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.0001, True, "0.5"])
def test_every_ratio_setting_refuses_values_outside_zero_to_one(setting: str, value: object) -> None:
    with pytest.raises(ConfigError, match=r"must lie in \(0, 1\], got"):
        RATIO_SETTINGS[setting](value)


@pytest.mark.parametrize("setting", sorted(RATIO_SETTINGS))
@pytest.mark.parametrize("value", [1, 1.0, 0.25, 1e-6])
def test_every_ratio_setting_accepts_values_in_zero_to_one(setting: str, value: float) -> None:
    RATIO_SETTINGS[setting](value)


# --- pure functions -----------------------------------------------------------------------------

def test_dual_anchor_scores_match_eq8_on_basis_vectors() -> None:
    # z = e1; cos(z, a_t = e0) = 0 and cos(z, a_s = e1) = 1, so S = alpha * 1 + (1 - alpha) * 0.
    z = E[1].view(1, 1, 8)
    for alpha in (0.0, 0.3, 1.0):
        s = PF.dual_anchor_scores(z, spatial=E[1:2], temporal=E[0:1], alpha=alpha)
        assert s.item() == pytest.approx(alpha)
    # Anchors are compared by direction only.
    s = PF.dual_anchor_scores(z, spatial=3 * E[1:2], temporal=-2 * E[1:2], alpha=0.5)
    assert s.item() == pytest.approx(0.5 * 2.0)


def test_gaussian_kernel_and_squared_distances() -> None:
    assert PF.gaussian_kernel(torch.tensor(0.0)).item() == pytest.approx(5.0)  # five kernels of 1
    expected = sum(torch.exp(torch.tensor(-1.0 / (2 * s))) for s in (0.125, 0.25, 0.5, 1.0, 2.0))
    assert PF.gaussian_kernel(torch.tensor(1.0)).item() == pytest.approx(expected.item())
    x = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])
    anchors = torch.tensor([[[0.0, 0.0], [3.0, 0.0]]])
    assert PF.squared_distances(x, anchors).tolist() == [[[0.0, 9.0], [25.0, 16.0]]]


def test_low_variance_channels_drop_noisy_channels() -> None:
    tokens = torch.zeros(10, 4)
    tokens[:, 1] = torch.linspace(-5, 5, 10)   # high variance
    tokens[:, 3] = torch.linspace(-9, 9, 10)   # highest variance
    tokens[:, 2] = torch.linspace(0, 0.1, 10)  # low
    assert PF.low_variance_channels(tokens).tolist() == [0, 2]  # lowest variance first


def test_windowed_anchors_average_previous_frames_only() -> None:
    previous = torch.tensor([[1.0], [2.0], [3.0]])
    spatial = torch.tensor([[10.0], [20.0]])
    anchors = PF.windowed_temporal_anchors(previous, spatial, window=2)
    assert anchors.flatten().tolist() == [2.5, 6.5]  # mean(2, 3); mean(3, 10)
    first = PF.windowed_temporal_anchors(previous[:0], spatial, window=2)
    assert first.flatten().tolist() == [10.0, 10.0]  # stream start: own anchor, then frame 0


def test_cumulative_anchors_and_running_sum() -> None:
    spatial = torch.tensor([[2.0], [4.0], [9.0]])
    anchors, total = PF.cumulative_temporal_anchors(torch.zeros(1), 0, spatial)
    assert anchors.flatten().tolist() == [2.0, 2.0, 3.0]
    assert total.item() == 15.0


# --- dual_anchor --------------------------------------------------------------------------------

def test_dual_anchor_keeps_tokens_that_changed() -> None:
    g = torch.Generator().manual_seed(1)
    background = E[0] + 0.01 * torch.randn(12, 8, generator=g)
    first = background.unsqueeze(0)
    second = background.clone()
    second[3], second[11] = E[5], E[6]  # two tokens become something new
    pruner = dual(k=2)
    pruner.prune(first)
    assert pruner.prune(second.unsqueeze(0)).indices.tolist() == [[3, 11]]


def test_alpha_trades_temporal_against_spatial_novelty() -> None:
    # The history is all e0. The new frame is mostly e1 (novel in time) plus two e0 tokens
    # (stale in time, novel in the frame). e1 tokens carry distinct small e0 parts, so their
    # temporal novelty is strictly ordered: positions 7 and 6 have the smallest.
    history = frame(*([E[0]] * 8))
    tokens = [E[0], E[0]] + [E[1] + 0.02 * (8 - i) * E[0] for i in range(2, 8)]
    new = frame(*tokens)
    temporal_only, spatial_only = dual(k=2, alpha=1.0), dual(k=2, alpha=0.0)
    for pruner in (temporal_only, spatial_only):
        pruner.prune(history)
    assert temporal_only.prune(new).indices.tolist() == [[6, 7]]
    assert spatial_only.prune(new).indices.tolist() == [[0, 1]]


def test_first_frame_is_scored_on_spatial_novelty_alone() -> None:
    features = smooth_stream(1)
    kept = {alpha: dual(k=6, alpha=alpha).prune(features).indices.tolist() for alpha in (0.0, 0.5, 1.0)}
    assert kept[0.0] == kept[0.5] == kept[1.0]


def test_history_window_limits_the_temporal_anchor() -> None:
    # Frames e0, e0, e1, then a frame of four e0 and four e1 tokens. With W = 1 the anchor is e1
    # (keep the e0 tokens); with W = 3 it is mean(e0, e0, e1), nearer e0 (keep the e1 tokens).
    past = [frame(*([E[0]] * 8)), frame(*([E[0]] * 8)), frame(*([E[1]] * 8))]
    probe = frame(E[0], E[1], E[0], E[1], E[0], E[1], E[0], E[1])
    results = {}
    for window in (1, 3):
        pruner = dual(k=4, alpha=1.0, history=window)
        for f in past:
            pruner.prune(f)
        results[window] = pruner.prune(probe).indices.tolist()
    assert results[1] == [[0, 2, 4, 6]]
    assert results[3] == [[1, 3, 5, 7]]
    assert dual(k=4, alpha=1.0, history=3).state.anchor_window is None


@pytest.mark.parametrize("history", [None, 4])
def test_dual_anchor_is_chunking_invariant(history: int | None) -> None:
    features = smooth_stream(16)
    whole = dual(k=7, history=history).prune(features)
    single = dual(k=7, history=history)
    one_by_one = [single.prune(features[f:f + 1]) for f in range(16)]
    mixed = dual(k=7, history=history)
    chunks = [mixed.prune(c) for c in torch.split(features, [3, 5, 1, 7])]
    assert torch.equal(whole.indices, torch.cat([k.indices for k in one_by_one]))
    assert torch.equal(whole.indices, torch.cat([k.indices for k in chunks]))
    assert torch.equal(whole.tokens, torch.cat([k.tokens for k in one_by_one]))
    assert single.state.frames == 16


# --- gaussian (released scoring) ----------------------------------------------------------------

def released_reference(calls: list[torch.Tensor], k: int) -> list[list[list[int]]]:
    """The released STC_Pruner.compress, restated literally: list memory, channel top-k, top-k lowest."""
    memory, kept = [], []
    for features in calls:
        f, p, d = features.shape
        flat = features.reshape(f * p, d)
        variance = flat.var(dim=0, unbiased=False)
        selected = flat[:, torch.topk(variance, k=int(d * 0.5), largest=False).indices].view(f, p, -1)
        memory.append(selected.mean(dim=(0, 1), keepdim=True))
        memory_mean = torch.mean(torch.cat(memory, dim=0), dim=0)
        x = F.normalize(selected, dim=-1)
        frame_mean = x.mean(dim=1, keepdim=True)
        memory_norm = F.normalize(memory_mean, dim=-1).view(1, 1, -1)

        def g(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            dist = ((a - b) ** 2).sum(-1)
            return sum(torch.exp(-dist / (2 * s)) for s in [2 ** e for e in range(-3, 2)])

        score = g(x, memory_norm) + g(x, frame_mean)
        kept.append([torch.topk(score[i], k=k, largest=False).indices.sort().values.tolist() for i in range(f)])
    return kept


def test_gaussian_matches_released_code_over_several_calls() -> None:
    features = smooth_stream(12, tokens=40, dim=32, seed=3)
    calls = list(torch.split(features, [4, 1, 7]))
    pruner = STCPruner(PrunerConfig(scoring="gaussian", tokens_per_frame=9))
    ours = [pruner.prune(c).indices.tolist() for c in calls]
    assert ours == released_reference(calls, k=9)
    assert pruner.state.memory_calls == 3


def test_gaussian_keeps_the_outlier_of_the_stable_channels() -> None:
    # Channels 0-1 are stable except token 5; channels 2-3 are loud noise, which the released
    # scoring ignores (highest variance). Scored on all channels, the noise would decide.
    g = torch.Generator().manual_seed(0)
    features = torch.zeros(1, 8, 4)
    features[0, :, 0] = 1.0
    features[0, 5] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    features[0, :, 2:] = 10 * torch.randn(8, 2, generator=g)
    kept = STCPruner(PrunerConfig(scoring="gaussian", tokens_per_frame=1)).prune(features)
    assert kept.indices.tolist() == [[5]]


def test_gaussian_is_per_call() -> None:
    # Documented: the released scoring depends on how frames are grouped into calls.
    features = smooth_stream(8, seed=5)
    whole = STCPruner(PrunerConfig(scoring="gaussian", tokens_per_frame=5)).prune(features).indices
    single = STCPruner(PrunerConfig(scoring="gaussian", tokens_per_frame=5))
    one_by_one = torch.cat([single.prune(features[f:f + 1]).indices for f in range(8)])
    assert not torch.equal(whole, one_by_one)


# --- wrapper behaviour --------------------------------------------------------------------------

@pytest.mark.parametrize("scoring", ["gaussian", "dual_anchor"])
def test_kept_tokens_are_in_original_order_and_match_indices(scoring: str) -> None:
    features = smooth_stream(3)
    kept = STCPruner(PrunerConfig(scoring=scoring, keep_ratio=0.25)).prune(features)
    assert kept.tokens.shape == (3, 6, 16) and kept.indices.shape == (3, 6)
    assert torch.all(kept.indices[:, 1:] > kept.indices[:, :-1])
    for f in range(3):
        assert torch.equal(kept.tokens[f], features[f, kept.indices[f]])


def test_budget_above_p_keeps_every_token_and_still_updates_memory() -> None:
    features = smooth_stream(2, tokens=8)
    pruner = dual(k=50)
    kept = pruner.prune(features)
    assert kept.indices.tolist() == [list(range(8))] * 2
    assert torch.equal(kept.tokens, features)
    assert pruner.state.frames == 2 and pruner.state.anchor_sum is not None


def test_low_precision_features_keep_their_dtype() -> None:
    features = smooth_stream(2).to(torch.bfloat16)
    kept = STCPruner(PrunerConfig(scoring="dual_anchor", tokens_per_frame=5)).prune(features)
    assert kept.tokens.dtype == torch.bfloat16
    assert torch.equal(kept.tokens[1], features[1, kept.indices[1]])


@pytest.mark.parametrize("scoring", ["gaussian", "dual_anchor"])
def test_reset_isolates_streams(scoring: str) -> None:
    stream_a, stream_b = smooth_stream(5, seed=1), smooth_stream(5, seed=2)
    fresh = STCPruner(PrunerConfig(scoring=scoring, tokens_per_frame=5))
    expected = [fresh.prune(f[None]).indices for f in stream_b]
    pruner = STCPruner(PrunerConfig(scoring=scoring, tokens_per_frame=5))
    for f in stream_a:
        pruner.prune(f[None])
    leaked = STCPruner(PrunerConfig(scoring=scoring, tokens_per_frame=5))
    for f in stream_a:
        leaked.prune(f[None])
    pruner.reset()
    assert all(torch.equal(pruner.prune(f[None]).indices, e) for f, e in zip(stream_b, expected))
    # Without the reset the memory of stream A changes what stream B keeps.
    assert not all(torch.equal(leaked.prune(f[None]).indices, e) for f, e in zip(stream_b, expected))


def test_one_pruner_serves_interleaved_streams() -> None:
    stream_a, stream_b = smooth_stream(6, seed=1), smooth_stream(6, seed=2)
    separate = {}
    for name, stream in (("a", stream_a), ("b", stream_b)):
        p = dual(k=5)
        separate[name] = torch.cat([p.prune(f[None]).indices for f in stream])
    shared, state_a, state_b = dual(k=5), PrunerState(), PrunerState()
    got = {"a": [], "b": []}
    for fa, fb in zip(stream_a, stream_b):
        with shared.stream(state_a):
            got["a"].append(shared.prune(fa[None]).indices)
        with shared.stream(state_b):
            got["b"].append(shared.prune(fb[None]).indices)
    assert torch.equal(torch.cat(got["a"]), separate["a"])
    assert torch.equal(torch.cat(got["b"]), separate["b"])
    assert shared.state.frames == 0  # the pruner's own stream was untouched
    assert state_a.frames == state_b.frames == 6


def test_pruner_satisfies_the_selector_protocol() -> None:
    assert isinstance(STCPruner(), TokenSelector)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("features", "message"), [
    (torch.randn(196, 896), "rank 3"),
    (torch.randn(1, 2, 196, 896), "rank 3"),
    (torch.randn(0, 196, 8), "at least one"),
    (torch.ones(1, 4, 8, dtype=torch.int64), "floating"),
    (torch.tensor([[[1.0, float("nan")]]]), "NaN or inf"),
    (torch.tensor([[[1.0, float("inf")]]]), "NaN or inf"),
    ([[1.0]], "torch.Tensor"),
])
@pytest.mark.parametrize("scoring", ["gaussian", "dual_anchor"])
def test_bad_features_raise_input_error(features, message: str, scoring: str) -> None:
    pruner = STCPruner(PrunerConfig(scoring=scoring, tokens_per_frame=2))
    with pytest.raises(InputError, match=message):
        pruner.prune(features)
    assert pruner.state == PrunerState()  # a rejected call leaves the stream untouched


@pytest.mark.parametrize("scoring", ["gaussian", "dual_anchor"])
def test_feature_width_change_raises_stream_state_error(scoring: str) -> None:
    pruner = STCPruner(PrunerConfig(scoring=scoring, tokens_per_frame=2))
    pruner.prune(torch.randn(1, 8, 16))
    with pytest.raises(StreamStateError, match="16 channels and now have 32"):
        pruner.prune(torch.randn(1, 8, 32))
    pruner.reset()
    assert pruner.prune(torch.randn(1, 8, 32)).tokens.shape == (1, 2, 32)


def test_state_setter_rejects_other_objects() -> None:
    with pytest.raises(StreamStateError):
        STCPruner().state = {"frames": 0}
