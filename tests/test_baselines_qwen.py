"""ToMe and VisionZip on Qwen2-VL / Qwen2.5-VL: ToMe's matching on the merged tokens (known answers),
VisionZip's attention received from the Qwen tower's own attention (against a plain computation in
the test), and both in Qwen sessions with every kept or merged token at its one-shot M-RoPE position."""

from __future__ import annotations

import pytest
import torch

from streamtc.baselines import ToMeTokenMerger, VisionZipPruner
from streamtc.errors import InputError
from streamtc.session import StreamingSession

from helpers import build_tower, grid_thw, patch_stream, rope
from helpers import QUESTION, push_one_by_one, video_protocol_inputs
from conftest import drifting_frames as make_frames

E = torch.eye(8)


# -- ToMe on merged tokens --------------------------------------------------------------------------


def test_tome_merger_folds_duplicates_into_their_b_token_at_its_position() -> None:
    # Tokens alternate A (even) and B (odd); 0 duplicates 1 and 4 duplicates 5: those two pairs merge,
    # each at its B token's position; 2 and 3 stay.
    features = torch.stack([E[0], E[0], E[1], E[2], E[3], E[3]]).unsqueeze(0)
    kept = ToMeTokenMerger(tokens_per_frame=4).prune(features)
    assert kept.indices.tolist() == [[1, 2, 3, 5]]
    assert torch.equal(kept.tokens[0], torch.stack([E[0], E[1], E[2], E[3]]))
    # size-weighted: a token merged twice counts twice in the next round
    features = torch.stack([E[0], E[0], 3 * E[1], E[0] + E[1], E[2], E[3]]).unsqueeze(0)
    kept = ToMeTokenMerger(tokens_per_frame=3).prune(features)
    # round 1 (r = 3): 0 -> 1, 2 -> 3 (3 E1 is closest to E0 + E1), 4 -> 5; round 2 (r = 0 of 3 needed):
    assert kept.indices.tolist() == [[1, 3, 5]]
    assert torch.allclose(kept.tokens[0, 1], (3 * E[1] + E[0] + E[1]) / 2)


def test_tome_merger_hits_the_budget_with_ascending_positions() -> None:
    features = torch.randn(3, 37, 16, generator=torch.Generator().manual_seed(0))
    for k in (1, 4, 18, 19, 37):
        kept = ToMeTokenMerger(tokens_per_frame=k).prune(features)
        assert kept.indices.shape == (3, k) and torch.all(kept.indices[:, 1:] > kept.indices[:, :-1])
    assert torch.equal(ToMeTokenMerger(tokens_per_frame=37).prune(features).tokens, features)
    # every input token is accounted for: the merged tokens' mass, weighted by size, is the input's
    ones = torch.ones(1, 10, 1)
    assert torch.allclose(ToMeTokenMerger(tokens_per_frame=3).prune(ones).tokens, torch.ones(1, 3, 1))
    with pytest.raises(InputError, match="NaN"):
        ToMeTokenMerger(tokens_per_frame=2).prune(torch.full((1, 4, 2), float("nan")))


# -- VisionZip from the Qwen tower's attention ------------------------------------------------------


def plain_received(tower, pixels, grid, layer: int) -> torch.Tensor:
    """Merged tokens' attention received in block `layer`, [h * w] row-major, by plain algebra: the
    block's input and RoPE rows read by a hook, the token order read from a cell-id embedding."""
    seen = []
    hook = tower.blocks[layer].register_forward_pre_hook(lambda m, a, k: seen.append((a[0], k)), with_kwargs=True)
    with torch.no_grad():
        tower(pixels, grid_thw=grid)
    hook.remove()
    x, kwargs = seen[0]
    block = tower.blocks[layer]
    heads, width = block.attn.num_heads, x.shape[1]
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    h1 = block.norm1(x)
    q, k = ((h1 @ w[i * width:(i + 1) * width].T + b[i * width:(i + 1) * width]).view(-1, heads, width // heads)
            for i in range(2))
    cos, sin = kwargs["position_embeddings"]
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    received = torch.empty(x.shape[0])
    bounds = kwargs["cu_seqlens"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        weights = torch.softmax(torch.einsum("qhd,nhd->hqn", q[start:end], k[start:end]) * block.attn.scaling, -1)
        received[start:end] = weights.mean(dim=(0, 1))
    # which patch (in the processor's merge-block order) sits at each position the blocks see
    ids = []
    embed = tower.patch_embed.register_forward_hook(
        lambda m, a, out: torch.arange(out.shape[0], dtype=out.dtype)[:, None].expand_as(out).clone())
    first = tower.blocks[0].register_forward_pre_hook(lambda m, a: ids.append(a[0][:, 0].round().long()))
    with torch.no_grad():
        tower(pixels, grid_thw=grid)
    embed.remove()
    first.remove()
    merged = torch.zeros(x.shape[0] // 4)
    merged.index_add_(0, ids[0] // 4, received / 4)
    return merged


@pytest.mark.parametrize(("kind", "layer"), [("qwen2-vl", 1), ("qwen2.5-vl", 1)])
def test_visionzip_records_the_qwen_towers_attention_received(kind: str, layer: int) -> None:
    tower = build_tower(kind)
    with torch.no_grad():  # sharper attention than a random init gives, so scores differ
        for block in tower.blocks:
            block.attn.qkv.weight.normal_(0.0, 0.3)
    pixels = patch_stream(1)[0]
    pruner = VisionZipPruner(tokens_per_frame=5).attach(tower)
    with torch.no_grad():
        tower(pixels, grid_thw=grid_thw(1))
    recorded = pruner._recorded
    pruner.detach()
    # default block: the penultimate (Qwen2-VL); the last full-attention block before the final one
    # (Qwen2.5-VL's test tower: block 1 of 3)
    want = plain_received(tower, pixels, grid_thw(1), layer)
    assert recorded.shape == (1, 30)
    torch.testing.assert_close(recorded[0], want, atol=1e-6, rtol=1e-5)
    assert want.std() / want.mean() > 0.05  # scores do differ


# -- both in Qwen sessions: tokens at their one-shot positions --------------------------------------


@pytest.mark.parametrize("preset", ["qwen2-vl-tiny", "qwen2.5-vl-tiny"])
@pytest.mark.parametrize("name", ["tome", "visionzip"])
def test_baselines_place_their_tokens_at_one_shot_positions(preset: str, name: str) -> None:
    frames = make_frames(8)
    base = StreamingSession.from_preset(preset, stc=None)
    selector = ToMeTokenMerger(keep_ratio=0.5) if name == "tome" else VisionZipPruner(keep_ratio=0.5).attach(base.model)
    session = StreamingSession(base.model, base.tokenizer, None, selector=selector, preprocessor=base.preprocessor,
                               prefill_min_tokens=1)
    calls, kept = [], []
    forward, select = session.host.forward, session.selector.prune
    session.host.forward = lambda embeds, positions, cache: calls.append((embeds, positions)) or forward(
        embeds, positions, cache)
    session.selector.prune = lambda features: kept.append(select(features)) or kept[-1]
    push_one_by_one(session, frames)
    got_positions = torch.cat([p for _, p in calls], dim=1)
    got_tokens = torch.cat([e[0] for e, _ in calls])
    assert torch.equal(got_tokens, torch.cat([k.tokens[0] for k in kept]))
    assert session.stats.visual_tokens == 4 * 3 < session.stats.visual_tokens_encoded == 4 * 6

    inputs = video_protocol_inputs(session, [frames], QUESTION)
    rope_inputs = {k: inputs[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in inputs}
    full = session.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], **rope_inputs)[0][:, 0]
    video = (inputs["input_ids"][0] == session.model.config.video_token_id).nonzero()[:, 0]
    index = torch.cat([patch * 6 + k.indices[0] for patch, k in enumerate(kept)])
    assert torch.equal(got_positions, full[:, video[index]])
    if name == "visionzip":
        selector.detach()
