"""Qwen3-VL host on the tiny preset: the incremental session equals transformers' own one-shot
forward (prompt expanded by transformers' `Qwen3VLProcessor.replace_video_token`, timestamps
included); a pruned stream keeps every kept token's one-shot M-RoPE position and the same rows of
every DeepStack level, and its question logits equal a one-shot forward of the kept tokens with
their DeepStack features; the Cacher feeds the DeepStack taps; preprocessing matches transformers'
Qwen3-VL functions that run without torchvision; checkpoints load."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize
from transformers.video_utils import VideoMetadata

from streamtc import CacherConfig, PrunerConfig, STCConfig
from streamtc.hosts import Qwen3VLHost
from streamtc.hosts.qwen3_vl import patch_times
from streamtc.hosts.qwen_preprocess import QWEN3_VL_VIDEO_MAX_PIXELS, QWEN3_VL_VIDEO_MIN_PIXELS, patchify_video
from streamtc.presets import PRESETS, build_config
from streamtc.session import StreamingSession
from streamtc.presets.tokenizer import save_processor

from exactness import max_question_diff

TOLERANCE = 1e-6  # float32 noise is about 1e-7; a position off by one moves logits by about 1e-4
QUESTION = "What is the man holding?"
FPS = 2.0
PRESET = "qwen3-vl-tiny"


def push_one_by_one(session: StreamingSession, frames: np.ndarray, first: int = 0) -> None:
    for i, frame in enumerate(frames):
        session.push(frame[None], [(first + i) / FPS])


def video_placeholder(grid: tuple[int, int, int], frames: int, first: int = 0) -> str:
    """transformers' own expansion of one <|video_pad|> (Qwen3VLProcessor.replace_video_token, on a
    stand-in processor object), for `frames` frames sampled at FPS from frame index `first`."""
    processor = SimpleNamespace(
        video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>", video_token="<|video_pad|>",
        _calculate_timestamps=lambda *args: Qwen3VLProcessor._calculate_timestamps(None, *args))
    metadata = VideoMetadata(total_num_frames=first + frames, fps=FPS,
                             frames_indices=list(range(first, first + frames)))
    inputs = {"video_grid_thw": torch.tensor([grid]), "video_metadata": [metadata]}
    return Qwen3VLProcessor.replace_video_token(processor, inputs, 0)


def one_shot_inputs(session: StreamingSession, frames: np.ndarray | list[np.ndarray], question: str
                    ) -> dict[str, torch.Tensor]:
    """The chat prompt with the videos (one array, or a list of consecutive clips of the stream),
    expanded as transformers' Qwen3-VL processor does, their pixels (patchified as the video
    processor does), video_grid_thw and mm_token_type_ids."""
    videos = frames if isinstance(frames, list) else [frames]
    messages = [{"role": "system", "content": [{"type": "text", "text": session.system_prompt}]},
                {"role": "user", "content": [{"type": "video"} for _ in videos] + [{"type": "text", "text": question}]}]
    text = session.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts, rows, grids, first = text.split("<|video_pad|>"), [], [], 0
    expanded = parts[0]
    for video, part in zip(videos, parts[1:]):
        pixels, grid = patchify_video(torch.stack(session.preprocessor(video)), 16, 2, 2)
        rows.append(pixels)
        grids.append(grid)
        expanded += video_placeholder(grid, len(video), first) + part
        first += len(video)
    ids = torch.tensor([session.tokenizer(expanded, add_special_tokens=False)["input_ids"]])
    video_token = session.model.config.video_token_id
    return {"input_ids": ids, "pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids),
            "mm_token_type_ids": (ids == video_token).int() * 2}


def one_shot_logits(session: StreamingSession, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [L, V] at every position of the model's own forward (rope_deltas cleared first)."""
    session.model.model.rope_deltas = None
    with torch.inference_mode():
        return session.model(**inputs).logits[0].float()


@pytest.fixture(scope="module")
def frames(make_frames) -> np.ndarray:
    return make_frames(10)


@pytest.fixture(scope="module")
def baseline() -> StreamingSession:
    return StreamingSession.from_preset(PRESET, stc=None)


# -- exactness, STC off ---------------------------------------------------------------------------


def test_the_stream_equals_transformers_one_shot_forward(baseline: StreamingSession, frames: np.ndarray) -> None:
    baseline.reset()
    push_one_by_one(baseline, frames[:5])  # frame 5 waits for its pair
    assert baseline.stats.chunks == 2 and baseline.stats.visual_tokens == 2 * 12
    expected = one_shot_logits(baseline, one_shot_inputs(baseline, frames[:4], QUESTION))
    assert max_question_diff(baseline, QUESTION, expected) <= TOLERANCE  # every question token
    baseline.push(frames[5:8], [i / FPS for i in range(5, 8)])
    inputs = one_shot_inputs(baseline, frames[:8], "And now?")
    text = baseline.tokenizer.decode(inputs["input_ids"][0])
    assert "<|vision_start|><0.2 seconds><|vision_start|>" in text and "<3.2 seconds>" in text  # mean of 2 frames
    expected = one_shot_logits(baseline, inputs)
    assert max_question_diff(baseline, "And now?", expected) <= TOLERANCE
    # sensitive: the same prompt with the last patch's time label changed differs
    shifted = dict(inputs, input_ids=baseline.tokenizer(text.replace("<3.2 seconds>", "<9.2 seconds>"),
                                                        add_special_tokens=False, return_tensors="pt")["input_ids"])
    assert shifted["input_ids"].shape == inputs["input_ids"].shape
    assert (one_shot_logits(baseline, shifted)[-1] - expected[-1]).abs().max().item() > 100 * TOLERANCE


def test_frame_size_change_opens_a_second_video(frames: np.ndarray, make_frames) -> None:
    """Frame 2 (unpaired) closes the first video's last patch, repeated as the processor pads it;
    the larger frames open a second video in the same turn, time labels continuing the stream's."""
    session = StreamingSession.from_preset(PRESET, stc=None)
    large = make_frames(2, seed=1, size=(60, 160))
    push_one_by_one(session, frames[:3])
    push_one_by_one(session, large, first=3)
    assert session.stats.frames == 5 and session.stats.chunks == 3
    inputs = one_shot_inputs(session, [frames[:3], large], QUESTION)
    assert inputs["video_grid_thw"].tolist() == [[2, 6, 8], [1, 4, 10]]
    assert "<1.0 seconds>" in session.tokenizer.decode(inputs["input_ids"][0])  # the repeated frame's own time
    assert max_question_diff(session, QUESTION, one_shot_logits(session, inputs)) <= TOLERANCE


def test_patch_times_are_the_processors() -> None:
    for count in range(1, 9):
        indices = [3 * i + 1 for i in range(count)]
        expected = Qwen3VLProcessor._calculate_timestamps(None, list(indices), 3.0, 2)
        assert patch_times([i / 3.0 for i in indices]) == pytest.approx(expected, abs=1e-12)


# -- DeepStack under the Pruner -------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["dual_anchor", "gaussian"])
def test_pruned_stream_equals_a_one_shot_forward_of_the_kept_tokens(scoring: str, frames: np.ndarray) -> None:
    stc = STCConfig(cacher=None, pruner=PrunerConfig(scoring=scoring, keep_ratio=0.5))
    session = StreamingSession.from_preset(PRESET, stc=stc, prefill_min_tokens=1)
    calls, kept = [], []
    forward, select = session.host.forward, session.pruner.prune
    session.host.forward = lambda embeds, positions, cache, deepstack=None: calls.append(
        (positions, deepstack)) or forward(embeds, positions, cache, deepstack)
    session.pruner.prune = lambda features: kept.append(select(features)) or kept[-1]
    session.reset()  # the chat prefix is pre-filled through the wrapper too
    push_one_by_one(session, frames[:8])

    inputs = one_shot_inputs(session, frames[:8], QUESTION)
    model, ids = session.model, inputs["input_ids"][0]
    video_rows = (ids == model.config.video_token_id).nonzero()[:, 0]
    per_patch = len(video_rows) // 4
    kept_rows = torch.cat([k * per_patch + kt.indices[0] for k, kt in enumerate(kept)])
    assert 0 < len(kept_rows) < len(video_rows)  # something was pruned
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[video_rows] = False
    keep[video_rows[kept_rows]] = True
    full = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                      video_grid_thw=inputs["video_grid_thw"])[0][:, 0]
    # every streamed token (prompt, time labels, kept visual tokens) sits at its one-shot position
    streamed = torch.cat([p for p, _ in calls], dim=1)
    assert torch.equal(streamed, full[:, keep][:, : streamed.shape[1]])
    streamed_visual = torch.cat([d.visual for _, d in calls if d is not None])
    assert int(streamed_visual.sum()) == len(kept_rows)

    # one-shot: the kept tokens' features and DeepStack rows, from one tower call on all 8 frames
    with torch.inference_mode():
        video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[video_rows[kept_rows]] = video.pooler_output[0][kept_rows]
        deepstack = [level[0][kept_rows] for level in video.deepstack_features]
        visual = (ids == model.config.video_token_id)[keep]

        def logits(with_deepstack: bool) -> torch.Tensor:
            extra = {"visual_pos_masks": visual[None], "deepstack_visual_embeds": deepstack} if with_deepstack else {}
            hidden = model.model.language_model(inputs_embeds=embeds[keep][None], position_ids=full[:, None, keep],
                                                **extra).last_hidden_state
            return model.lm_head(hidden[0]).float()

        expected = logits(True)
    assert len(deepstack) == 3
    assert max_question_diff(session, QUESTION, expected) <= TOLERANCE
    assert (logits(False) - expected).abs().max().item() > 100 * TOLERANCE  # DeepStack matters here


# -- the Cacher feeds the DeepStack taps ---------------------------------------------------------


def test_cacher_session_feeds_deepstack_taps(baseline: StreamingSession, frames: np.ndarray) -> None:
    baseline.reset()
    baseline.push(frames[:6])
    exact = baseline.next_token_logits(QUESTION)
    # every chunk a refresh chunk: the Cacher's forward is the exact one, taps included
    refresh_all = STCConfig(cacher=CacherConfig(cache_interval=1), pruner=None)
    with StreamingSession(baseline.model, baseline.tokenizer, refresh_all,
                          preprocessor=baseline.preprocessor) as refreshing:
        refreshing.push(frames[:6])
        assert refreshing.stats.cacher["refresh_chunks"] == 3
        assert (refreshing.next_token_logits(QUESTION) - exact).abs().max().item() <= TOLERANCE
    # reuse: non-refresh chunks hand the LLM the cached tower's DeepStack features
    taps = []
    stc = STCConfig(cacher=CacherConfig(cache_interval=4, update_ratio=0.25), pruner=None)
    with StreamingSession(baseline.model, baseline.tokenizer, stc, preprocessor=baseline.preprocessor,
                          prefill_min_tokens=1) as cached:
        forward = cached.host.forward
        cached.host.forward = lambda e, p, c, deepstack=None: taps.append(deepstack) or forward(e, p, c, deepstack)
        cached.push(frames[:6])
        assert cached.stats.cacher["chunks"] == 3 and cached.stats.cacher["refresh_chunks"] == 1
        logits = cached.next_token_logits(QUESTION)
    exact_taps = []
    forward = baseline.host.forward
    baseline.host.forward = lambda e, p, c, deepstack=None: exact_taps.append(deepstack) or forward(e, p, c, deepstack)
    try:
        baseline.prefill_min_tokens = 1
        baseline.reset()
        baseline.push(frames[:6])
    finally:
        baseline.host.forward, baseline.prefill_min_tokens = forward, None
    taps = [t for t in taps if t is not None]
    exact_taps = [t for t in exact_taps if t is not None]
    assert len(taps) == len(exact_taps) == 3
    assert torch.allclose(taps[0].features, exact_taps[0].features, atol=1e-6)  # the refresh chunk
    assert all((t.features - e.features).abs().max() > 1e-4 for t, e in zip(taps[1:], exact_taps[1:]))
    assert logits.isfinite().all() and (logits - exact).abs().max().item() > TOLERANCE


# -- preprocessing --------------------------------------------------------------------------------


def test_frame_sizes_equal_transformers_qwen3_smart_resize() -> None:
    host_pre = StreamingSession.from_preset(PRESET, stc=None).host.default_preprocessor()
    assert (host_pre.min_pixels, host_pre.max_pixels) == (QWEN3_VL_VIDEO_MIN_PIXELS, QWEN3_VL_VIDEO_MAX_PIXELS)
    assert host_pre.patch_size == 16 and host_pre.image_mean == (0.5, 0.5, 0.5)
    for height in (8, 20, 31, 60, 144, 272, 480, 720, 1080, 2160):
        for width in (12, 30, 80, 176, 640, 1280, 1920, 3840):
            if max(height, width) / min(height, width) < 100:
                ours = host_pre.frame_size(height, width)
                # one temporal patch of two frames under doubled bounds = one frame under ours
                assert ours == hf_smart_resize(2, height, width, 2, 32, 2 * host_pre.min_pixels,
                                               2 * host_pre.max_pixels), (height, width)


def test_patches_equal_the_video_processors_patchify(frames: np.ndarray) -> None:
    pre = PRESETS[PRESET].preprocessor()
    pixels = torch.stack(pre(frames[:5]))  # odd: the last frame is repeated
    ours, grid = patchify_video(pixels, 16, 2, 2)
    theirs, t, h, w = Qwen3VLVideoProcessor().patchify(pixels[None], patch_size=16, merge_size=2, temporal_patch_size=2)
    assert grid == (t, h, w) == (3, 6, 8)
    assert torch.equal(ours, theirs[0])


# -- loading, presets, tools ----------------------------------------------------------------------


def test_presets_mirror_the_checkpoints() -> None:
    small, large = build_config("qwen3-vl-4b"), build_config("qwen3-vl-8b")
    assert small.vision_config.deepstack_visual_indexes == [5, 11, 17] and small.vision_config.out_hidden_size == 2560
    assert large.vision_config.deepstack_visual_indexes == [8, 16, 24] and large.text_config.intermediate_size == 12288
    assert build_config("qwen3-vl-8b", num_layers=12).vision_config.deepstack_visual_indexes == [8]
    assert 8.7e9 < PRESETS["qwen3-vl-8b"].parameter_count() < 8.8e9


def test_from_pretrained_loads_a_saved_checkpoint(tmp_path, frames: np.ndarray) -> None:
    preset = StreamingSession.from_preset(PRESET, stc=None)
    preset.model.save_pretrained(tmp_path)
    save_processor(preset.model.config, tmp_path)
    loaded = StreamingSession.from_pretrained(tmp_path, stc=None)
    assert isinstance(loaded.host, Qwen3VLHost) and isinstance(loaded.model, Qwen3VLForConditionalGeneration)
    pre = loaded.preprocessor
    assert (pre.min_pixels, pre.max_pixels, pre.patch_size, pre.image_mean) == (
        QWEN3_VL_VIDEO_MIN_PIXELS, QWEN3_VL_VIDEO_MAX_PIXELS, 16, (0.5, 0.5, 0.5))
    loaded.push(frames[:4], [0.0, 0.5, 1.0, 1.5])
    inputs = one_shot_inputs(loaded, frames[:4], QUESTION)
    assert max_question_diff(loaded, QUESTION, one_shot_logits(loaded, inputs)) <= TOLERANCE


def test_run_bench_and_eval_run_on_the_preset(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from streamtc.bench.pipeline import PipelineSettings, load_video_frames, run_pipeline_benchmark
    from streamtc.variants import VARIANTS as VARIANTS_BY_NAME
    from streamtc.cli import app
    from streamtc.factory import SessionSpec as ModelSpec

    out = tmp_path / "run.json"
    result = CliRunner().invoke(app, ["run", "demo", "--preset", PRESET, "--compare", "--max-seconds", "2",
                                      "--ask", "1.5:What is happening?", "--max-new-tokens", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    base, stc = report["stats"]["no STC"], report["stats"]["STC"]
    assert stc["visual_tokens"] < base["visual_tokens"] == base["visual_tokens_encoded"]
    assert stc["cacher"]["chunks"] == base["chunks"] > 0

    variants = [VARIANTS_BY_NAME[name] for name in ("none", "stc")]
    settings = PipelineSettings(preset=PRESET, frames=(4,), repeats=1, warmup_frames=0, max_new_tokens=1)
    rows = {row["variant"]: row for row in run_pipeline_benchmark(settings, variants,
                                                                    frames=load_video_frames("demo", 4))["rows"]}
    assert rows["stc"]["visual_tokens"] < rows["none"]["visual_tokens"]

    session = ModelSpec(preset=PRESET, stc=STCConfig().to_dict()).build()
    assert isinstance(session.host, Qwen3VLHost) and session.stc.cacher is not None
