"""STC (Cacher + Pruner) end to end in Qwen2-VL / Qwen2.5-VL sessions and the tools on tiny presets:
a Cacher that recomputes everything changes nothing, a caching Cacher hands the session exactly what
the patched tower gives on the same temporal patches, streams stay isolated, `bench pipeline` runs
(or skips, with the reason) every Cacher variant, and `eval run` answers with the Cacher on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtc import CacherConfig, PrunerConfig, STCConfig
from streamtc.cacher import STCCacher
from streamtc.hosts.qwen_preprocess import patchify_video
from streamtc.presets import build_model
from streamtc.session import StreamingSession

from helpers import QUESTION, TOLERANCE, push_one_by_one
from conftest import drifting_frames as make_frames

PRESETS = ["qwen2-vl-tiny", "qwen2.5-vl-tiny"]
CACHING = CacherConfig(cache_interval=2, update_ratio=0.25)
STC = STCConfig(cacher=CACHING, pruner=PrunerConfig(keep_ratio=0.5))


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def recording_encode(session: StreamingSession) -> list[torch.Tensor]:
    """Wrap the host's video path to keep each chunk's merged tokens [T, h * w, D]."""
    seen, encode = [], session.host.encode
    session.host.encode = lambda pixels, encoder=None: seen.append(encode(pixels, encoder)) or seen[-1]
    return seen  # fills as the session pushes


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return make_frames(10)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("cacher", [CacherConfig(cache_interval=1), CacherConfig(cache_interval=2, update_ratio=1.0)])
def test_a_cacher_that_recomputes_everything_equals_the_session_without_it(preset, cacher, frames) -> None:
    without = StreamingSession.from_preset(preset, stc=None, prefill_min_tokens=1)
    with_cacher = StreamingSession.from_preset(preset, stc=STCConfig(cacher=cacher, pruner=None), prefill_min_tokens=1)
    features = [recording_encode(s) for s in (without, with_cacher)]
    for session in (without, with_cacher):
        push_one_by_one(session, frames[:8])
    assert with_cacher.stats.cacher["chunks"] == 4
    for want, got in zip(*features):
        assert rel_diff(got.features, want.features) <= 1e-5
    assert rel_diff(with_cacher.next_token_logits(QUESTION), without.next_token_logits(QUESTION)) <= 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_session_video_features_equal_the_patched_tower_on_the_same_temporal_patches(preset, frames) -> None:
    session = StreamingSession.from_preset(preset, stc=STCConfig(cacher=CACHING, pruner=PrunerConfig(keep_ratio=0.5)))
    chunks = recording_encode(session)
    push_one_by_one(session, frames[:8])
    assert session.stats.cacher["chunks"] == 4 and session.stats.cacher["refresh_chunks"] == 2

    model = build_model(preset)  # the same seeded weights, its own tower and Cacher
    tower = model.model.visual
    vision = model.config.vision_config
    patches = [patchify_video(torch.stack(session.preprocessor(frames[i : i + 2])), vision.patch_size)
               for i in range(0, 8, 2)]

    def encode() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([tower(rows, grid_thw=torch.tensor([grid])).pooler_output for rows, grid in patches])

    full = encode()
    cacher = STCCacher(CACHING).attach(tower)
    direct = encode()
    cacher.detach()
    got = torch.cat([c.features.flatten(0, 1) for c in chunks])
    assert torch.equal(got, direct)
    assert cacher.stats.refresh_chunks == 2 and not torch.allclose(got, full, atol=1e-4)  # something was reused


@pytest.mark.parametrize("protocol", ["video", "livecc"])
def test_interleaved_qwen_streams_with_stc_equal_each_alone(protocol) -> None:
    stc = STCConfig(cacher=CACHING, pruner=PrunerConfig(keep_ratio=0.5))
    a_frames, b_frames = make_frames(10, seed=3), make_frames(10, seed=4)
    first = StreamingSession.from_preset("qwen2.5-vl-tiny", stc=stc, protocol=protocol)
    second = first.spawn()
    for i in range(10):
        first.push(a_frames[i : i + 1], [i / 2])
        second.push(b_frames[i : i + 1], [i / 2])
        if i == 7:
            first.ask(QUESTION, max_new_tokens=2)  # a question in between changes nothing
    assert first.stats.cacher["refresh_chunks"] < first.stats.cacher["chunks"]
    got = [first.next_token_logits(QUESTION), second.next_token_logits(QUESTION)]
    for frames_, logits in zip((a_frames, b_frames), got):
        alone = StreamingSession.from_preset("qwen2.5-vl-tiny", stc=stc, protocol=protocol)
        alone.push(frames_, [i / 2 for i in range(10)])
        assert (alone.next_token_logits(QUESTION) - logits).abs().max().item() <= TOLERANCE
    assert (got[0] - got[1]).abs().max().item() > 100 * TOLERANCE


def test_bench_pipeline_runs_every_cacher_variant_a_qwen_tower_supports() -> None:
    from streamtc.bench.pipeline import PipelineSettings, load_video_frames, run_pipeline_benchmark
    from streamtc.variants import VARIANTS as VARIANTS_BY_NAME

    names = ("none", "cacher N=2", "stc", "stc shared", "stc adaptive", "stc compiled")
    settings = PipelineSettings(preset="qwen2-vl-tiny", frames=(4,), repeats=1, warmup_frames=0, max_new_tokens=1)
    report = run_pipeline_benchmark(settings, [VARIANTS_BY_NAME[n] for n in names], frames=load_video_frames("demo", 4))
    assert [v["name"] for v in report["variants"]] == list(names[:-1])
    assert "compile_mode" in report["skipped"]["stc compiled"]  # the Qwen blocks have no compiled path
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["none"]["vit_cosine_mean"] == 1.0
    assert 0.0 < rows["cacher N=2"]["vit_cosine_mean"] < 1.0  # the second temporal patch reused the first
    assert rows["cacher N=2"]["visual_tokens"] == rows["none"]["visual_tokens"]  # the Cacher alone prunes nothing
    assert rows["stc"]["visual_tokens"] < rows["none"]["visual_tokens"]


def test_eval_run_answers_with_the_cacher_on_a_qwen_preset(tmp_path) -> None:
    """One OVO-Bench clip through `EvalRun` on qwen2-vl-tiny: with STC on, every question is answered;
    with a Cacher that recomputes everything, the option log-probabilities equal the run without it."""
    import json

    from streamtc.eval.benchmarks import load_benchmark
    from streamtc.eval.results import read_results
    from streamtc.eval.runner import EvalRun
    from streamtc.factory import SessionSpec as ModelSpec
    from streamtc.eval.streaming import EvalSettings

    from helpers import OPTIONS, write_clip

    write_clip(tmp_path / "videos" / "a.mp4", 6, seed=1)
    items = [{"id": i, "task": "EPM", "video": "a.mp4", "realtime": t, "question": "What was taken?",
              "options": OPTIONS, "gt": 1} for i, t in enumerate((2, 4.5, 6))]
    (tmp_path / "ovo.json").write_text(json.dumps(items))
    benchmark = load_benchmark("ovobench", tmp_path / "ovo.json", tmp_path / "videos")
    settings = EvalSettings(fps=2.0, max_new_tokens=2, option_logprobs=True)
    runs = {}
    for name, stc in (("none", None), ("exact cacher", STCConfig(cacher=CacherConfig(cache_interval=1), pruner=None)),
                      ("stc", STCConfig())):
        spec = ModelSpec(preset="qwen2-vl-tiny", stc=None if stc is None else stc.to_dict())
        summary = EvalRun(benchmark, spec, tmp_path / f"{name}.jsonl", settings).run()
        assert summary["complete"] and summary["answers"] == 3
        runs[name] = read_results(tmp_path / f"{name}.jsonl").answers
    assert all(r["error"] is None for r in runs["stc"].values())
    assert [r["frames"] for r in runs["stc"].values()] == [4, 10, 12]  # whole temporal patches before each cut
    for key, record in runs["none"].items():
        exact = runs["exact cacher"][key]["option_logprobs"]
        assert all(abs(exact[k] - v) <= 1e-4 for k, v in record["option_logprobs"].items())


# -- which tokens the Cacher recomputed ------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_recomputed_tokens_map_to_the_cells_transformers_puts_them_in(preset, frames) -> None:
    """The host's map from tower token order to patch-grid cells equals the order transformers' tower
    hands its blocks (a cell-id image through the patch embedding, read at the first block)."""
    session = StreamingSession.from_preset(preset, stc=STCConfig(cacher=CACHING, pruner=PrunerConfig(keep_ratio=0.5)))
    chunks = recording_encode(session)
    session.push(frames[:2])
    assert session.last_recomputed.cells is None  # a refresh: every token
    session.push(frames[2:4])
    record = session.last_recomputed
    layers = len(session.host.vision_tower.blocks)
    assert record.cells.shape == (layers, 1, 6) and record.grid == (4, 6)  # 24 tokens, r = 0.25
    assert session.last_pruner_grid == (2, 3) and len(session.last_kept_indices[0]) == 3

    tower = session.host.vision_tower
    rows, cols = record.grid
    seen = []

    def cell_ids_as_embedding(module, args, out):  # channel 0 of each token: its row-major cell id
        ids = torch.zeros_like(out)
        ids[:, 0] = _cell_ids(rows, cols, session.host.merge)
        return ids

    embed = tower.patch_embed.register_forward_hook(cell_ids_as_embedding)
    first = tower.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 0].clone()))
    try:
        with torch.inference_mode():
            session.host.encode(session.preprocessor(frames[4:6]))
    finally:
        embed.remove()
        first.remove()
    cells, grid = session.host.tower_cells(chunks[-1])
    assert grid == (rows, cols) and torch.equal(cells, seen[0].round().long())
    counts = record.counts()
    assert counts.shape == (1, 24) and int(counts.sum()) == layers * 6 and int(counts.max()) <= layers
    assert torch.equal(record.cells, cells[session.cacher.last_recomputed(session.cacher_state)])


def _cell_ids(rows: int, cols: int, merge: int) -> torch.Tensor:
    """Each patch's row-major cell id, in the order the processor lays patches out (merge blocks)."""
    grid = torch.arange(rows * cols, dtype=torch.float32).view(rows // merge, merge, cols // merge, merge)
    return grid.permute(0, 2, 1, 3).flatten()


def test_serve_frame_events_map_a_qwen_streams_tokens(frames) -> None:
    """Served Qwen2.5-VL stream: the frame completing a temporal patch carries the Pruner's kept
    positions on the merged grid and the Cacher's per-cell recompute counts on the patch grid."""
    from streamtc.serve.engine import Engine, StreamSpec

    events: list[dict] = []
    base = StreamingSession.from_preset("qwen2.5-vl-tiny", stc=None)
    engine = Engine(base, STC,
                    listener=lambda sid, event: events.append(event) if event["type"] == "frame" else None)
    try:
        stream = engine.create_stream(StreamSpec(fps=2)).result()["id"]
        for i in range(4):
            engine.push_frame(stream, frames[i], i / 2)
        engine.ask(stream, QUESTION, max_new_tokens=1, sync=True).result(timeout=120)
    finally:
        engine.close()
    assert [e["frame"] for e in events] == [0, 1, 2, 3]
    assert events[0]["pruner"] is None and events[0]["cacher"]["recomputed"] is None  # waits for its pair
    refresh, reuse = events[1], events[3]
    # the kept positions are what a session with the same settings keeps on the same temporal patches
    alone, kept = StreamingSession.from_preset("qwen2.5-vl-tiny", stc=STC), []
    for i in range(4):
        alone.push(frames[i][None], [i / 2])
        if i % 2:
            kept.append([int(k) for k in alone.last_kept_indices[0]])
    assert refresh["pruner"] == {"kept": kept[0], "tokens": 6, "grid": [2, 3]} and len(kept[0]) == 3
    assert reuse["pruner"]["kept"] == kept[1]
    assert refresh["cacher"]["refresh"] and refresh["cacher"]["recomputed"] is None
    cacher = reuse["cacher"]
    assert not cacher["refresh"] and cacher["grid"] == [4, 6] and cacher["layers"] == 4
    assert len(cacher["recomputed"]) == 24 and sum(cacher["recomputed"]) == sum(cacher["recomputed_per_layer"]) == 4 * 6
