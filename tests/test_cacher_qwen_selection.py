"""What a non-refresh Qwen block selects: whole 2x2 merge blocks (granularity="merge_block") against the
plain implementation of tests/test_cacher_qwen.py, and the per-layer record of the recomputed tokens
(`STCCacher.last_recomputed`) against the sets that implementation chose."""

from __future__ import annotations

import pytest
import torch

from streamtc.cacher import STCCacher
from streamtc.cacher import functional as F
from streamtc.config import CacherConfig
from streamtc.errors import ConfigError, UnsupportedModelError
from streamtc.presets import build_model

from helpers import TOWERS, assert_close_rel, build_tower, encode, hidden, patch_stream, plain_stream


def test_grouped_selection_picks_the_least_similar_blocks() -> None:
    similarity = torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5]])
    # block means: 0.9, 0.7, 0.5 -> k = 5 tokens selects one block, the least similar on average
    assert sorted(F.select_dynamic_tokens(similarity, 5, group=4)[0].tolist()) == [8, 9, 10, 11]
    assert sorted(F.select_dynamic_tokens(similarity, 1, group=4)[0].tolist()) == [8, 9, 10, 11]  # at least one
    assert sorted(F.select_dynamic_tokens(similarity, 8, group=4)[0].tolist()) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(F.select_dynamic_tokens(similarity, 1)[0].tolist()) == [4]  # per token, the single outlier
    assert [F.grouped_count(k, 4) for k in (1, 4, 7, 8, 30)] == [4, 4, 4, 8, 28]


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_merge_block_selection_matches_the_plain_implementation(kind, attn) -> None:
    tower = build_tower(kind, attn)
    chunks = patch_stream(4)
    chunks.insert(2, torch.cat(patch_stream(2, seed=2)))  # a non-refresh chunk of two temporal patches
    chosen: dict = {}
    want, _ = plain_stream(tower, chunks, interval=3, ratio=0.25, group=4, record=chosen)
    cacher = STCCacher(CacherConfig(cache_interval=3, update_ratio=0.25, granularity="merge_block")).attach(tower)
    got, records = [], []
    for chunk in chunks:
        got.extend(encode(tower, [chunk]))
        records.append(cacher.last_recomputed())
    cacher.detach()
    assert_close_rel(hidden(got), want, 1e-5)
    tokens = 120  # 12 x 10 patches: 30 merge blocks; r = 0.25 -> 30 tokens -> 7 blocks = 28 tokens
    assert cacher.stats.recomputed_tokens_per_layer == [2 * tokens + 4 * 28] * len(tower.blocks)  # chunks 0 and 3 refresh
    for c, record in enumerate(records):
        if c % 3 == 0:
            assert record is None  # a refresh: every token
            continue
        assert record.shape == (len(tower.blocks), len(chosen[c][0]), 28)
        for layer, per_unit in chosen[c].items():
            assert [set(r.tolist()) for r in record[layer]] == per_unit
            for unit in record[layer]:  # whole merge blocks: 4 consecutive tokens, block-aligned
                blocks = unit.view(-1, 4)
                assert torch.equal(blocks.sort(dim=1).values, blocks[:, :1].sort(dim=1).values + torch.arange(4))
                assert torch.all(blocks.min(dim=1).values % 4 == 0)
    token_level = STCCacher(CacherConfig(cache_interval=3, update_ratio=0.25)).attach(tower)
    assert not torch.allclose(hidden(encode(tower, chunks)), want, atol=1e-4)  # the granularity does matter
    token_level.detach()


@pytest.mark.parametrize("kind", TOWERS)
def test_the_record_holds_each_layers_own_token_selection(kind) -> None:
    tower = build_tower(kind)
    chunks = patch_stream(3)
    chosen: dict = {}
    plain_stream(tower, chunks, interval=3, ratio=0.25, record=chosen)
    cacher = STCCacher(CacherConfig(cache_interval=3, update_ratio=0.25)).attach(tower)
    state = cacher.new_state()
    with cacher.stream(state):
        encode(tower, chunks[:2])
    assert cacher.last_recomputed() is None  # the default state ran nothing
    record = cacher.last_recomputed(state)
    assert record.shape == (len(tower.blocks), 1, 30)
    assert [set(layer[0].tolist()) for layer in record] == [chosen[1][i][0] for i in range(len(tower.blocks))]
    assert len({tuple(sorted(layer[0].tolist())) for layer in record}) > 1  # layers select differently
    state.reset()
    assert cacher.last_recomputed(state) is None
    cacher.detach()


def test_merge_block_granularity_needs_a_qwen_tower() -> None:
    with pytest.raises(UnsupportedModelError, match="granularity='token'"):
        STCCacher(CacherConfig(granularity="merge_block")).attach(build_model("tiny-siglip"))
    with pytest.raises(ConfigError, match="granularity"):
        CacherConfig(granularity="window")
