"""Evaluation end to end on the tiny preset: the streaming protocol (each question sees exactly the
frames of its benchmark's clip rule, in both protocols; no frame encoded twice), missing and
unreadable videos and annotation records, resume after a crash and after Ctrl-C, header refusal,
a 2-actor Ray run equal to the single-process run, and the `streamtc eval` commands.

Clips are encoded here with PyAV (64x48, 4 fps, a drifting noisy scene); annotations are written in
OVO-Bench's and Video-MME's published formats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from streamtc import STCConfig
from streamtc.cli import app
from streamtc.errors import VideoSourceError
from streamtc.eval.benchmarks import load_benchmark, protocol_of
from streamtc.eval.results import ResultsMismatchError, read_results
from streamtc.eval.runner import EvalRun
from streamtc.measure import environment
from streamtc.eval.streaming import EvalSettings, run_video
from streamtc.factory import SessionSpec as ModelSpec
from streamtc.session import StreamingSession
from streamtc.sources import PyAVSource
from helpers import OPTIONS, write_clip

runner = CliRunner()
TIMINGS = {"ttft_ms", "total_ms", "prefill_ms"}
SETTINGS = EvalSettings(fps=1.0, max_new_tokens=4, option_logprobs=True)
SPEC = ModelSpec(preset="tiny-llava-ov", stc=STCConfig().to_dict())
OVO_OFFICIAL = protocol_of("ovobench", "official")
@pytest.fixture(scope="module")
def ovo(tmp_path_factory) -> Path:
    """An OVO-Bench fixture: two clips, one missing video, one file that is not a video."""
    root = tmp_path_factory.mktemp("ovo")
    write_clip(root / "videos" / "COIN" / "a.mp4", 6, seed=1)
    write_clip(root / "videos" / "Ego" / "b.mp4", 5, seed=2)
    (root / "videos" / "broken").mkdir()
    (root / "videos" / "broken" / "d.mp4").write_text("not a video\n")
    items = [
        {"id": 0, "task": "EPM", "video": "COIN/a.mp4", "realtime": 2, "question": "What was taken?",
         "options": OPTIONS, "gt": 1},
        {"id": 1, "task": "OCR", "video": "COIN/a.mp4", "realtime": 4.5, "question": "What does it say?",
         "options": OPTIONS[:3], "gt": 0},
        {"id": 2, "task": "REC", "video": "Ego/b.mp4", "activity": "jump",
         "test_info": [{"realtime": 3, "count": 1}, {"realtime": 1, "count": 0}]},
        {"id": 3, "task": "SSR", "video": "COIN/a.mp4",
         "test_info": [{"realtime": 5, "step": "open the box", "type": 1}, {"realtime": 0, "step": "cut", "type": 0}]},
        {"id": 4, "task": "CRR", "video": "Ego/b.mp4", "question": "What is in the box?",
         "test_info": [{"realtime": 4, "type": 0}]},
        {"id": 5, "task": "ASI", "video": "gone/c.mp4", "realtime": 1, "question": "Next step?", "options": OPTIONS, "gt": 3},
        {"id": 6, "task": "STU", "video": "COIN/a.mp4", "realtime": 30, "question": "Where?", "options": OPTIONS, "gt": 2},
        {"id": 7, "task": "HLD", "video": "broken/d.mp4", "realtime": 2, "question": "Odd?", "options": OPTIONS, "gt": 0},
        {"id": 8, "task": "FPD", "video": "COIN/a.mp4", "realtime": float("nan"), "question": "Then?",
         "options": OPTIONS, "gt": 1},  # a malformed record: an error line, never a question after the video
    ]
    (root / "ovo_bench_new.json").write_text(json.dumps(items))
    return root


def comparable(results_path: Path) -> dict:
    """Answer records by key, without timings (which differ from run to run)."""
    return {key: {k: v for k, v in record.items() if k not in TIMINGS}
            for key, record in read_results(results_path).answers.items()}


def assert_same_answers(got: dict, expected: dict, tolerance: float = 0.0) -> None:
    assert got.keys() == expected.keys()
    for key, record in expected.items():
        other = dict(got[key])
        logprobs, expected_logprobs = other.pop("option_logprobs"), record.get("option_logprobs")
        assert other == {k: v for k, v in record.items() if k != "option_logprobs"}, key
        if expected_logprobs is None:
            assert logprobs is None
        else:
            assert logprobs.keys() == expected_logprobs.keys()
            assert all(abs(logprobs[k] - expected_logprobs[k]) <= tolerance for k in logprobs), key


@pytest.fixture(scope="module")
def reference(ovo: Path, tmp_path_factory) -> tuple[Path, int]:
    """An uninterrupted single-process run; returns (results file, frames pushed in total)."""
    pushed = []
    original = StreamingSession.push

    def counting_push(self, frames, timestamps=None, **kwargs):
        pushed.append(len(frames))
        return original(self, frames, timestamps, **kwargs)

    output = tmp_path_factory.mktemp("runs") / "reference.jsonl"
    benchmark = load_benchmark("ovobench", ovo / "ovo_bench_new.json", ovo / "videos")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StreamingSession, "push", counting_push)
        summary = EvalRun(benchmark, SPEC, output, SETTINGS).run()
    assert summary["complete"] and summary["answers"] == 11
    return output, sum(pushed)


def test_questions_see_the_frames_of_ovobench_clips(reference: tuple[Path, int]) -> None:
    path, pushed = reference
    results = read_results(path)
    answers = results.answers
    clip_frames = {"COIN/a.mp4": 6, "Ego/b.mp4": 5}  # 6 s and 5 s at 1 fps
    for (video, qid, trigger), record in answers.items():
        if record["error"] is not None:
            continue
        expected = min(math.ceil(record["question_time"]), clip_frames[video])  # OVO-Bench's clip [0, ceil(t))
        assert record["frames"] == expected, (video, qid, trigger)
        assert record["stream_time"] == expected - 1  # the last frame seen is the last one before the cut
        assert record["response"] is not None and record["token_ids"] is not None
    # OVO-Bench's forward-active items: one answer per trigger point, each at its own time
    assert [answers[("Ego/b.mp4", "2", t)]["frames"] for t in (0, 1)] == [3, 1]
    assert answers[("COIN/a.mp4", "1", None)]["frames"] == 5  # t = 4.5: [0, 5)
    assert answers[("COIN/a.mp4", "6", None)]["frames"] == 6  # timed after the end: asked at the end
    assert set(answers[("COIN/a.mp4", "0", None)]["option_logprobs"]) == {"A", "B", "C", "D"}
    assert answers[("Ego/b.mp4", "4", 0)]["option_logprobs"] is None  # Yes/No prompt: no options
    empty = answers[("COIN/a.mp4", "3", 1)]  # SSR at t = 0: the clip [0, 0) has no frame
    assert "holds no sampled frame" in empty["error"] and empty["correct"] is False
    # each clip is decoded and encoded once, up to its last question's cut: 6 + 4 frames in total,
    # where re-encoding every question's clip would have cost 2 + 5 + 5 + 6 + 3 + 1 + 4 = 26
    assert pushed == 10
    assert sorted((v["video"], v["frames"]) for v in results.videos) == [
        ("COIN/a.mp4", 6), ("Ego/b.mp4", 4), ("broken/d.mp4", 0), ("gone/c.mp4", 0)]


def test_missing_videos_and_unreadable_records_are_recorded_not_fatal(reference: tuple[Path, int]) -> None:
    results = read_results(reference[0])
    gone, broken = results.answers[("gone/c.mp4", "5", None)], results.answers[("broken/d.mp4", "7", None)]
    assert "no such video file" in gone["error"] and gone["correct"] is False and gone["prediction"] is None
    assert "d.mp4" in broken["error"]
    bad = results.answers[("COIN/a.mp4", "8", None)]
    assert bad["error"].startswith("unreadable annotation: ovo_bench_new.json item 8: realtime")
    assert "not a finite, non-negative time" in bad["error"] and bad["frames"] is None
    summary = results.summaries[-1]
    assert summary["score"]["errors"] == 4  # two videos, the empty clip, the unreadable record
    assert set(summary["score"]["missing_videos"]) == {"gone/c.mp4", "broken/d.mp4"}
    assert summary["timing"]["frames"] == 10 and summary["timing"]["vit_ms_per_frame"] > 0
    assert summary["timing"]["tokens_kept"] < 1.0  # STC's Pruner keeps 30%
    assert results.header["questions"] == 11 and results.complete
    assert results.header["config"]["protocol"] == "official"
    assert set(results.header["environment"]) == set(environment())  # the record every result carries
    assert results.header["environment"]["config"] == results.header["config"]


def test_chunked_pushes_keep_question_times(ovo: Path) -> None:
    """With 2-frame chunks, a chunk is cut short when a question falls due."""
    benchmark = load_benchmark("ovobench", ovo / "ovo_bench_new.json", ovo / "videos")
    session = StreamingSession.from_preset("tiny-llava-ov", stc=None, chunk_frames=2)
    records = list(run_video(session, benchmark.tasks[0], OVO_OFFICIAL, EvalSettings(fps=1.0, max_new_tokens=1)))
    assert [(r["question_time"], r["frames"]) for r in records if r["type"] == "answer"] == [
        (0.0, None), (2.0, 2), (4.5, 5), (5.0, 5), (30.0, 6)]
    assert records[-1]["type"] == "video" and records[-1]["frames"] == 6


def test_a_video_failing_mid_stream_keeps_the_answers_it_can_give(ovo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding fails after 3.5 s: the question at 2 s was answered; the rest get errors."""
    import streamtc.eval.streaming as streaming

    class CutSource(PyAVSource):
        def _timeline(self):
            for timestamp, image in super()._timeline():
                if timestamp > 3.5:
                    raise VideoSourceError(f"{self.name}: decoding failed (simulated)")
                yield timestamp, image

    monkeypatch.setattr(streaming, "PyAVSource", CutSource)
    benchmark = load_benchmark("ovobench", ovo / "ovo_bench_new.json", ovo / "videos")
    session = StreamingSession.from_preset("tiny-llava-ov", stc=None)
    records = list(run_video(session, benchmark.tasks[0], OVO_OFFICIAL, EvalSettings(fps=1.0, max_new_tokens=1)))
    answers = [(r["question_time"], r["frames"], r["error_kind"]) for r in records if r["type"] == "answer"]
    assert answers == [(0.0, None, "empty_clip"), (2.0, 2, None), (4.5, None, "video"), (5.0, None, "video"),
                       (30.0, None, "video")]
    assert records[-1]["error"].endswith("decoding failed (simulated)") and records[-1]["frames"] == 4


def test_resume_after_a_crash_answers_the_rest_once(ovo: Path, reference: tuple[Path, int], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "crashed.jsonl"
    benchmark = load_benchmark("ovobench", ovo / "ovo_bench_new.json", ovo / "videos")
    asked = []
    original = StreamingSession.ask

    def crash_after_three(self, *args, **kwargs):
        if len(asked) == 3:
            raise RuntimeError("simulated crash")
        asked.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StreamingSession, "ask", crash_after_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        EvalRun(benchmark, SPEC, output, SETTINGS).run()
    written = len(read_results(output).answers)  # the unreadable record, the empty clip, three answers
    assert written == 5
    with output.open("a") as handle:
        handle.write('{"type": "answer", "video": "COIN/a.mp4", "qid": "1", "trig')  # killed mid-write

    monkeypatch.setattr(StreamingSession, "ask", lambda self, *a, **k: asked.append(a[0]) or original(self, *a, **k))
    resumed = EvalRun(benchmark, SPEC, output, SETTINGS)
    assert resumed.resumed and resumed.pending_questions == 11 - written and resumed.retried == 0
    summary = resumed.run()
    asked_in_reference = sum(r["error"] is None for r in read_results(reference[0]).answers.values())
    assert len(asked) == asked_in_reference == 7  # the remaining readable questions, nothing asked twice
    results = read_results(output)
    assert results.superseded == 0 and not results.truncated_tail and summary["complete"]
    assert_same_answers(comparable(output), comparable(reference[0]), tolerance=1e-4)
    lines = output.read_text().splitlines()
    assert sum(json.loads(line)["type"] == "answer" for line in lines) == 11  # no duplicates, nothing lost
    assert EvalRun(benchmark, SPEC, output, SETTINGS).pending_questions == 0
    # --retry-errors asks again the errors (and says how many), nothing else
    retry = EvalRun(benchmark, SPEC, output, SETTINGS, retry_errors=True)
    assert retry.retried == 4 and retry.pending_questions == 4


def test_a_run_refuses_results_written_with_another_config(ovo: Path, reference: tuple[Path, int],
                                                           tmp_path: Path) -> None:
    output = tmp_path / "copy.jsonl"
    shutil.copy(reference[0], output)
    benchmark = load_benchmark("ovobench", ovo / "ovo_bench_new.json", ovo / "videos")
    with pytest.raises(ResultsMismatchError, match=r"\(fps\)"):
        EvalRun(benchmark, SPEC, output, EvalSettings(fps=0.5, max_new_tokens=4, option_logprobs=True))
    with pytest.raises(ResultsMismatchError, match="stc"):
        EvalRun(benchmark, ModelSpec(stc=None), output, SETTINGS)
    with pytest.raises(ResultsMismatchError, match="window_tokens"):
        EvalRun(benchmark, dataclasses.replace(SPEC, window_tokens=64), output, SETTINGS)
    with pytest.raises(ResultsMismatchError, match="protocol"):
        EvalRun(benchmark, SPEC, output, SETTINGS, protocol="paper")
    assert output.read_bytes() == reference[0].read_bytes()


def test_results_written_before_a_setting_existed_resume_at_its_default(ovo: Path, reference: tuple[Path, int],
                                                                       tmp_path: Path) -> None:
    lines = reference[0].read_text().splitlines()
    header = json.loads(lines[0])
    assert header["config"]["stc"]["cacher"].pop("granularity") == "token"  # as before the setting existed
    output = tmp_path / "older.jsonl"
    output.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    benchmark = load_benchmark("ovobench", ovo / "ovo_bench_new.json", ovo / "videos")
    evaluation = EvalRun(benchmark, SPEC, output, SETTINGS)
    assert evaluation.resumed and evaluation.pending_questions == 0
    header["config"]["stc"]["cacher"]["granularity"] = "merge_block"  # a different setting still differs
    output.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(ResultsMismatchError, match="granularity"):
        EvalRun(benchmark, SPEC, output, SETTINGS)


@pytest.mark.slow  # a local Ray cluster and two actors, each building a session
def test_ray_two_actor_run_equals_the_single_process_run(ovo: Path, reference: tuple[Path, int],
                                                         tmp_path: Path) -> None:
    pytest.importorskip("ray")
    output = tmp_path / "ray.jsonl"
    result = runner.invoke(app, ["eval", "run", "ovobench", str(ovo / "ovo_bench_new.json"), "--videos",
                                 str(ovo / "videos"), "--output", str(output), "--max-new-tokens", "4",
                                 "--option-logprobs", "--cacher", "paper", "--ray", "--actors", "2"])
    assert result.exit_code == 0, result.output
    assert "on Ray (local)" in result.output and "could not be read" in result.output
    assert "1 record(s) of the annotations cannot be read" in result.output
    # actors use 1 torch thread each, this process 2: log-probabilities agree to rounding
    assert_same_answers(comparable(output), comparable(reference[0]), tolerance=1e-4)
    assert read_results(output).header["config"] == read_results(reference[0]).header["config"]


@pytest.fixture(scope="module")
def videomme(tmp_path_factory) -> Path:
    """A Video-MME fixture in the official row format: one short clip, one missing video."""
    root = tmp_path_factory.mktemp("videomme")
    write_clip(root / "data" / "vid001.mp4", 4, seed=3)
    rows = [{"video_id": "001", "duration": "short", "domain": "Life", "sub_category": "Pets", "videoID": "vid001",
             "question_id": f"001-{k}", "task_type": "Object Recognition", "question": f"Question {k}?",
             "options": ["A. cat", "B. dog", "C. bird", "D. fish"], "answer": "ABCD"[k]} for k in range(3)]
    rows.append({**rows[0], "videoID": "vid404", "question_id": "404-1", "duration": "long"})
    (root / "videomme.json").write_text(json.dumps(rows))
    return root


def test_eval_cli_offline_run_and_report_comparison(videomme: Path, tmp_path: Path) -> None:
    base, stc = tmp_path / "base.jsonl", tmp_path / "stc.jsonl"
    common = ["eval", "run", "auto", str(videomme / "videomme.json"), "--videos", str(videomme / "data"),
              "--max-new-tokens", "2", "--protocol", "paper"]
    result = runner.invoke(app, [*common, "--output", str(base), "--no-stc"])
    assert result.exit_code == 0, result.output
    assert "Video-MME" in result.output and "random weights" in result.output and "vid404" in result.output
    result = runner.invoke(app, [*common, "--output", str(stc)])
    assert result.exit_code == 0, result.output
    answers = read_results(stc).answers
    assert {r["frames"] for r in answers.values() if r["error"] is None} == {2}  # 4 s at 0.5 fps, asked at the end
    assert answers[("vid001", "001-0", None)]["category"] == "short"

    summary = tmp_path / "report.json"
    result = runner.invoke(app, ["eval", "report", str(base), str(stc), "--json", str(summary)])
    assert result.exit_code == 0, result.output
    for text in ("retention", "duration: short", "no STC", "STC: Cacher N=2", "ViT", "TTFT", "paper"):
        assert text in result.output, text
    report = json.loads(summary.read_text())
    assert [r["config"]["stc"] is None for r in report] == [True, False]
    assert [r["protocol"] for r in report] == ["paper", "paper"] and report[0]["complete"]
    assert report[0]["score"]["questions"] == 4 and report[0]["score"]["errors"] == 1
    assert "ReKV's extract_choice" in result.output and "protocol paper" in result.output

    # an existing file with another setting is refused before any model is built
    result = runner.invoke(app, [*common, "--output", str(base)])
    assert result.exit_code != 0 and isinstance(result.exception, ResultsMismatchError)
    result = runner.invoke(app, ["eval", "report", str(base), str(tmp_path / "nope.jsonl")])
    assert result.exit_code != 0
    result = runner.invoke(app, ["eval", "benchmarks"])
    assert result.exit_code == 0 and "ovobench" in result.output and "52.6" in result.output


def test_eval_cli_runs_a_named_variant_and_qwen_at_its_protocol_rate(videomme: Path, tmp_path: Path) -> None:
    common = ["eval", "run", "videomme", str(videomme / "videomme.json"), "--videos", str(videomme / "data"),
              "--max-new-tokens", "2"]
    uniform = tmp_path / "uniform.jsonl"
    result = runner.invoke(app, [*common, "--output", str(uniform), "--variant", "uniform 25%"])
    assert result.exit_code == 0, result.output
    config = read_results(uniform).header["config"]
    assert config["variant"]["name"] == "uniform 25%" and config["stc"] is None and config["fps"] == 0.5
    result = runner.invoke(app, ["eval", "report", str(uniform)])
    assert result.exit_code == 0 and "uniform 25%" in result.output
    qwen = tmp_path / "qwen.jsonl"
    result = runner.invoke(app, [*common, "--output", str(qwen), "--preset", "qwen2-vl-tiny", "--no-stc"])
    assert result.exit_code == 0, result.output
    assert "at 2 fps" in result.output and read_results(qwen).header["config"]["fps"] == 2.0
    assert {r["frames"] for r in read_results(qwen).answers.values() if r["error"] is None} == {8}  # 4 s at 2 fps
    result = runner.invoke(app, [*common, "--output", str(tmp_path / "x.jsonl"), "--variant", "stc", "--no-stc"])
    assert result.exit_code != 0 and "--variant" in result.output
    retrieval = tmp_path / "retrieval.jsonl"  # ReKV's memory, blocks on disk: recorded with the run's config
    result = runner.invoke(app, [*common, "--output", str(retrieval), "--memory", "retrieval", "--window-tokens", "20",
                                 "--offload-dir", str(tmp_path / "blocks"), "--offload-budget", "1000000"])
    assert result.exit_code == 0, result.output
    model = read_results(retrieval).header["config"]["model"]
    assert (model["memory"], model["window_tokens"], model["offload_budget"]) == ("retrieval", 20, 1_000_000)
    errors = [r["error"] for r in read_results(retrieval).answers.values()]
    assert errors.count(None) == 3 and len(errors) == 4  # vid404 is missing, as in every run here
    assert not any((tmp_path / "blocks").iterdir())  # every stream's block directory went with its stream


def test_egoschema_full_set_writes_a_submission(tmp_path: Path) -> None:
    write_clip(tmp_path / "videos" / "uid0.mp4", 3, seed=4)
    questions = [{"q_uid": f"uid{i}", "question": "What did C do?", **{f"option {k}": f"thing {k}" for k in range(5)}}
                 for i in range(2)]
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "subset_answers.json").write_text(json.dumps({"uid0": 2}))
    output = tmp_path / "ego_full.jsonl"
    result = runner.invoke(app, ["eval", "run", "egoschema-full", str(tmp_path / "questions.json"), "--videos",
                                 str(tmp_path / "videos"), "--output", str(output), "--max-new-tokens", "1"])
    assert result.exit_code == 0, result.output
    submission = json.loads((tmp_path / "ego_full.submission.json").read_text())
    assert submission.keys() == {"uid0", "uid1"} and submission["uid1"] == -1  # uid1's video is missing
    assert (tmp_path / "ego_full.submission.csv").read_text().startswith("q_uid,answer")
    score = read_results(output).summaries[-1]["score"]
    assert (score["questions"], score["unlabelled"]) == (1, 1)  # only uid0 is labelled


# -- frame timing: each question sees exactly its benchmark's clip ------------------------------

TIMES = [0.5, 1, 2, 2.2, 3.7, 4, 4.999, "00:00:03"]


@pytest.fixture(scope="module")
def timing_annotations(ovo: Path) -> dict[str, Path]:
    """Questions at integer and fractional times on the 6 s clip, in OVO-Bench's and StreamingBench's
    formats."""
    root = ovo / "timing"
    root.mkdir()
    items = [{"id": n, "task": "OCR", "video": "COIN/a.mp4", "realtime": t if not isinstance(t, str) else 3,
              "question": f"Q{n}?", "options": OPTIONS, "gt": 0} for n, t in enumerate(TIMES)]
    (root / "ovo.json").write_text(json.dumps(items))
    entries = [{"video_path": "COIN/a.mp4", "questions": [
        {"question_id": f"q{n}", "task_type": "Counting", "question": f"Q{n}?", "time_stamp": t,
         "options": [f"{'ABCD'[k]}. {o}" for k, o in enumerate(OPTIONS)], "answer": "A"} for n, t in enumerate(TIMES)]}]
    (root / "streamingbench.json").write_text(json.dumps(entries))
    return {"ovobench": root / "ovo.json", "streamingbench": root / "streamingbench.json"}


def seconds(t) -> float:
    return 3.0 if isinstance(t, str) else float(t)


# the official clips, written out here: OVO-Bench `subclip(0, math.ceil(realtime))`, StreamingBench
# ffmpeg `-t int(timestamp)`; a clip [0, c) sampled at f fps holds the frames at k / f < c
CLIP_END = {"ovobench": lambda t: math.ceil(t), "streamingbench": lambda t: int(t)}


@pytest.mark.parametrize("fps", [1.0, 2.0])
@pytest.mark.parametrize("protocol", ["official", "paper"])
@pytest.mark.parametrize("benchmark", ["ovobench", "streamingbench"])
def test_each_question_sees_the_frames_of_its_official_clip(ovo: Path, timing_annotations, benchmark, protocol,
                                                            fps) -> None:
    loaded = load_benchmark(benchmark, timing_annotations[benchmark], ovo / "videos")
    (task,) = loaded.tasks
    session = StreamingSession.from_preset("tiny-llava-ov", stc=None)
    records = [r for r in run_video(session, task, protocol_of(benchmark, protocol),
                                    EvalSettings(fps=fps, max_new_tokens=1)) if r["type"] == "answer"]
    sampled = [k / fps for k in range(int(6 * fps))]  # the 6 s clip
    got = {r["qid"]: r["frames"] for r in records}
    for n, t in enumerate(TIMES):
        end = CLIP_END[benchmark](seconds(t))
        expected = sum(stamp < end for stamp in sampled) or None  # an empty clip: an error line
        qid = str(n) if benchmark == "ovobench" else f"q{n}"
        assert got[qid] == expected, (t, got[qid], expected)


def test_ctrl_c_says_how_to_resume_and_resuming_asks_nothing_twice(videomme: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "interrupted.jsonl"
    command = ["eval", "run", "videomme", str(videomme / "videomme.json"), "--videos", str(videomme / "data"),
               "--max-new-tokens", "1", "--output", str(output)]
    original = StreamingSession.ask
    asked = []

    def interrupt_on_second(self, *args, **kwargs):
        if len(asked) == 1:
            raise KeyboardInterrupt
        asked.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StreamingSession, "ask", interrupt_on_second)
    result = runner.invoke(app, command)
    assert result.exit_code == 130, result.output
    assert "interrupted: 1 of 4 questions answered" in result.output
    assert "Run the same command again to resume" in result.output
    results = read_results(output)
    assert len(results.answers) == 1 and not results.complete and results.planned == 4

    monkeypatch.setattr(StreamingSession, "ask", lambda self, *a, **k: asked.append(a[0]) or original(self, *a, **k))
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "1 of 4 questions already answered, none asked again" in result.output
    assert len(asked) == 3  # one before Ctrl-C, the video's other two after it: nothing asked twice
    assert read_results(output).complete

    # a resumed run that plans a different total records it, so completeness stays honest
    result = runner.invoke(app, [*command, "--max-videos", "1"])
    assert result.exit_code == 0, result.output
    assert read_results(output).planned == 3


def test_a_question_the_session_refuses_is_an_error_line(ovo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamtc.errors import InputError

    original = StreamingSession.ask

    def refuse_one(self, question, *args, **kwargs):
        if "What does it say?" in question:
            raise InputError("the prompt is too long (simulated)")
        return original(self, question, *args, **kwargs)

    monkeypatch.setattr(StreamingSession, "ask", refuse_one)
    benchmark = load_benchmark("ovobench", ovo / "ovo_bench_new.json", ovo / "videos")
    session = StreamingSession.from_preset("tiny-llava-ov", stc=None)
    records = [r for r in run_video(session, benchmark.tasks[0], OVO_OFFICIAL, EvalSettings(fps=1.0, max_new_tokens=1))
               if r["type"] == "answer"]
    refused = [r for r in records if r["error_kind"] == "question"]
    assert [r["qid"] for r in refused] == ["1"] and "too long (simulated)" in refused[0]["error"]
    assert [r["qid"] for r in records if r["error"] is None] == ["0", "3", "6"]  # the others are answered


def test_mlvu_as_published_runs_to_the_end_with_its_own_prompt(tmp_path: Path) -> None:
    """MLVU-dev's quirks (an answer that is no candidate, one that appears twice, an empty question)
    load and run; the official system turn and answer prefix reach the model."""
    from helpers import mlvu_published  # the published-format fixture (tests/ is on the path)

    folder = mlvu_published(tmp_path / "MLVU" / "data")
    write_clip(tmp_path / "MLVU" / "video" / "2_needle" / "needle_4.mp4", 4, seed=5)
    write_clip(tmp_path / "MLVU" / "video" / "7_topic_reasoning" / "movie101_89.mp4", 4, seed=6)
    output = tmp_path / "mlvu.jsonl"
    result = runner.invoke(app, ["eval", "run", "mlvu", str(folder), "--videos", str(tmp_path / "MLVU" / "video"),
                                 "--max-new-tokens", "2", "--output", str(output)])
    assert result.exit_code == 0, result.output
    results = read_results(output)
    assert results.complete and len(results.answers) == 4
    assert results.header["config"]["model"]["system_prompt"].startswith("Carefully watch this video")
    needle = results.answers[("2_needle/needle_4.mp4", "2_needle/0", None)]
    assert needle["answer"] == "@" and needle["correct"] is False and needle["error"] is None  # kept, always wrong
    empty = results.answers[("7_topic_reasoning/movie101_89.mp4", "7_topic_reasoning/0", None)]
    assert empty["error"] is None and empty["answer"] == "D" and empty["response"] is not None
    assert "M-Avg" in result.output


def test_the_answer_prefix_is_prefilled_before_the_reply() -> None:
    session = StreamingSession.from_preset("tiny-llava-ov", stc=None)
    session.push(np.zeros((2, 48, 64, 3), dtype=np.uint8))
    prompt = "Question: Who?\nOptions:\n(A) x\n(B) y\nOnly give the best option."
    plain, prefixed = session.next_token_logits(prompt), session.next_token_logits(prompt, answer_prefix="Best option: (")
    assert not np.allclose(plain.numpy(), prefixed.numpy())  # the prefix is part of the pre-fill
    answer = session.ask(prompt, max_new_tokens=1, answer_prefix="Best option: (")
    assert answer.token_ids == [int(prefixed.argmax())] or (answer.token_ids == [] and int(prefixed.argmax()) in
                                                           session.stop_token_ids)
