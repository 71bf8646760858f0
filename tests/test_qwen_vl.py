"""Qwen2-VL / Qwen2.5-VL hosts on tiny presets: incremental sessions equal transformers' own one-shot
forward (both prompt protocols), kept tokens keep their one-shot M-RoPE positions under the Pruner,
streams are isolated (rope_deltas included), bad inputs raise typed errors, checkpoints load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from streamtc import PrunerConfig, STCConfig
from streamtc.errors import ConfigError, InputError, UnsupportedModelError
from streamtc.hosts import QwenVLHost
from streamtc.presets import build_model
from streamtc.prompts import split_video_prompt
from streamtc.session import StreamingSession
from streamtc.presets.tokenizer import save_processor
from helpers import FPS, QUESTION, TOLERANCE, expand_videos, push_one_by_one, video_protocol_inputs
from exactness import max_question_diff


PRESETS = ["qwen2-vl-tiny", "qwen2.5-vl-tiny"]
PRUNER = STCConfig(cacher=None, pruner=PrunerConfig(keep_ratio=0.5))
def stamps(first: int, count: int) -> list[float]:
    return [(first + i) / FPS for i in range(count)]


def one_shot_logits(session: StreamingSession, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [L, V] at every position of the model's own forward (positions from its
    get_rope_index); the model's rope_deltas is cleared first, as a fresh `generate` would."""
    session.model.model.rope_deltas = None
    with torch.inference_mode():
        return session.model(**inputs).logits[0].float()


def livecc_inputs(session: StreamingSession, frames: np.ndarray, question: str) -> dict:
    """LiveCC's conversation: a user turn 'Time=t0-t1s' + clip for 6 frames, then for every 2 frames,
    then the question's user turn and the generation prompt."""
    chunks = [frames[:6]] + [frames[i : i + 2] for i in range(6, len(frames), 2)]
    messages = [{"role": "system", "content": [{"type": "text", "text": session.system_prompt}]}]
    start = 0
    for chunk in chunks:
        label = f"Time={start / FPS:.1f}-{(start + len(chunk)) / FPS:.1f}s"
        messages.append({"role": "user", "content": [{"type": "text", "text": label}, {"type": "video"}]})
        start += len(chunk)
    messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
    text = session.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return expand_videos(session, text, chunks)


@pytest.fixture(scope="module")
def frames(make_frames) -> np.ndarray:
    return make_frames(10)


@pytest.fixture(scope="module", params=PRESETS)
def baseline(request) -> StreamingSession:
    return StreamingSession.from_preset(request.param, stc=None)


# -- exactness, STC off ---------------------------------------------------------------------------


def test_video_protocol_matches_the_one_shot_forward(baseline: StreamingSession, frames: np.ndarray) -> None:
    baseline.reset()
    push_one_by_one(baseline, frames[:5])  # frame 5 waits for its pair
    assert baseline.stats.frames == 4 and baseline.stats.chunks == 2
    expected = one_shot_logits(baseline, video_protocol_inputs(baseline, [frames[:4]], QUESTION))
    assert max_question_diff(baseline, QUESTION, expected) <= TOLERANCE  # every question token
    baseline.push(frames[5:8], stamps(5, 3))
    expected = one_shot_logits(baseline, video_protocol_inputs(baseline, [frames[:8]], "And now?"))
    assert max_question_diff(baseline, "And now?", expected) <= TOLERANCE
    # the check is sensitive: the same frames without the last temporal patch differ
    shorter = one_shot_logits(baseline, video_protocol_inputs(baseline, [frames[:6]], "And now?"))
    assert (shorter[-1] - expected[-1]).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("preset", ["livecc-tiny", "qwen2.5-vl-tiny"])
def test_livecc_protocol_matches_the_one_shot_conversation(preset: str, frames: np.ndarray) -> None:
    session = StreamingSession.from_preset(preset, stc=None, protocol="livecc")
    push_one_by_one(session, frames[:5])
    assert session.stats.chunks == 0  # LiveCC's first turn holds 6 frames
    push_one_by_one(session, frames[5:10], first=5)
    assert session.stats.chunks == 3 and session.stats.frames == 10
    expected = one_shot_logits(session, livecc_inputs(session, frames[:10], QUESTION))
    assert max_question_diff(session, QUESTION, expected) <= TOLERANCE
    answer = session.ask(QUESTION, max_new_tokens=2)
    assert answer.token_ids[:1] in ([int(expected[-1].argmax())], [])
    assert session.cache.get_seq_length() == session.stats.cache_tokens  # turns counted as prompt text


def test_frame_size_change_starts_a_new_video_with_right_positions(frames: np.ndarray, make_frames) -> None:
    """A size change closes the current temporal patch (its unpaired frame repeated, as the processor
    pads) and opens a second video in the same turn: equal to the one-shot prompt with two videos."""
    session = StreamingSession.from_preset("qwen2-vl-tiny", stc=None)
    large = make_frames(3, seed=1, size=(90, 120))
    push_one_by_one(session, frames[:3])
    push_one_by_one(session, large, first=3)  # frame 3 of the first size closes its patch
    assert session.stats.frames == 5  # 3 + 2; the last large frame waits for its pair
    inputs = video_protocol_inputs(session, [frames[:3], large[:2]], QUESTION)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6], [1, 6, 8]]
    assert max_question_diff(session, QUESTION, one_shot_logits(session, inputs)) <= TOLERANCE


# -- Pruner: positions and logits -----------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("scoring", ["dual_anchor", "gaussian"])
def test_kept_tokens_keep_their_one_shot_positions(preset: str, scoring: str, frames: np.ndarray) -> None:
    stc = STCConfig(cacher=None, pruner=PrunerConfig(scoring=scoring, keep_ratio=0.5))
    session = StreamingSession.from_preset(preset, stc=stc, prefill_min_tokens=1)
    calls, kept = [], []
    forward, select = session.host.forward, session.pruner.prune
    session.host.forward = lambda embeds, positions, cache: calls.append((embeds, positions)) or forward(
        embeds, positions, cache)
    session.pruner.prune = lambda features: kept.append(select(features)) or kept[-1]
    push_one_by_one(session, frames[:8])  # the chat prefix was pre-filled before the wrappers
    got_positions = torch.cat([p for _, p in calls], dim=1)
    got_tokens = torch.cat([e[0] for e, _ in calls])
    inputs = video_protocol_inputs(session, [frames[:8]], QUESTION)
    with torch.inference_mode():  # transformers' own video features of the 8 frames, one row per merged token
        features = session.model.model.get_video_features(inputs["pixel_values_videos"],
                                                          inputs["video_grid_thw"]).pooler_output[0]
    rope = {k: inputs[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in inputs}
    full = session.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], **rope)[0][:, 0]
    video = (inputs["input_ids"][0] == session.model.config.video_token_id).nonzero()[:, 0]
    per_patch = len(video) // 4
    index = torch.cat([k * per_patch + kt.indices[0] for k, kt in enumerate(kept)])
    assert index.numel() < len(video)  # something was pruned
    assert torch.equal(got_positions, full[:, video[index]])
    # the tokens placed are the kept ones: the model's own features at the kept indices, in order
    assert (got_tokens - features[index]).abs().max() <= 1e-5 * features.abs().max()

    # the question's logits = one-shot inputs_embeds of the model's own features of the kept tokens
    prefix, suffix = video[0], video[-1] + 1
    embed = session.model.get_input_embeddings()
    with torch.inference_mode():
        embeds = torch.cat([embed(inputs["input_ids"][0, :prefix]), features[index],
                            embed(inputs["input_ids"][0, suffix:])])
        positions = torch.cat([full[:, :prefix], full[:, video[index]], full[:, suffix:]], dim=1)
        expected = session.model(inputs_embeds=embeds[None], position_ids=positions[:, None]).logits[0]
    assert max_question_diff(session, QUESTION, expected) <= TOLERANCE


@pytest.mark.parametrize("name", ["uniform", "random", "vidcom2"])
def test_baseline_selectors_run_on_qwen(name: str, frames: np.ndarray) -> None:
    from streamtc.baselines import RandomPruner, UniformPruner, VidCom2Pruner

    selector = {"uniform": UniformPruner, "random": RandomPruner, "vidcom2": VidCom2Pruner}[name](keep_ratio=0.5)
    session = StreamingSession.from_preset("qwen2-vl-tiny", stc=None, selector=selector, prefill_min_tokens=1)
    session.push(frames[:4])
    assert session.stats.visual_tokens == 2 * 3 < session.stats.visual_tokens_encoded == 2 * 6
    assert session.next_token_logits(QUESTION).isfinite().all()


# -- isolation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stc", [None, PRUNER])
def test_interleaved_streams_equal_streams_run_alone(stc: STCConfig | None, make_frames) -> None:
    a_frames, b_frames = make_frames(6, seed=3), make_frames(6, seed=4)
    first = StreamingSession.from_preset("qwen2.5-vl-tiny", stc=stc)
    second = first.spawn()
    for i in range(6):
        first.push(a_frames[i : i + 1])
        second.push(b_frames[i : i + 1])
        if i == 3:
            first.ask(QUESTION, max_new_tokens=2)  # a question in between changes nothing
    got = [first.next_token_logits(QUESTION), second.next_token_logits(QUESTION)]
    for frames_, logits in zip((a_frames, b_frames), got):
        alone = StreamingSession.from_preset("qwen2.5-vl-tiny", stc=stc)
        alone.model.model.rope_deltas = torch.tensor([[1000]])  # a stale value from another forward
        alone.push(frames_)
        assert (alone.next_token_logits(QUESTION) - logits).abs().max().item() <= TOLERANCE
    assert (got[0] - got[1]).abs().max().item() > 100 * TOLERANCE


# -- bad input, loading ---------------------------------------------------------------------------


def test_bad_inputs_raise_typed_errors(frames: np.ndarray) -> None:
    session = StreamingSession.from_preset("qwen2-vl-tiny", stc=None)
    session.push(frames[:1])
    with pytest.raises(InputError, match="2 frames at a time"):
        session.ask(QUESTION)
    with pytest.raises(ConfigError, match="multiple of 2"):
        StreamingSession(session.model, session.tokenizer, None, chunk_frames=3)
    with pytest.raises(ConfigError, match="protocols"):
        StreamingSession(session.model, session.tokenizer, None, protocol="rekv")
    with pytest.raises(UnsupportedModelError, match="Qwen2VLForConditionalGeneration.*Qwen2_5_VL"):
        StreamingSession(build_model("tiny-siglip"), session.tokenizer)
    # The Qwen tower Cacher attaches through the host: one temporal patch per chunk.
    with StreamingSession(session.model, session.tokenizer, STCConfig()) as with_stc:
        with_stc.push(frames[:4])
        assert with_stc.stats.cacher["chunks"] == 2 and with_stc.stats.cacher["refresh_chunks"] == 1


def test_from_pretrained_loads_a_saved_qwen_checkpoint(tmp_path, frames: np.ndarray) -> None:
    preset = StreamingSession.from_preset("qwen2.5-vl-tiny", stc=None)
    preset.model.save_pretrained(tmp_path)
    save_processor(preset.model.config, tmp_path)
    loaded = StreamingSession.from_pretrained(tmp_path, stc=None)
    assert isinstance(loaded.host, QwenVLHost) and isinstance(loaded.model, Qwen2_5_VLForConditionalGeneration)
    # the checkpoint's processor config gives the video frame bounds of transformers' video processor
    assert (loaded.preprocessor.min_pixels, loaded.preprocessor.max_pixels) == (128 * 28 * 28, 768 * 28 * 28)
    for session in (preset, loaded):
        session.push(frames[:4])
    inputs = video_protocol_inputs(loaded, [frames[:4]], QUESTION)
    assert max_question_diff(loaded, QUESTION, one_shot_logits(loaded, inputs)) <= TOLERANCE
    assert split_video_prompt(loaded.tokenizer, "?", None, "<|video_pad|>").prefix.endswith("<|vision_start|>")

    from streamtc.bench.pipeline import PipelineSettings, run_pipeline_benchmark
    from streamtc.variants import VARIANTS as VARIANTS_BY_NAME

    settings = PipelineSettings(model=str(tmp_path), frames=(2,), repeats=1, warmup_frames=0, max_new_tokens=1)
    report = run_pipeline_benchmark(settings, [VARIANTS_BY_NAME["none"]], frames=(frames[:2], [0.0, 0.5]))
    assert report["model"]["preset"] == str(tmp_path) and report["rows"][0]["visual_tokens"] > 0
    with pytest.raises(ConfigError, match="depth overrides"):
        PipelineSettings(model=str(tmp_path), vit_layers=2)

    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        StreamingSession.from_pretrained(tmp_path, stc=None)


# -- tools ----------------------------------------------------------------------------------------


def test_run_compare_on_a_qwen_preset_runs_the_pruner_alone(tmp_path) -> None:
    from typer.testing import CliRunner

    from streamtc.cli import app

    out = tmp_path / "run.json"
    result = CliRunner().invoke(app, ["run", "demo", "--preset", "livecc-tiny", "--compare", "--max-seconds", "4",
                                      "--ask", "3.5:What is happening?", "--max-new-tokens", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "running the STC-Pruner alone" not in result.output  # the Qwen tower has a Cacher
    report = json.loads(out.read_text())
    base, stc = report["stats"]["no STC"], report["stats"]["STC"]
    assert report["fps"] == 2.0 and base["frames"] == stc["frames"] == 8  # LiveCC's 2 fps: 6 + 2 frames
    assert stc["visual_tokens"] < base["visual_tokens"] == base["visual_tokens_encoded"]
    assert report["stc"]["STC"]["cacher"] is not None and stc["cacher"]["chunks"] == 2  # 6 frames, then 2


def test_bench_pipeline_on_a_qwen_preset() -> None:
    from streamtc.bench.pipeline import PipelineSettings, load_video_frames, run_pipeline_benchmark
    from streamtc.variants import VARIANTS as VARIANTS_BY_NAME

    names = ["none", "pruner gaussian 30%", "stc", "tome 25%", "visionzip 25%"]
    settings = PipelineSettings(preset="qwen2.5-vl-tiny", frames=(4,), repeats=1, warmup_frames=0, max_new_tokens=2)
    report = run_pipeline_benchmark(settings, [VARIANTS_BY_NAME[n] for n in names], frames=load_video_frames("demo", 4))
    assert [v["name"] for v in report["variants"]] == names and report["skipped"] == {}
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["none"]["tokens_per_frame"] == 6  # 640x272 -> 168x56 px -> 2x6 merged tokens per 2 frames
    assert rows["pruner gaussian 30%"]["visual_tokens"] < rows["none"]["visual_tokens"]
    assert len(rows["none"]["vit_frame_ms"]) == 4 and rows["pruner gaussian 30%"]["vit_cosine_mean"] == 1.0
    assert rows["tome 25%"]["visual_tokens"] == rows["visionzip 25%"]["visual_tokens"] == 2 * 3  # 3 of 12, 2 patches


def test_eval_model_spec_builds_qwen_sessions() -> None:
    from streamtc.factory import SessionSpec as ModelSpec

    session = ModelSpec(preset="livecc-tiny", stc=PRUNER.to_dict()).build()
    assert isinstance(session.host, QwenVLHost) and session.host.protocol == "livecc"
    with_stc = ModelSpec(preset="qwen2-vl-tiny", stc=STCConfig().to_dict()).build()
    assert with_stc.stc.cacher is not None
