"""Which visual tokens each host hands its LLM under the Pruner, checked against transformers' own
video features: for LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and Qwen3-VL, the visual rows a stream
pre-fills are, in order, the rows of the model's one-shot `get_video_features` output at the
indices the Pruner kept (a host that placed other tokens, e.g. each frame's first k, fails here).
For LLaVA-OneVision the question's logits also equal a one-shot forward of exactly those tokens
at consecutive 1-D positions (the Qwen hosts' positions and logits: tests/test_qwen_vl.py and
tests/test_qwen3_vl.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtc import PrunerConfig, STCConfig
from streamtc.hosts.qwen_preprocess import patchify_video
from streamtc.prompts import split_video_prompt
from streamtc.session import StreamingSession

QUESTION = "What is the man holding?"
FEATURE_TOLERANCE = 1e-5  # one tower call per chunk against one call on the whole clip
TOLERANCE = 1e-6
HOSTS = ["tiny-llava-ov", "qwen2-vl-tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny"]


def recording_session(preset: str) -> tuple[StreamingSession, list, list]:
    """A Pruner-only session (half the tokens kept) whose LLM pre-fills and Pruner results are recorded."""
    session = StreamingSession.from_preset(preset, stc=STCConfig(cacher=None, pruner=PrunerConfig(keep_ratio=0.5)),
                                           prefill_min_tokens=1)
    calls, kept = [], []
    forward, select = session.host.forward, session.pruner.prune

    def record_forward(embeds, positions, cache, deepstack=None):
        calls.append((embeds[0], positions, deepstack))
        return forward(embeds, positions, cache, deepstack)

    session.host.forward = record_forward
    session.pruner.prune = lambda features: kept.append(select(features)) or kept[-1]
    return session, calls, kept


def hf_video_rows(session: StreamingSession, frames: np.ndarray) -> torch.Tensor:
    """transformers' own video features of the whole clip, one row per pruner frame [steps, P, D]:
    LLaVA-OneVision's pooled frame tokens (the trailing newline dropped), or a Qwen model's merged
    tokens of each temporal patch."""
    model = session.model
    with torch.inference_mode():
        if session.host.frames_per_step == 1:
            pixels = session.preprocessor(frames)[None]
            rows = model.model.get_video_features(pixel_values_videos=pixels, return_dict=True).pooler_output[0]
            return rows[:-1].reshape(len(frames), -1, rows.shape[-1])
        vision = model.config.vision_config
        pixels, grid = patchify_video(torch.stack(session.preprocessor(frames)), vision.patch_size,
                                      vision.temporal_patch_size, vision.spatial_merge_size)
        rows = model.model.get_video_features(pixels, torch.tensor([grid])).pooler_output[0]
        return rows.reshape(grid[0], -1, rows.shape[-1])


def placed_visual_rows(calls: list) -> torch.Tensor:
    """The visual rows of every frame pre-fill, in order (Qwen3-VL's pieces carry time labels and
    vision start / end text, marked by their DeepStack mask; the other hosts' pieces are all visual)."""
    rows = [embeds if deepstack is None else embeds[deepstack.visual] for embeds, _, deepstack in calls]
    return torch.cat(rows)


@pytest.mark.parametrize("preset", HOSTS)
def test_each_host_places_the_tokens_the_pruner_kept(preset: str, make_frames) -> None:
    session, calls, kept = recording_session(preset)
    frames = make_frames(8)
    for i, frame in enumerate(frames):
        session.push(frame[None], [i / 2])
    reference = hf_video_rows(session, frames)  # [steps, P, D]
    kept_rows = [(indices, count) for k in kept for indices, count in zip(k.indices, k.frame_counts())]
    assert len(kept_rows) == reference.shape[0]
    expected = torch.cat([reference[step, indices[:count]] for step, (indices, count) in enumerate(kept_rows)])
    assert len(expected) < reference.shape[0] * reference.shape[1]  # the Pruner dropped tokens
    got = placed_visual_rows(calls)
    scale = expected.abs().max().item()
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= FEATURE_TOLERANCE * scale
    # the check is sensitive: each frame's first k tokens are other tokens
    first = torch.cat([reference[step, :count] for step, (_, count) in enumerate(kept_rows)])
    assert (first - expected).abs().max().item() > 100 * FEATURE_TOLERANCE * scale
    session.close()


def test_llava_onevision_question_equals_a_one_shot_forward_of_the_kept_tokens(make_frames) -> None:
    """The kept tokens at consecutive positions after the chat prefix, then the newline and the
    question: the model's own LLM forward on that sequence gives the stream's question logits."""
    session, calls, kept = recording_session("tiny-llava-ov")
    frames = make_frames(6)
    for frame in frames:
        session.push(frame[None])
    reference = hf_video_rows(session, frames)
    tokens = torch.cat([reference[f, k.indices[0, : k.frame_counts()[0]]] for f, k in enumerate(kept)])
    model, tokenizer = session.model, session.tokenizer
    prompt = split_video_prompt(tokenizer, QUESTION, session.system_prompt)
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        prefix = embed(torch.tensor(tokenizer(prompt.prefix, add_special_tokens=False)["input_ids"]))
        suffix = embed(torch.tensor(tokenizer(prompt.suffix, add_special_tokens=False)["input_ids"]))
        newline = model.model.image_newline[None]
        embeds = torch.cat([prefix, tokens, newline, suffix])
        hidden = model.model.language_model(inputs_embeds=embeds[None]).last_hidden_state
        expected = model.lm_head(hidden[0, -1]).float()
    positions = torch.cat([p for _, p, _ in calls], dim=1)[0]
    assert torch.equal(positions, torch.arange(len(prefix), len(prefix) + len(tokens)))
    assert (session.next_token_logits(QUESTION) - expected).abs().max().item() <= TOLERANCE
    session.close()
